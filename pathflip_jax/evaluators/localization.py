"""Text-prompted localization (stage "align"): how well a query's heatmap finds its tissue.

``type="localization"``. For each slide of ``split`` and each query (a tissue type of the demo
cohort, described by ``prompts``: name -> phrases, default the name), the patch heatmap of
``pathflip_jax.heatmaps`` (mean over the query's phrases) is scored against the cohort's label
maps: a patch is positive when at least ``positive_fraction`` of its footprint is that tissue.

  auroc/<query>   patch-level AUROC within a slide, averaged over slides that have both
                  positive and negative patches (chance 0.5)
  dice/<query>    Dice of the heatmap thresholded at one level for all slides (scores min-max
                  normalised per slide), mean over those slides, at the best of 20 levels
  mean_lesion_auroc, mean_lesion_dice   over the ``lesions`` queries (the headline numbers)
  froc/<query>    with ``froc=True``: CAMELYON16-style FROC score, the mean sensitivity at
                  1/4, 1/2, 1, 2, 4 and 8 false positives per slide. Every patch is a detection
                  at its normalised score; it hits the lesion (a connected area of that tissue
                  in the cohort's region map) covering at least ``positive_fraction`` of it
                  (later hits of the same lesion are ignored), or is a false positive when no
                  lesion covers it at all. Lesions no tiled patch reaches are not counted.

  reference/...   with ``reference`` set: the same metrics for a reference with *patch-level*
                  supervision, the patch_clip run whose image tower extracted the features (the
                  role CONCH plays): each patch scored by the cosine of its projected feature
                  with the query's mean prompt embedding from that run's own text tower

Config: ``split`` ("test"), ``every``, ``cohort_dir`` (the demo cohort: masks/ and
manifest.jsonl), ``queries`` (tissue names), ``lesions``, ``prompts``, ``positive_fraction``
(0.5), ``froc`` (False), ``reference`` ("": none; a patch_clip workdir). Heatmaps are
``heatmaps.HeatmapScorer``'s default method.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from pathflip_jax import heatmaps, predict
from pathflip_jax.data import demo_annotations
from pathflip_jax.evaluators import common, metrics

LESIONS = ("tumour", "necrosis", "benign glands")
THRESHOLDS = np.linspace(0.05, 1.0, 20)   # on per-slide min-max normalised scores


FROC_RATES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def froc_score(detections: list[tuple[float, str, int]], num_lesions: int, num_slides: int,
               rates: tuple[float, ...] = FROC_RATES) -> float:
  """Mean sensitivity at ``rates`` false positives per slide. ``detections``: (score, slide,
  lesion id; 0 = false positive, -1 = ignored)."""
  if not num_lesions or not num_slides:
    return float("nan")
  hit: set[tuple[str, int]] = set()
  false_positives, points = 0, [(0.0, 0.0)]
  for _, slide, lesion in sorted(detections, key=lambda d: -d[0]):
    if lesion == 0:
      false_positives += 1
    elif lesion > 0:
      hit.add((slide, lesion))
    points.append((false_positives / num_slides, len(hit) / num_lesions))
  return float(np.mean([max(s for fp, s in points if fp <= rate) for rate in rates]))


def dice(truth: np.ndarray, predicted: np.ndarray) -> float:
  denominator = truth.sum() + predicted.sum()
  return float(2.0 * np.sum(truth & predicted) / denominator) if denominator else 1.0


class Evaluator(common.EvaluatorBase):

  def __init__(self, config: ml_collections.ConfigDict, task: Any, mesh: Mesh):
    super().__init__(config, task, mesh)
    common.check_slide_split(task, self.split, "split")
    cohort_dir = config.get("cohort_dir", "")
    if not cohort_dir or not os.path.isdir(os.path.join(cohort_dir, "masks")):
      raise ValueError(f"config.evals.*.cohort_dir={cohort_dir!r}: the localization evaluator "
                       "needs a demo cohort directory with masks/ (data_prep/make_demo_cohort.py)")
    self.annotations = demo_annotations.CohortAnnotations(cohort_dir)
    column = {name: i for i, name in
              enumerate(demo_annotations.TISSUE_NAMES[c] for c in demo_annotations.CLASS_LABELS)}
    self.queries = list(config.get("queries", None) or LESIONS)
    unknown = [q for q in self.queries if q not in column]
    if unknown:
      raise ValueError(f"config.evals.*.queries names {unknown}, not tissue types of the demo "
                       f"cohort: {sorted(column)}")
    self.columns = [column[q] for q in self.queries]
    self.lesions = [q for q in (config.get("lesions", None) or LESIONS) if q in self.queries]
    texts, self.prompt_query = common.class_prompts(config, self.queries)
    self.tokens = task.tokenizer.encode_batch(texts, task.example_config.subcaption_len)
    self.positive_fraction = float(config.get("positive_fraction", 0.5))
    self.froc = bool(config.get("froc", False))
    label_of = {demo_annotations.TISSUE_NAMES[c]: c for c in demo_annotations.CLASS_LABELS}
    self.labels = [label_of[q] for q in self.queries]
    self.scorer = heatmaps.HeatmapScorer()
    self.reference = config.get("reference", "")
    # The reference does not train: its metrics are computed once, at the first run.
    self._reference_metrics: dict[str, float] | None = None

  def slide_heatmaps(self, model: nnx.Module):
    """Per slide of the split: (slide_id, coords [n, 2], patch size, scores [queries, n])."""
    source = self.task.source(self.split)
    examples = self.task.eval_examples(self.split)
    for i, example in enumerate(examples):
      element = source[i]
      per_prompt = self.scorer(model, example, self.tokens)
      scores = np.stack([per_prompt[self.prompt_query == q].mean(0)
                         for q in range(len(self.queries))])
      yield (element["text"].slide_id, np.asarray(element["coords"]),
             float(element["patch_size_level0"]), scores)

  def reference_heatmaps(self):
    """Like :meth:`slide_heatmaps`, from the ``reference`` patch_clip run's own text alignment."""
    model, tokenizer, text_len = predict.load_patch_clip(self.reference)
    texts, prompt_query = common.class_prompts(self.config, self.queries)
    prompt_emb = np.asarray(model.encode_texts(tokenizer.encode_batch(texts, text_len)))
    query_emb = common.class_embeddings(prompt_emb, prompt_query, len(self.queries))
    feature_dim = model.image_proj.kernel.shape[0]
    source = self.task.source(self.split)
    for i in range(len(source)):
      element = source[i]
      features = np.asarray(element["features"], np.float32)
      if features.shape[1] != feature_dim:
        raise ValueError(f"config.evals.*.reference={self.reference}: its image projection takes "
                         f"{feature_dim}-d features, slide {element['text'].slide_id} has "
                         f"{features.shape[1]}-d ones (not this run's patch encoder)")
      patches = np.asarray(model.image_proj(features), np.float32)
      patches = patches / np.maximum(np.linalg.norm(patches, axis=1, keepdims=True), 1e-12)
      yield (element["text"].slide_id, np.asarray(element["coords"]),
             float(element["patch_size_level0"]), query_emb @ patches.T)

  def run(self, model: nnx.Module) -> dict[str, float]:
    result = self.score(self.slide_heatmaps(model))
    if self.reference:
      if self._reference_metrics is None:
        self._reference_metrics = {f"reference/{k}": v
                                   for k, v in self.score(self.reference_heatmaps()).items()
                                   if k != "chance_auroc"}
      result.update(self._reference_metrics)
    return result

  def score(self, slide_heatmaps) -> dict[str, float]:
    """The metrics of (slide_id, coords, patch size, scores [queries, n]) per slide."""
    aurocs = {q: [] for q in self.queries}
    dices = {q: [] for q in self.queries}       # per slide: Dice at each threshold
    detections: dict[str, list[tuple[float, str, int]]] = {q: [] for q in self.queries}
    lesions = {q: set() for q in self.queries}
    slides_seen = 0
    skipped = 0
    for slide_id, coords, size, scores in slide_heatmaps:
      if slide_id not in self.annotations.slides:
        skipped += 1
        continue
      fractions = self.annotations.tissue_fractions(slide_id, coords, size)
      slides_seen += 1
      if self.froc:
        for q, query in enumerate(self.queries):
          ids, shares = self.annotations.patch_regions(slide_id, coords, size, self.labels[q])
          # Hit: the lesion covers enough of the patch; touched but less: neither hit nor FP.
          lesion = np.where(shares >= self.positive_fraction, ids, np.where(ids > 0, -1, 0))
          lesions[query].update((slide_id, int(i)) for i in lesion[lesion > 0])
          detections[query] += [(float(v), slide_id, int(l))
                                 for v, l in zip(heatmaps.normalise(scores[q]), lesion)]
      for q, (query, column) in enumerate(zip(self.queries, self.columns)):
        truth = fractions[:, column] >= self.positive_fraction
        if truth.all() or not truth.any():
          continue
        aurocs[query].append(metrics.binary_auc(truth.astype(np.int32), scores[q]))
        norm = heatmaps.normalise(scores[q])
        dices[query].append([dice(truth, norm >= t) for t in THRESHOLDS])
    if skipped:
      print(f"[localization] {skipped} slides of split {self.split!r} are not in the cohort "
            f"{self.annotations.cohort_dir}; skipped", file=sys.stderr)
    result: dict[str, float] = {}
    for query in self.queries:
      key = heatmaps.safe_name(query)
      result[f"num_slides/{key}"] = float(len(aurocs[query]))
      if aurocs[query]:
        result[f"auroc/{key}"] = float(np.mean(aurocs[query]))
        result[f"dice/{key}"] = float(np.max(np.mean(dices[query], axis=0)))
      if self.froc and lesions[query]:
        result[f"froc/{key}"] = froc_score(detections[query], len(lesions[query]), slides_seen)
    lesion_keys = [heatmaps.safe_name(q) for q in self.lesions if aurocs[q]]
    if lesion_keys:
      result["mean_lesion_auroc"] = float(np.mean([result[f"auroc/{k}"] for k in lesion_keys]))
      result["mean_lesion_dice"] = float(np.mean([result[f"dice/{k}"] for k in lesion_keys]))
      frocs = [result[f"froc/{k}"] for k in lesion_keys if f"froc/{k}" in result]
      if frocs:
        result["mean_lesion_froc"] = float(np.mean(frocs))
    result["chance_auroc"] = 0.5
    return result
