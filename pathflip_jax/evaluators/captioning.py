"""Slide captioning (stage "instruct"): generated captions against the slides' reports.

``type="captioning"``. Each slide of ``split`` gets the caption prompt (``task.eval_items``,
"Describe the slide."); the answer is decoded greedily (``beams=1``) or by beam search and scored
against the slide's caption as the COCO caption evaluation scores it (``text_metrics``: PTB
tokens, corpus BLEU-1..4, ROUGE-L, CIDEr-D, and METEOR 1.5 with ``meteor``). Every metric comes
with its 95% bootstrap interval over slides (``/ci_low``, ``/ci_high``; corpus metrics are
recomputed on each resample, document frequencies included).

Beside the model, two captioners that never look at the test slide's pixels:

  random_train_caption   a random training caption per slide (the mean over ``baseline_draws``
                         draws): what ignoring the slide scores on templated reports;
  nearest_train_caption  the caption of the training slide whose slide embedding is closest
                         (cosine; the slide embedding is the first visual token, the align run's
                         slide embedding): what retrieval with the frozen encoder scores.

``minus_<baseline>/<metric>`` is the paired difference model minus baseline on the same
resamples. ``distinct_captions`` is the share of slides whose generated caption no other slide
of the split gets (a model that writes one caption per diagnosis scores low); the nearest
neighbour's is given too.

Generated captions and references go to ``<workdir>/eval/<name>_<split>.jsonl`` (the first
``samples`` are printed); per slide the caption, its nearest-neighbour caption and its segment
ROUGE-L and CIDEr-D to ``<workdir>/eval/<name>_<split>_slides.jsonl``.

Config: ``split`` ("test"), ``every``, ``batch_size`` (8), ``max_new_tokens`` (256), ``beams``
(1), ``samples`` (3), ``baseline_draws`` (20), ``meteor`` (False: METEOR runs the jar of the
pycocoevalcap package, a test requirement, with Java; about 8 s to start and 15 ms a caption, so
the random baseline's draws dominate).
"""

from __future__ import annotations

import json
import sys
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from pathflip_jax import storage
from pathflip_jax.data import instructions as ins
from pathflip_jax.evaluators import common, stats, text_metrics

RANDOM, NEAREST = "random_train_caption", "nearest_train_caption"


def write_predictions(workdir: str, name: str, split: str, rows: list[dict[str, Any]]) -> str:
  path = storage.join(workdir, "eval", f"{name}_{split}.jsonl")
  if jax.process_index() == 0:   # every process generated the same; one writes
    storage.write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
  return path


def memoized(metric: Callable[[np.ndarray], dict[str, float]]
             ) -> Callable[[np.ndarray], dict[str, float]]:
  """``metric`` remembering its value per resample: intervals and paired differences draw the
  same resamples, so each is computed once."""
  cache: dict[bytes, dict[str, float]] = {}

  def cached(idx: np.ndarray) -> dict[str, float]:
    key = np.asarray(idx, np.int64).tobytes()
    if key not in cache:
      cache[key] = metric(idx)
    return cache[key]

  return cached


def distinct(captions: Sequence[str]) -> np.ndarray:
  """Per caption, whether no other one is the same text (white space aside)."""
  texts = [" ".join(c.split()) for c in captions]
  counts: dict[str, int] = {}
  for t in texts:
    counts[t] = counts.get(t, 0) + 1
  return np.array([counts[t] == 1 for t in texts], np.float64)


def nearest_neighbours(query_qe: np.ndarray, gallery_ge: np.ndarray) -> np.ndarray:
  """Index of the gallery row of highest cosine with each query row."""
  def unit(x):
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  return np.argmax(unit(query_qe) @ unit(gallery_ge).T, axis=1)


