"""Finished-looking training workdirs for tests of what reads them (instruct, infer): config.json,
the stage's tokenizer and a checkpoint of the freshly initialised model, without training."""

from __future__ import annotations

from typing import Any

import ml_collections
from flax import nnx

from pathflip_jax import checkpointing, tasks, train


def save_untrained_run(config: ml_collections.ConfigDict, workdir: str, step: int = 1) -> Any:
  """Writes ``workdir`` as if ``config`` had trained to ``step``; returns the stage's task."""
  task = tasks.build(config, workdir)
  train.save_config(config, workdir)
  ckpt = checkpointing.Checkpointer(workdir)
  ckpt.save(step, {"params": nnx.state(task.create_model(nnx.Rngs(0)), nnx.Param)})
  ckpt.close()
  return task
