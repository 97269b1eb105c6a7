"""Shared pieces of evaluators: their common settings, batched and sharded application of a model
method, slide embeddings of a split, class prompts."""

from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from pathflip_jax import input_pipeline, sharding


class EvaluatorBase:
  """What every evaluator keeps of its config: the config, the task, ``every`` (run every so
  many steps; 0: every ``log_steps``) and ``split`` (``default_split`` when the config has none).
  Subclasses are the ``Evaluator`` of their module and add their own fields."""

  default_split = "test"

  def __init__(self, config: ml_collections.ConfigDict, task: Any, mesh: Mesh):
    self.config, self.task, self.mesh = config, task, mesh
    self.every = config.get("every", 0)
    self.split = config.get("split", self.default_split)


class BatchedApply:
  """``method(model, inputs)`` over an array of inputs, batch by batch, split over the mesh.

  One compiled shape: the last batch is padded. The jitted function is kept between calls, so
  an evaluator that runs every few hundred steps compiles once.
  """

  def __init__(self, method: Callable[[nnx.Module, jax.Array], jax.Array], mesh: Mesh,
               batch_size: int):
    shards = sharding.batch_shards(mesh)
    self.batch_size = -(-batch_size // shards) * shards
    self.mesh = mesh

    @jax.jit
    def apply(graphdef, state, inputs):
      return method(nnx.merge(graphdef, state), inputs)

    self._apply = apply

  def __call__(self, model: nnx.Module, inputs: np.ndarray) -> np.ndarray:
    graphdef, state = nnx.split(model)
    outputs = []
    for start in range(0, len(inputs), self.batch_size):
      chunk = inputs[start:start + self.batch_size]
      valid = len(chunk)
      if valid < self.batch_size:
        pad = np.repeat(chunk[-1:], self.batch_size - valid, axis=0)
        chunk = np.concatenate([chunk, pad])
      batch = input_pipeline.to_global({"x": chunk}, self.mesh)["x"]
      outputs.append(np.asarray(jax.device_get(self._apply(graphdef, state, batch)))[:valid])
    return np.concatenate(outputs) if outputs else np.zeros((0,), np.float32)


def class_prompts(config, class_names) -> tuple[list[str], np.ndarray]:
  """The prompt texts of ``config.prompts`` (class name -> phrases; default: the class name)
  and the class index of each, in class order."""
  prompts = dict(config.get("prompts", None) or {})
  unknown = set(prompts) - set(class_names)
  if unknown:
    raise ValueError(f"config.evals.*.prompts names unknown classes {sorted(unknown)}; "
                     f"classes: {class_names}")
  per_class = [list(prompts.get(name) or [name]) for name in class_names]
  texts = [p for phrases in per_class for p in phrases]
  prompt_class = np.array([i for i, phrases in enumerate(per_class) for _ in phrases])
  return texts, prompt_class


def class_embeddings(prompt_emb: np.ndarray, prompt_class: np.ndarray,
                     num_classes: int) -> np.ndarray:
  """Each class's normalised mean prompt embedding (prompt ensembling): [classes, e]."""
  class_emb = np.stack([prompt_emb[prompt_class == c].mean(0) for c in range(num_classes)])
  return class_emb / np.linalg.norm(class_emb, axis=1, keepdims=True)


def check_split(task, config, split: str, key: str) -> None:
  """Fails at start-up, not at the end of a run, when an evaluator's split has no data."""
  splits = getattr(task, "splits", None)
  if splits is None:
    return
  if split not in splits or not len(splits[split].indices):
    raise ValueError(f"config.evals.*.{key}={split!r}: that split has no patches to evaluate "
                     f"(splits with patches: {sorted(k for k, v in splits.items() if len(v.indices))})")


class SlideEmbeddings:
  """Slide embeddings, region embeddings and caption embeddings of a split (stage "align").

  Runs ``model.encode_slides`` over ``task.eval_batches(split)`` (split over the mesh's batch
  axes) and returns arrays in the split's slide order.
  """

  def __init__(self, task, mesh: Mesh, batch_size: int):
    shards = sharding.batch_shards(mesh)
    self.task, self.mesh = task, mesh
    self.batch_size = -(-batch_size // shards) * shards

    @jax.jit
    def encode(graphdef, state, batch):
      model = nnx.merge(graphdef, state)
      out = model.encode_slides(batch)
      return {"slide": out["slide"], "regions": out["regions"],
              "region_valid": out["region_valid"], "caption": model.encode_texts(batch["caption"])}

    self._encode = encode
    self._texts = BatchedApply(lambda m, t: m.encode_texts(t), mesh, self.batch_size)

  def __call__(self, model: nnx.Module, split: str) -> dict[str, np.ndarray]:
    graphdef, state = nnx.split(model)
    batches, count = self.task.eval_batches(split, self.batch_size)
    parts: dict[str, list[np.ndarray]] = {}
    index = []
    for batch in batches:
      keep = batch["slide_index"] >= 0
      inputs = input_pipeline.to_global(
          {k: v for k, v in batch.items() if k not in ("label", "slide_index")}, self.mesh)
      out = jax.device_get(self._encode(graphdef, state, inputs))
      for key, value in out.items():
        parts.setdefault(key, []).append(np.asarray(value)[keep])
      parts.setdefault("label", []).append(batch["label"][keep])
      index.append(batch["slide_index"][keep])
    order = np.argsort(np.concatenate(index))
    result = {k: np.concatenate(v)[order] for k, v in parts.items()}
    assert len(order) == count
    return result

  def texts(self, model: nnx.Module, tokens: np.ndarray) -> np.ndarray:
    """Unit-norm embeddings of token rows (padded to the mesh's batch split)."""
    return self._texts(model, tokens)


def check_slide_split(task, split: str, key: str) -> None:
  """Fails at start-up when an evaluator's split has no slides."""
  splits = task.splits
  if split not in splits or not len(splits[split]):
    raise ValueError(f"config.evals.*.{key}={split!r}: that split has no slides to evaluate "
                     f"(splits with slides: {sorted(k for k, v in splits.items() if len(v))})")
