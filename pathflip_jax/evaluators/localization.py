"""Text-prompted localization (stage "align"): how well a query's heatmap finds its tissue.

``type="localization"``. For each slide of ``split`` and each query (a tissue type of the demo
cohort, described by ``prompts``: name -> phrases, default the name), the patch heatmap of
``pathflip_jax.heatmaps`` (mean over the query's phrases) is scored against the cohort's label
maps: a patch is positive when at least ``positive_fraction`` of its footprint is that tissue.

  auroc/<query>   patch-level AUROC within a slide, averaged over slides that have both
                  positive and negative patches (chance 0.5)
  dice/<query>    Dice of the heatmap thresholded at one level for all slides (scores min-max
                  normalised per slide), mean over those slides. The level is the best of 20 on
                  the ``threshold_split`` slides (val), never on the slides scored; it is
                  reported as ``dice_threshold/<query>`` (0.5 when that split has no slide with
                  both positive and negative patches for the query, or no slides at all, or
                  ``threshold_split`` is "")
  mean_lesion_auroc, mean_lesion_dice   over the ``lesions`` queries (the headline numbers)
  froc/<query>    with ``froc=True``: CAMELYON16-style FROC score, the mean sensitivity at
                  1/4, 1/2, 1, 2, 4 and 8 false positives per slide. Every patch is a detection
                  at its normalised score; it hits the lesion (a connected area of that tissue
                  in the cohort's region map) covering at least ``positive_fraction`` of it
                  (later hits of the same lesion are ignored), or is a false positive when no
                  lesion covers it at all (at equal scores false positives count first). Lesions
                  no tiled patch reaches are not counted.

  reference/...   with ``reference`` set: the same metrics for a reference with *patch-level*
                  supervision, the patch_clip run whose image tower extracted the features (the
                  role CONCH plays): each patch scored by the cosine of its projected feature
                  with the query's mean prompt embedding from that run's own text tower (its
                  Dice threshold chosen on its own val heatmaps)
  minus_reference/mean_lesion_{auroc,dice,froc}   the model minus the reference, paired over
                  the same slides

Every metric but the counts (``num_slides/<query>``), thresholds and ``chance_auroc`` has a 95%
bootstrap interval over the split's slides (``<metric>/ci_low``, ``/ci_high``): per-query means
and FROC are recomputed on each resample of slides (a slide drawn twice counts twice: its
lesions and its false positives). Per slide, each query's AUROC, Dice and FROC detections (the
best score of each lesion hit, the scores of the false positives) go to
``<workdir>/eval/<name>_<split>_slides.jsonl`` for ``pathflip_jax.compare``.

Config: ``split`` ("test"), ``threshold_split`` ("val"), ``every``, ``cohort_dir`` (the demo
cohort: masks/ and manifest.jsonl), ``queries`` (tissue names), ``lesions``, ``prompts``,
``positive_fraction`` (0.5), ``froc`` (False), ``reference`` ("": none; a patch_clip workdir).
Heatmaps are ``heatmaps.HeatmapScorer``'s default method.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Callable, Iterable, Sequence

import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from pathflip_jax import heatmaps
from pathflip_jax.data import demo_annotations
from pathflip_jax.evaluators import common, metrics, stats

LESIONS = ("tumour", "necrosis", "benign glands")
THRESHOLDS = np.linspace(0.05, 1.0, 20)   # on per-slide min-max normalised scores
# Where no slide of the threshold split can choose: the middle of the normalised scale.
DEFAULT_THRESHOLD = int(np.argmin(np.abs(THRESHOLDS - 0.5)))


FROC_RATES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)

SlideHeatmap = tuple[str, np.ndarray, float, np.ndarray]   # slide_id, coords, size, [q, n]


def froc_score(detections: list[tuple[float, str, int]], num_lesions: int, num_slides: int,
               rates: tuple[float, ...] = FROC_RATES) -> float:
  """Mean sensitivity at ``rates`` false positives per slide. ``detections``: (score, slide,
  lesion id; 0 = false positive, -1 = ignored). At equal scores false positives come first."""
  if not num_lesions or not num_slides:
    return float("nan")
  hit: set[tuple[str, int]] = set()
  false_positives, points = 0, [(0.0, 0.0)]
  for _, slide, lesion in sorted(detections, key=lambda d: (-d[0], d[2] != 0)):
    if lesion == 0:
      false_positives += 1
    elif lesion > 0:
      hit.add((slide, lesion))
    points.append((false_positives / num_slides, len(hit) / num_lesions))
  return float(np.mean([max(s for fp, s in points if fp <= rate) for rate in rates]))


class Froc:
  """FROC score of any multiset of slides, from each slide's lesion hits and false positives.

  ``hits[s]``: the best score of each lesion of slide ``s`` that some patch hits;
  ``false_positives[s]``: the scores of its false-positive patches. A lesion counts at a rate
  when the false positives (of all slides drawn) scoring at least its hit are at most rate x
  slides; calling with slide indices (repeats allowed) gives :func:`froc_score` of those slides,
  in O(lesions x slides) instead of a sort of every patch.
  """

  def __init__(self, hits: Sequence[np.ndarray], false_positives: Sequence[np.ndarray],
               rates: tuple[float, ...] = FROC_RATES):
    self.rates = rates
    self.num_slides = len(hits)
    self.hit_slide = np.concatenate([np.full(len(h), s, np.int64) for s, h in enumerate(hits)]
                                    + [np.zeros((0,), np.int64)])
    hit_scores = np.concatenate([np.asarray(h, np.float64) for h in hits]
                                + [np.zeros((0,), np.float64)])
    self.lesions_per_slide = np.array([len(h) for h in hits], np.float64)
    # before[h, s]: false positives of slide s scoring at least hit h (they come first at ties).
    columns = [len(f) - np.searchsorted(np.sort(np.asarray(f, np.float64)), hit_scores, "left")
               for f in false_positives]
    self.before = (np.stack(columns, 1).astype(np.float64) if columns
                   else np.zeros((len(hit_scores), 0)))

  def __call__(self, idx: np.ndarray) -> float:
    weights = np.bincount(np.asarray(idx, np.int64), minlength=self.num_slides).astype(np.float64)
    lesions = float(weights @ self.lesions_per_slide)
    if not lesions or not len(idx):
      return float("nan")
    before = self.before @ weights
    hit_weight = weights[self.hit_slide]
    return float(np.mean([hit_weight[before <= rate * len(idx)].sum() / lesions
                          for rate in self.rates]))


def dice(truth: np.ndarray, predicted: np.ndarray) -> float:
  denominator = truth.sum() + predicted.sum()
  return float(2.0 * np.sum(truth & predicted) / denominator) if denominator else 1.0


@dataclasses.dataclass
class SlideTable:
  """Per-slide localization values of one split (slides in the split's order, queries in the
  evaluator's): the unit that bootstrap resamples and comparisons pair."""
  slide_ids: list[str]
  auroc: np.ndarray                             # [slides, queries]; nan: no pos. and neg.
  dice: np.ndarray                              # [slides, queries, THRESHOLDS]; nan likewise
  froc_hits: list[list[np.ndarray]]             # [queries][slides] best score per lesion hit
  froc_false_positives: list[list[np.ndarray]]  # [queries][slides] false-positive scores


def choose_thresholds(table: SlideTable) -> np.ndarray:
  """Per query, the index into THRESHOLDS of the best mean Dice over ``table``'s slides
  (DEFAULT_THRESHOLD for a query no slide there can score)."""
  chosen = []
  for q in range(table.dice.shape[1]):
    per_slide = table.dice[:, q]
    per_slide = per_slide[np.isfinite(per_slide).all(1)]
    chosen.append(int(np.argmax(per_slide.mean(0))) if len(per_slide) else DEFAULT_THRESHOLD)
  return np.array(chosen, np.int64)


def _nanmean(values: np.ndarray) -> float:
  values = values[np.isfinite(values)]
  return float(values.mean()) if len(values) else float("nan")


def table_metrics(table: SlideTable, queries: Sequence[str], lesions: Sequence[str],
                  thresholds: np.ndarray, froc: bool) -> Callable[[np.ndarray], dict[str, float]]:
  """The dict metric (slide indices -> values) of a table: auroc/, dice/ (at ``thresholds``),
  froc/ per query and their means over ``lesions``; keys only for queries some slide of the
  whole table can score."""
  keys = [heatmaps.safe_name(q) for q in queries]
  scored = [q for q in range(len(queries)) if np.isfinite(table.auroc[:, q]).any()]
  dice_at = np.stack([table.dice[:, q, thresholds[q]] for q in range(len(queries))], 1) if len(
      queries) else np.zeros((len(table.slide_ids), 0))
  frocs = {q: Froc(table.froc_hits[q], table.froc_false_positives[q]) for q in range(len(queries))
           if froc and sum(len(h) for h in table.froc_hits[q])}
  lesion_index = [q for q in scored if queries[q] in lesions]

  def metric(idx: np.ndarray) -> dict[str, float]:
    # A query none of the drawn slides can score is nan there and left out of the lesion mean.
    out = {}
    for q in scored:
      out[f"auroc/{keys[q]}"] = _nanmean(table.auroc[idx, q])
      out[f"dice/{keys[q]}"] = _nanmean(dice_at[idx, q])
    for q, score in frocs.items():
      out[f"froc/{keys[q]}"] = score(idx)
    if lesion_index:
      for name in ("auroc", "dice", "froc"):
        values = np.array([out.get(f"{name}/{keys[q]}", np.nan) for q in lesion_index])
        if name != "froc" or any(q in frocs for q in lesion_index):
          out[f"mean_lesion_{name}"] = _nanmean(values)
    return out

  return metric


def _json_float(value: float) -> float | None:
  return float(value) if np.isfinite(value) else None


class Evaluator(common.EvaluatorBase):

  def __init__(self, config: ml_collections.ConfigDict, task: Any, mesh: Mesh):
    super().__init__(config, task, mesh)
    common.check_slide_split(task, self.split, "split")
    self.threshold_split = config.get("threshold_split", "val")
    if self.threshold_split == self.split:
      raise ValueError(f"config.evals.*.threshold_split={self.threshold_split!r} is the split "
                       "scored: the Dice threshold must be chosen on other slides (e.g. 'val')")
    if self.threshold_split and self.threshold_split not in task.splits:
      raise ValueError(f"config.evals.*.threshold_split={self.threshold_split!r}: no such split "
                       f"(splits: {sorted(task.splits)})")
    if self.threshold_split and not len(task.splits[self.threshold_split]):
      # Small cohorts (the test size) can leave val empty: a fixed level, still not chosen on
      # the slides scored.
      print(f"[localization] config.evals.*.threshold_split={self.threshold_split!r} has no "
            f"slides: Dice at the fixed threshold {THRESHOLDS[DEFAULT_THRESHOLD]:.2f}",
            file=sys.stderr)
      self.threshold_split = ""
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
    self.texts = texts
    self.tokens = task.tokenizer.encode_batch(texts, task.example_config.subcaption_len)
    self.positive_fraction = float(config.get("positive_fraction", 0.5))
    self.froc = bool(config.get("froc", False))
    label_of = {demo_annotations.TISSUE_NAMES[c]: c for c in demo_annotations.CLASS_LABELS}
    self.labels = [label_of[q] for q in self.queries]
    self.scorer = heatmaps.HeatmapScorer()
    self.reference = config.get("reference", "")
    # The reference does not train: its table and thresholds are computed once, at the first
    # run.
    self._reference: tuple[SlideTable, np.ndarray] | None = None

  def slide_heatmaps(self, model: nnx.Module, split: str | None = None
                     ) -> Iterable[SlideHeatmap]:
    """Per slide of ``split`` (default: the evaluated one): (slide_id, coords [n, 2], patch
    size, scores [queries, n])."""
    split = split or self.split
    source = self.task.source(split)
    examples = self.task.eval_examples(split)
    for i, example in enumerate(examples):
      element = source[i]
      per_prompt = self.scorer(model, example, self.tokens)
      scores = np.stack([per_prompt[self.prompt_query == q].mean(0)
                         for q in range(len(self.queries))])
      yield (element["text"].slide_id, np.asarray(element["coords"]),
             float(element["patch_size_level0"]), scores)

  def reference_heatmaps(self, split: str | None = None,
                         reference: common.PatchClipReference | None = None
                         ) -> Iterable[SlideHeatmap]:
    """Like :meth:`slide_heatmaps`, from the ``reference`` patch_clip run's own text alignment."""
    reference = reference or common.PatchClipReference(self.reference)
    query_emb = reference.class_embeddings(self.texts, self.prompt_query, len(self.queries))
    source = self.task.source(split or self.split)
    for i in range(len(source)):
      element = source[i]
      slide_id = element["text"].slide_id
      patches = reference.patch_embeddings(element["features"], slide_id)
      yield (slide_id, np.asarray(element["coords"]), float(element["patch_size_level0"]),
             query_emb @ patches.T)

  def tabulate(self, slide_heatmaps: Iterable[SlideHeatmap], split: str | None = None
               ) -> SlideTable:
    """The per-slide values of (slide_id, coords, patch size, scores [queries, n]) per slide;
    slides not in the cohort are skipped (and said so)."""
    num_queries = len(self.queries)
    ids, aurocs, dices = [], [], []
    hits: list[list[np.ndarray]] = [[] for _ in self.queries]
    false_positives: list[list[np.ndarray]] = [[] for _ in self.queries]
    skipped = 0
    for slide_id, coords, size, scores in slide_heatmaps:
      if slide_id not in self.annotations.slides:
        skipped += 1
        continue
      fractions = self.annotations.tissue_fractions(slide_id, coords, size)
      ids.append(slide_id)
      auroc = np.full(num_queries, np.nan)
      dice_qt = np.full((num_queries, len(THRESHOLDS)), np.nan)
      for q, column in enumerate(self.columns):
        norm = heatmaps.normalise(scores[q])
        if self.froc:
          regions, shares = self.annotations.patch_regions(slide_id, coords, size, self.labels[q])
          # Hit: the lesion covers enough of the patch; touched but less: neither hit nor FP.
          lesion = np.where(shares >= self.positive_fraction, regions,
                            np.where(regions > 0, -1, 0))
          hit_ids = np.unique(lesion[lesion > 0])
          hits[q].append(np.array([norm[lesion == i].max() for i in hit_ids], np.float64))
          false_positives[q].append(np.asarray(norm[lesion == 0], np.float64))
        else:
          hits[q].append(np.zeros((0,)))
          false_positives[q].append(np.zeros((0,)))
        truth = fractions[:, column] >= self.positive_fraction
        if truth.all() or not truth.any():
          continue
        auroc[q] = metrics.binary_auc(truth.astype(np.int32), scores[q])
        dice_qt[q] = [dice(truth, norm >= t) for t in THRESHOLDS]
      aurocs.append(auroc)
      dices.append(dice_qt)
    if skipped:
      print(f"[localization] {skipped} slides of split {split or self.split!r} are not in the "
            f"cohort {self.annotations.cohort_dir}; skipped", file=sys.stderr)
    return SlideTable(ids, np.array(aurocs, np.float64).reshape(len(ids), num_queries),
                      np.array(dices, np.float64).reshape(len(ids), num_queries, len(THRESHOLDS)),
                      hits, false_positives)

  def thresholds(self, table: SlideTable | None, who: str) -> np.ndarray:
    """:func:`choose_thresholds` on the threshold split's table (None: no threshold split, the
    default level for every query), saying which queries fell back to the default level."""
    if table is None:
      return np.full(len(self.queries), DEFAULT_THRESHOLD, np.int64)
    chosen = choose_thresholds(table)
    missing = [q for q in range(len(self.queries))
               if not np.isfinite(table.dice[:, q]).all(1).any()]
    if missing:
      print(f"[localization] {who}: no slide of split {self.threshold_split!r} has positive and "
            f"negative patches of {[self.queries[q] for q in missing]}; their Dice threshold is "
            f"{THRESHOLDS[DEFAULT_THRESHOLD]:.2f}", file=sys.stderr)
    return chosen

  def reference_table(self) -> tuple[SlideTable, np.ndarray]:
    """The reference's table on the evaluated split and its Dice thresholds (computed once)."""
    if self._reference is None:
      reference = common.PatchClipReference(self.reference)
      val = self.tabulate(self.reference_heatmaps(self.threshold_split, reference),
                          self.threshold_split) if self.threshold_split else None
      table = self.tabulate(self.reference_heatmaps(self.split, reference))
      self._reference = (table, self.thresholds(val, "reference"))
    return self._reference

  def run(self, model: nnx.Module) -> dict[str, float]:
    thresholds = self.thresholds(self.tabulate(
        self.slide_heatmaps(model, self.threshold_split), self.threshold_split)
        if self.threshold_split else None, "model")
    table = self.tabulate(self.slide_heatmaps(model, self.split))
    result = self.score(table, thresholds)
    self.write_rows(self.rows(table, thresholds))
    return result

  def score(self, table: SlideTable, thresholds: np.ndarray) -> dict[str, float]:
    """The metrics of a table with their intervals (and the reference's, and the paired
    differences, when the config has one)."""
    model_metric = table_metrics(table, self.queries, self.lesions, thresholds, self.froc)
    metric: Callable[[np.ndarray], dict[str, float]] = model_metric
    if self.reference:
      reference, reference_thresholds = self.reference_table()
      if reference.slide_ids != table.slide_ids:
        raise ValueError(f"config.evals.*.reference={self.reference}: its slides of split "
                         f"{self.split!r} differ from the model's")
      reference_metric = table_metrics(reference, self.queries, self.lesions,
                                       reference_thresholds, self.froc)

      def with_reference(idx: np.ndarray) -> dict[str, float]:
        ours, theirs = model_metric(idx), reference_metric(idx)
        out = {**ours, **{f"reference/{k}": v for k, v in theirs.items()}}
        for name in ("mean_lesion_auroc", "mean_lesion_dice", "mean_lesion_froc"):
          if name in ours and name in theirs:
            out[f"minus_reference/{name}"] = ours[name] - theirs[name]
        return out

      metric = with_reference

    result: dict[str, float] = {}
    stats.add_intervals(result, metric, len(table.slide_ids))
    for q, query in enumerate(self.queries):
      key = heatmaps.safe_name(query)
      result[f"num_slides/{key}"] = float(np.isfinite(table.auroc[:, q]).sum())
      if f"dice/{key}" in result:
        result[f"dice_threshold/{key}"] = float(THRESHOLDS[thresholds[q]])
      if self.reference and f"reference/dice/{key}" in result:
        result[f"reference/dice_threshold/{key}"] = float(
            THRESHOLDS[self.reference_table()[1][q]])
    result["chance_auroc"] = 0.5
    return result

  def rows(self, table: SlideTable, thresholds: np.ndarray) -> list[dict[str, Any]]:
    """Per slide: each query's AUROC and Dice (at its threshold), its FROC detections, and the
    lesion queries (what ``compare`` averages)."""
    names = [heatmaps.safe_name(q) for q in self.queries]
    out = []
    for s, slide_id in enumerate(table.slide_ids):
      row: dict[str, Any] = {
          "slide_id": slide_id,
          "auroc": {k: _json_float(table.auroc[s, q]) for q, k in enumerate(names)},
          "dice": {k: _json_float(table.dice[s, q, thresholds[q]]) for q, k in enumerate(names)},
          "lesions": [heatmaps.safe_name(q) for q in self.lesions]}
      if self.froc:
        row["froc_hits"] = {k: [round(float(v), 5) for v in table.froc_hits[q][s]]
                            for q, k in enumerate(names)}
        row["froc_false_positives"] = {
            k: [round(float(v), 5) for v in table.froc_false_positives[q][s]]
            for q, k in enumerate(names)}
      out.append(row)
    return out
