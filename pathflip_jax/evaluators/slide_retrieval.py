"""Slide <-> caption retrieval (stage "align").

``type="slide_retrieval"``: every slide of the split against every caption of the split, by
cosine of the slide embedding and the caption embedding. Reports R@1/5/10 in both directions
(slide_to_text, text_to_slide) with the chance level of a random ranking (k / slides).

Config: ``split`` ("test"), ``every``, ``batch_size``, ``ks`` ((1, 5, 10)).
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from pathflip_jax.evaluators import common, metrics


class Evaluator(common.EvaluatorBase):

  def __init__(self, config: ml_collections.ConfigDict, task: Any, mesh: Mesh):
    super().__init__(config, task, mesh)
    self.ks = tuple(int(k) for k in config.get("ks", (1, 5, 10)))
    common.check_slide_split(task, self.split, "split")
    self.embed = common.SlideEmbeddings(task, mesh, config.get("batch_size", 8))

  def run(self, model: nnx.Module) -> dict[str, float]:
    out = self.embed(model, self.split)
    similarity = out["slide"] @ out["caption"].T
    result = metrics.retrieval_metrics(similarity, np.eye(len(similarity), dtype=bool), self.ks)
    result["num_slides"] = float(len(similarity))
    return {k: float(v) for k, v in result.items()}
