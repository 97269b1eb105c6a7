"""Evaluators, one module each, chosen by ``type`` in the config's ``evals`` section.

  config.evals.<name> = ConfigDict(type="patch_zero_shot", every=..., ...)

Each module defines ``Evaluator(config, task, mesh)`` with ``name`` and
``run(model) -> dict[str, float]``; metrics are logged as ``<name>/<metric>``. Slide-level
metrics carry 95% bootstrap intervals over the evaluated slides (``<metric>/ci_low``,
``<metric>/ci_high``; ``evaluators.stats``) and per-slide rows go to
``<workdir>/eval/<name>_<split>_slides.jsonl`` for ``pathflip_jax.compare``.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

import ml_collections
from flax import nnx
from jax.sharding import Mesh

TYPES = {
    "patch_zero_shot": "pathflip_jax.evaluators.patch_zero_shot",
    "patch_linear_probe": "pathflip_jax.evaluators.linear_probe",
    "slide_zero_shot": "pathflip_jax.evaluators.slide_zero_shot",
    "slide_retrieval": "pathflip_jax.evaluators.slide_retrieval",
    "captioning": "pathflip_jax.evaluators.captioning",
    "vqa": "pathflip_jax.evaluators.vqa",
    "localization": "pathflip_jax.evaluators.localization",
    "slide_linear_probe": "pathflip_jax.evaluators.slide_linear_probe",
    "slide_mil": "pathflip_jax.evaluators.slide_mil",
}


class Evaluator(Protocol):
  name: str
  every: int

  def run(self, model: nnx.Module) -> dict[str, float]: ...


def build(evals: ml_collections.ConfigDict, task: Any, mesh: Mesh) -> list[Evaluator]:
  """One evaluator per entry of ``config.evals`` (in the order given)."""
  out = []
  for name, config in (evals or {}).items():
    kind = config.get("type")
    if kind not in TYPES:
      raise ValueError(f"config.evals.{name}.type={kind!r} is not a known evaluator; "
                       f"known: {sorted(TYPES)}")
    evaluator = importlib.import_module(TYPES[kind]).Evaluator(config, task, mesh)
    evaluator.name = name
    out.append(evaluator)
  return out
