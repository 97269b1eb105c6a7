"""Shared pieces of evaluators: batched, sharded application of a model method."""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from pathflip_jax import input_pipeline, sharding


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


def check_split(task, config, split: str, key: str) -> None:
  """Fails at start-up, not at the end of a run, when an evaluator's split has no data."""
  splits = getattr(task, "splits", None)
  if splits is None:
    return
  if split not in splits or not len(splits[split].indices):
    raise ValueError(f"config.evals.*.{key}={split!r}: that split has no patches to evaluate "
                     f"(splits with patches: {sorted(k for k, v in splits.items() if len(v.indices))})")
