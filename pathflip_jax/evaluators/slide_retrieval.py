"""Slide <-> caption retrieval (stage "align").

``type="slide_retrieval"``: every slide of the split against every caption of the split, by
cosine of the slide embedding and the caption embedding. Reports R@1/5/10 in both directions
(``slide_to_text_r@k``, ``text_to_slide_r@k``), each with its 95% bootstrap interval over the
split's slides (``/ci_low``, ``/ci_high``): on each resample the slides drawn and their captions
form the gallery and recall is recomputed (a slide drawn twice brings its caption twice, both
positives of it). Beside them the chance level of a random ranking (``chance_r@k``, k / slides,
a constant).

Per slide, the rank of its own caption among all the split's captions (``slide_to_text_rank``)
and of the slide among all slides for its caption (``text_to_slide_rank``; 1 is first, ties
broken pessimistically) go to ``<workdir>/eval/<name>_<split>_slides.jsonl`` for
``pathflip_jax.compare``.

Config: ``split`` ("test"), ``every``, ``batch_size``, ``ks`` ((1, 5, 10)).
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from pathflip_jax.evaluators import common, metrics, stats


def true_ranks(similarity_sc: np.ndarray) -> np.ndarray:
  """1-based rank of the diagonal entry in each row, ties counted against it (the rank recall
  at k uses: a hit at k when the rank is at most k)."""
  similarity_sc = np.asarray(similarity_sc, np.float64)
  own = np.diag(similarity_sc)
  ahead = (similarity_sc >= own[:, None]).sum(1) - 1
  return ahead + 1


class Evaluator(common.EvaluatorBase):

  def __init__(self, config: ml_collections.ConfigDict, task: Any, mesh: Mesh):
    super().__init__(config, task, mesh)
    self.ks = tuple(int(k) for k in config.get("ks", (1, 5, 10)))
    common.check_slide_split(task, self.split, "split")
    self.embed = common.SlideEmbeddings(task, mesh, config.get("batch_size", 8))
    self.slide_ids = common.slide_ids(task, self.split)

  def run(self, model: nnx.Module) -> dict[str, float]:
    out = self.embed(model, self.split)
    similarity = np.asarray(out["slide"] @ out["caption"].T, np.float64)
    n = len(similarity)
    result = metrics.retrieval_metrics(similarity, np.eye(n, dtype=bool), self.ks)
    recalls = [k for k in result if not k.startswith("chance_")]

    def metric(idx: np.ndarray) -> dict[str, float]:
      # The drawn slides against the drawn captions; copies of one slide are all positives.
      values = metrics.retrieval_metrics(similarity[np.ix_(idx, idx)],
                                         idx[:, None] == idx[None, :], self.ks)
      return {k: values[k] for k in recalls}

    stats.add_intervals(result, metric, n)
    result["num_slides"] = float(n)
    slide_to_text, text_to_slide = true_ranks(similarity), true_ranks(similarity.T)
    self.write_rows([{"slide_id": sid, "slide_to_text_rank": int(slide_to_text[i]),
                      "text_to_slide_rank": int(text_to_slide[i])}
                     for i, sid in enumerate(self.slide_ids)])
    return {k: float(v) for k, v in result.items()}