class Evaluator(common.EvaluatorBase):

  def __init__(self, config: ml_collections.ConfigDict, task: Any, mesh: Mesh):
    super().__init__(config, task, mesh)
    self.items = task.eval_items(self.split, [ins.CAPTION])
    if not self.items:
      raise ValueError(f"config.evals.*.split={self.split!r}: no slides with a caption there")
    self.train = task.eval_items("train", [ins.CAPTION])
    if not self.train:
      raise ValueError("config.evals.*: the captioning baselines need training slides with a "
                       "caption (config.caption_prompt)")
    self.prompt_len = task.prompt_len(self.split, [ins.CAPTION])
    ids = task.slide_ids(self.split)
    self.slide_ids = [ids[i.slide] for i in self.items]
    meteor = (text_metrics.Meteor("config.evals.*.meteor") if config.get("meteor", False)
              else None)
    self.corpus = text_metrics.CaptionCorpus([[i.answer_text] for i in self.items], meteor)
    self.keys = text_metrics.CAPTION_METRICS + (("meteor",) if meteor else ())
    self.nearest = self._nearest_train()
    # The baselines do not depend on the model: scored at the first run, kept for the others.
    self._baselines: dict[str, Callable[[np.ndarray], dict[str, float]]] | None = None
    self._baseline_results: dict[str, float] = {}

  def _nearest_train(self) -> tuple[list[str], list[str]] | None:
    """(caption, slide id) of the nearest training slide of each evaluated slide; None when the
    task has no visual tokens (a question-only run)."""
    visual = self.task.visual
    test = [visual[self.split][i.slide]["tokens"] for i in self.items]
    train = [visual["train"][i.slide]["tokens"] for i in self.train]
    if any(len(t) == 0 for t in test + train):
      print(f"[{self.name}] no visual tokens: no nearest-neighbour caption baseline",
            file=sys.stderr)
      return None
    best = nearest_neighbours(np.stack([t[0] for t in test]), np.stack([t[0] for t in train]))
    train_ids = self.task.slide_ids("train")
    return ([self.train[j].answer_text for j in best],
            [train_ids[self.train[j].slide] for j in best])

  def _baseline_sets(self) -> dict[str, list[list[str]]]:
    texts = [i.answer_text for i in self.train]
    rng = np.random.default_rng(0)
    draws = int(self.config.get("baseline_draws", 20))
    if draws < 1:
      raise ValueError(f"config.evals.*.baseline_draws={draws}: must be at least 1")
    sets = {RANDOM: [[str(t) for t in rng.choice(texts, len(self.items))]
                     for _ in range(draws)]}
    if self.nearest is not None:
      sets[NEAREST] = [self.nearest[0]]
    return sets

  def run(self, model: nnx.Module) -> dict[str, float]:
    c = self.config
    generated = self.task.generate(model, self.split, self.items, prompt_len=self.prompt_len,
                                   max_new_tokens=int(c.get("max_new_tokens", 256)),
                                   batch_size=int(c.get("batch_size", 8)),
                                   beams=int(c.get("beams", 1)))
    n = len(generated)
    first = self._baselines is None
    sets = {"model": [generated], **(self._baseline_sets() if first else {})}
    metrics = {name: memoized(fn) for name, fn in self.corpus.metrics(sets).items()}
    model_metric = metrics.pop("model")
    if first:
      self._baselines = metrics
      for name, metric in metrics.items():
        scored: dict[str, float] = {}
        stats.add_intervals(scored, metric, n)
        self._baseline_results.update({f"{name}/{k}": v for k, v in scored.items()})
      if self.nearest is not None:
        stats.add_interval(self._baseline_results, f"{NEAREST}/distinct_captions",
                           stats.mean_of(distinct(self.nearest[0])), n)

    result: dict[str, float] = {}
    stats.add_intervals(result, model_metric, n)
    unique = distinct(generated)
    stats.add_interval(result, "distinct_captions", stats.mean_of(unique), n)
    result.update(self._baseline_results)
    for name, metric in self._baselines.items():
      stats.add_intervals(result, stats.differences(
          model_metric, metric, {f"minus_{name}/{k}": k for k in self.keys}), n)
    result["num_captions"] = float(n)

    references = [i.answer_text for i in self.items]
    rows = [{"slide_id": s, "generated": g, "reference": r}
            for s, g, r in zip(self.slide_ids, generated, references)]
    path = write_predictions(self.task.workdir, self.name, self.split, rows)
    segments = self.corpus.segment_scores(generated)
    slide_rows = []
    for i, row in enumerate(rows):
      slide_rows.append({**row, "distinct": bool(unique[i]),
                         "rouge_l": float(segments["rouge_l"][i]),
                         "cider_d": float(segments["cider_d"][i])})
      if self.nearest is not None:
        slide_rows[-1].update({NEAREST: self.nearest[0][i],
                               "nearest_train_slide": self.nearest[1][i]})
    self.write_rows(slide_rows)
    for row in rows[:int(c.get("samples", 3))]:
      print(f"[{self.name}] {row['slide_id']}\n  generated: {row['generated']}\n  reference: "
            f"{row['reference']}", file=sys.stderr)
    print(f"[{self.name}] captions of {n} slides -> {path}", file=sys.stderr)
    return result
