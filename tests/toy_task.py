"""A tiny regression stage for testing the trainer's loop without a cohort (``stage="toy"``).

y = x @ W_true over 16-d inputs drawn from the element index; the model is one ``layers.Dense``
layer (annotated ``embed`` x ``mlp``, so it shards over fsdp and model). ``config.toy_sleep``
slows each element down so that a test can kill a run in the middle.
"""

from __future__ import annotations

import time

import grain
import jax
import ml_collections
import numpy as np
from flax import nnx

from pathflip_jax.models import layers

DIM = 16


class ToySource:
  def __init__(self, size: int, sleep: float):
    self.size, self.sleep = size, sleep
    self.w_true = np.random.default_rng(123).normal(size=(DIM, DIM)).astype(np.float32)

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, i: int):
    if self.sleep:
      time.sleep(self.sleep)
    x = np.random.default_rng(int(i)).normal(size=(DIM,)).astype(np.float32)
    return {"x": x, "y": x @ self.w_true}


class Noise(grain.transforms.RandomMap):
  def random_map(self, element, rng: np.random.Generator):
    return {"x": element["x"] + rng.normal(0, 0.01, DIM).astype(np.float32), "y": element["y"]}


class ToyModel(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    kw = dict(rngs=rngs, dtype=np.float32, param_dtype=np.float32)
    self.hidden = layers.Dense(DIM, 4 * DIM, ("embed", "mlp"), **kw)
    self.out = layers.Dense(4 * DIM, DIM, ("mlp", "embed"), **kw)

  def __call__(self, x):
    return self.out(self.hidden(x))


class ToyTask:
  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.config = config

  def create_model(self, rngs: nnx.Rngs) -> ToyModel:
    return ToyModel(rngs)

  def train_source(self) -> grain.MapDataset:
    return grain.MapDataset.source(ToySource(64, self.config.get("toy_sleep", 0.0)))

  def train_transform(self):
    return Noise()

  def loss(self, model, batch, rng):
    del rng
    error = model(batch["x"]) - batch["y"]
    return (error ** 2).mean(), {"abs_error": abs(error).mean()}

  def dummy_batch(self, n: int):
    return {"x": np.zeros((n, DIM), np.float32), "y": np.zeros((n, DIM), np.float32)}


class Evaluator:
  """A toy evaluator (``type="toy"`` once a test registers this module): ``scripted``, the
  config's ``scores`` in call order (so a test knows which step is best), and ``weight_sum``, a
  fingerprint of the model's parameters."""

  def __init__(self, config: ml_collections.ConfigDict, task: ToyTask, mesh):
    del task, mesh
    self.every = config.get("every", 0)
    self.scores = list(config.scores)
    self.calls = 0

  def run(self, model: ToyModel) -> dict[str, float]:
    score = self.scores[min(self.calls, len(self.scores) - 1)]
    self.calls += 1
    weights = nnx.state(model, nnx.Param)
    return {"scripted": float(score),
            "weight_sum": float(sum(np.asarray(w).sum() for w in jax.tree.leaves(weights)))}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """A complete trainer config for the toy stage (``arg``: ``key=value,...`` overrides)."""
  from pathflip_jax import config_args  # pylint: disable=import-outside-toplevel
  args = config_args.parse_arg(arg, total_steps=12, batch_size=8, workers=0, sleep=0.0,
                               nan_at_step=0, checkpoint_every=4, lr=0.01)
  config = ml_collections.ConfigDict()
  config.stage = "tests.toy_task:ToyTask"
  config.seed = 0
  config.toy_sleep = args.sleep
  config.total_steps = args.total_steps
  config.batch_size = args.batch_size
  config.optim = dict(optimizer="adamw", lr=args.lr, schedule="cosine", warmup_steps=min(2, args.total_steps),
                      weight_decay=0.01, grad_clip_norm=1.0)
  config.mesh = dict(data=-1, fsdp=1, model=1)
  config.input = dict(worker_count=args.workers, worker_buffer_size=2)
  config.log_steps = 4
  config.progress_seconds = 0.0
  config.checkpoint = dict(every=args.checkpoint_every, keep=2, best_metric="", best_mode="max",
                           async_save=True)
  config.evals = {}
  config.resume = ""
  config.model_init = ""
  config.model_init_include = (".*",)
  config.debug = dict(nan_at_step=args.nan_at_step)
  return config
