"""Training stages: what one ``config.stage`` trains (data, model, loss), looked up by name.

A task object gives the trainer ``create_model(rngs)``, ``train_source()``,
``train_transform()``, ``loss(model, batch, rng) -> (loss, metrics)`` and ``dummy_batch(n)``,
optionally ``collate(examples)`` (batching other than stacking); the trainer sets ``task.mesh``
before the first step. Evaluators take what they need from it (``evaluators/``).
"""

from __future__ import annotations

import importlib
from typing import Any

import ml_collections

STAGES = {
    "patch_clip": "pathflip_jax.tasks.patch_clip:PatchClipTask",
    "align": "pathflip_jax.tasks.align:AlignTask",
    "instruct": "pathflip_jax.tasks.instruct:InstructTask",
}


def build(config: ml_collections.ConfigDict, workdir: str) -> Any:
  """The task object of ``config.stage``."""
  stage = config.get("stage")
  # "package.module:Class" names a stage defined outside this package (a user's own, the tests').
  spec = STAGES.get(stage) or (stage if isinstance(stage, str) and ":" in stage else None)
  if spec is None:
    raise ValueError(f"config.stage={stage!r} is not a known stage; known: {sorted(STAGES)} "
                     "(or give 'package.module:Class')")
  module, name = spec.split(":")
  return getattr(importlib.import_module(module), name)(config, workdir)
