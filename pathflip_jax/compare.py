r"""Compares evaluated runs slide by slide: paired differences with 95% bootstrap intervals.

  python -m pathflip_jax.compare --model W/align --against W/align_no_region_loss \
      [--against W/...] [--split test] [--output table.md]
  python -m pathflip_jax.compare --seeds W/align W/align_seed1 W/align_seed2 [--output ...]

Reads the per-slide rows the evaluators wrote (``W/eval/<evaluator>_<split>_slides.jsonl``;
``evaluators.stats``), so the runs must have been evaluated on the same split. For each headline
metric (``METRICS``: lesion AUROC of the ``localization`` evaluator, zero-shot balanced accuracy
of ``slide_zero_shot``, slide-to-text R@1 of ``slide_retrieval``, and lesion Dice and FROC where
the rows have them; for instruct runs CIDEr-D, BLEU-4 and ROUGE-L of ``captioning`` and the
multiple-choice ranking accuracy and open-answer F1 of ``vqa``, whose questions are grouped by
slide) of the evaluators the model run has, the difference model minus each other run is
computed on the slides both evaluated, with the percentile interval of the same difference over
1000 resamples of those slides (paired bootstrap: what the slides share cancels). An interval
that excludes 0 says the difference is larger than the slide sample explains; it says nothing
of training noise, for which ``--seeds`` (``seed_summary``) gives the mean and spread of each
metric over runs of the same configuration trained with different seeds.

The evaluator of each type is found by its name in the run's ``config.json`` (``evals``),
else by the demo config's names. ``compare(model_dir, against_dirs, split)`` and
``seed_summary(dirs, split)`` return dicts; ``report.ablation_table`` and
``report.seed_table`` render them as Markdown.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Callable, Sequence

import numpy as np

from pathflip_jax.evaluators import metrics as metrics_lib, stats, text_metrics

Rows = list[dict[str, Any]]
MetricFn = Callable[[np.ndarray], float]

# The demo config's evaluator names, for runs whose config.json does not say.
DEFAULT_NAMES = {"localization": "localization", "slide_zero_shot": "zero_shot",
                 "slide_retrieval": "retrieval", "captioning": "captioning", "vqa": "vqa"}


def _values(rows: Rows, field: str, queries: Sequence[str]) -> np.ndarray:
  """[slides, queries] of a per-query field of localization rows (None -> nan)."""
  out = np.full((len(rows), len(queries)), np.nan)
  for s, row in enumerate(rows):
    for q, query in enumerate(queries):
      value = (row.get(field) or {}).get(query)
      if value is not None:
        out[s, q] = float(value)
  return out


def _lesion_mean(values_sq: np.ndarray) -> MetricFn:
  """Mean over queries (columns scored on some slide) of each query's mean over the slides."""
  scored = np.isfinite(values_sq).any(0)
  values_sq = values_sq[:, scored]

  def metric(idx: np.ndarray) -> float:
    chosen = values_sq[idx]
    per_query = [c[np.isfinite(c)].mean() for c in chosen.T if np.isfinite(c).any()]
    return float(np.mean(per_query)) if per_query else float("nan")

  return metric


def _lesions(rows: Rows) -> list[str]:
  return list(rows[0].get("lesions") or []) if rows else []


def lesion_auroc(rows: Rows) -> MetricFn | None:
  return _lesion_mean(_values(rows, "auroc", _lesions(rows))) if _lesions(rows) else None


def lesion_dice(rows: Rows) -> MetricFn | None:
  return _lesion_mean(_values(rows, "dice", _lesions(rows))) if _lesions(rows) else None


def lesion_froc(rows: Rows) -> MetricFn | None:
  """Mean FROC over the lesion queries, recomputed on each set of slides (None: no detections
  in the rows, the evaluator ran with ``froc=False``)."""
  from pathflip_jax.evaluators import localization  # pylint: disable=import-outside-toplevel
  if not rows or "froc_hits" not in rows[0]:
    return None
  scores = []
  for query in _lesions(rows):
    hits = [np.asarray(r["froc_hits"].get(query) or [], np.float64) for r in rows]
    if sum(len(h) for h in hits):
      fps = [np.asarray(r["froc_false_positives"].get(query) or [], np.float64) for r in rows]
      scores.append(localization.Froc(hits, fps))
  if not scores:
    return None
  return lambda idx: float(np.nanmean([score(idx) for score in scores]))


def zero_shot_balanced_accuracy(rows: Rows) -> MetricFn:
  labels = np.array([r["label"] for r in rows], np.int64)
  predicted = np.array([int(np.argmax(r["scores"])) for r in rows], np.int64)
  return lambda idx: metrics_lib.balanced_accuracy(labels[idx], predicted[idx])


def slide_to_text_r1(rows: Rows) -> MetricFn:
  hits = np.array([r["slide_to_text_rank"] <= 1 for r in rows], np.float64)
  return lambda idx: float(hits[idx].mean())


def caption_metric(name: str) -> Callable[[Rows], MetricFn]:
  """A corpus caption metric (``text_metrics.CAPTION_METRICS``) of the slides' generated
  captions against their references."""

  def build(rows: Rows) -> MetricFn:
    corpus = text_metrics.CaptionCorpus([[r["reference"]] for r in rows])
    scores = corpus.metrics({"run": [[r["generated"] for r in rows]]})["run"]
    return lambda idx: float(scores(idx)[name])

  return build


def question_mean(kind: str, field: str) -> Callable[[Rows], MetricFn | None]:
  """Mean of a per-question field (e.g. ``ranked_correct``) over the questions of one type on
  the chosen slides (rows grouped by slide: ``_by_slide``)."""

  def build(rows: Rows) -> MetricFn | None:
    values = [[float(q[field]) for q in r["questions"] if q.get("type") == kind]
              for r in rows]
    if not any(values):
      return None
    sums = np.array([sum(v) for v in values])
    counts = np.array([len(v) for v in values], np.float64)
    return lambda idx: float(sums[idx].sum() / max(counts[idx].sum(), 1.0))

  return build


@dataclasses.dataclass(frozen=True)
class Metric:
  key: str                                   # <evaluator type>/<metric>, as in results
  label: str
  evaluator_type: str
  build: Callable[[Rows], MetricFn | None]   # rows (one per slide) -> metric of slide indices


METRICS = (
    Metric("localization/mean_lesion_auroc", "lesion AUROC", "localization", lesion_auroc),
    Metric("slide_zero_shot/balanced_accuracy", "zero-shot diagnosis, balanced accuracy",
           "slide_zero_shot", zero_shot_balanced_accuracy),
    Metric("slide_retrieval/slide_to_text_r@1", "retrieval slide to text, R@1",
           "slide_retrieval", slide_to_text_r1),
    Metric("localization/mean_lesion_dice", "lesion Dice (threshold from val)", "localization",
           lesion_dice),
    Metric("localization/mean_lesion_froc", "lesion FROC", "localization", lesion_froc),
    Metric("captioning/cider_d", "captions, CIDEr-D", "captioning", caption_metric("cider_d")),
    Metric("captioning/bleu_4", "captions, BLEU-4", "captioning", caption_metric("bleu_4")),
    Metric("captioning/rouge_l", "captions, ROUGE-L", "captioning", caption_metric("rouge_l")),
    Metric("vqa/mc/ranked_accuracy", "VQA multiple choice, option-ranking accuracy", "vqa",
           question_mean("multiple_choice", "ranked_correct")),
    Metric("vqa/open/f1", "VQA open questions, token F1", "vqa", question_mean("open", "f1")),
)


def _by_slide(rows: Rows) -> Rows:
  """Per-question rows (vqa) as one row per slide holding its questions in a fixed order, so
  that slides are what the bootstrap resamples and runs pair on."""
  grouped: dict[str, Rows] = {}
  for row in rows:
    grouped.setdefault(row["slide_id"], []).append(row)
  return [{"slide_id": slide, "questions": sorted(questions, key=lambda q: (
      q.get("type", ""), q.get("question", ""), json.dumps(q.get("options"), sort_keys=True)))}
          for slide, questions in grouped.items()]


def metrics_of(run_dir: str) -> list[Metric]:
  """The metrics of the evaluators a run has (its config.json's ``evals``; all without one)."""
  path = os.path.join(run_dir, "config.json")
  if not os.path.exists(path):
    return list(METRICS)
  with open(path) as f:
    evals = json.load(f).get("evals") or {}
  types = {c.get("type") for c in evals.values() if isinstance(c, dict)}
  return [m for m in METRICS if m.evaluator_type in types]


def evaluator_name(run_dir: str, evaluator_type: str) -> str:
  """The name of the run's evaluator of a type (its config.json's ``evals``), else the demo
  config's."""
  path = os.path.join(run_dir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      evals = json.load(f).get("evals") or {}
    for name, config in evals.items():
      if isinstance(config, dict) and config.get("type") == evaluator_type:
        return name
  return DEFAULT_NAMES[evaluator_type]


def _rows(run_dir: str, evaluator_type: str, split: str) -> Rows | None:
  name = evaluator_name(run_dir, evaluator_type)
  path = stats.slide_rows_path(os.path.join(run_dir, "eval"), name, split)
  if not os.path.exists(path):
    return None
  rows = stats.read_slide_rows(os.path.join(run_dir, "eval"), name, split)
  return _by_slide(rows) if evaluator_type == "vqa" else rows


def _paired(model_rows: Rows, other_rows: Rows, metric: Metric
            ) -> tuple[dict[str, float] | None, str]:
  """The paired difference on the slides both runs evaluated, or (None, why not)."""
  other_by_id = {r["slide_id"]: r for r in other_rows}
  common = [r for r in model_rows if r["slide_id"] in other_by_id]
  if not common:
    return None, "no slide in common"
  mine, theirs = metric.build(common), metric.build([other_by_id[r["slide_id"]] for r in common])
  if mine is None or theirs is None:
    return None, "not in the rows of both runs"
  n = len(common)
  everything = np.arange(n)
  difference, low, high = stats.paired_interval(mine, theirs, n)
  return {"model": mine(everything), "other": theirs(everything), "difference": difference,
          "ci_low": low, "ci_high": high, "num_slides": float(n)}, ""


def compare(model_dir: str, against_dirs: Sequence[str], split: str = "test"
            ) -> dict[str, Any]:
  """Paired differences model minus each run of ``against_dirs`` for every metric of
  ``METRICS`` their rows have: {"model", "split", "rows": [{metric, label, against, model,
  other, difference, ci_low, ci_high, num_slides}], "missing": [why a comparison is absent]}."""
  rows, missing = [], []
  cache: dict[tuple[str, str], Rows | None] = {}

  def read(run_dir: str, evaluator_type: str) -> Rows | None:
    if (run_dir, evaluator_type) not in cache:
      cache[(run_dir, evaluator_type)] = _rows(run_dir, evaluator_type, split)
    return cache[(run_dir, evaluator_type)]

  for other in against_dirs:
    for metric in metrics_of(model_dir):
      mine, theirs = read(model_dir, metric.evaluator_type), read(other, metric.evaluator_type)
      if mine is None or theirs is None:
        absent = [d for d, r in ((model_dir, mine), (other, theirs)) if r is None]
        missing.append(f"{metric.key}: no per-slide rows of {metric.evaluator_type} on split "
                       f"{split!r} in {', '.join(absent)}")
        continue
      values, why = _paired(mine, theirs, metric)
      if values is None:
        missing.append(f"{metric.key} against {other}: {why}")
        continue
      rows.append({"metric": metric.key, "label": metric.label, "against": other, **values})
  return {"model": model_dir, "split": split, "rows": rows, "missing": missing}


def compare_over_seeds(model_dirs: Sequence[str], against: dict[str, Sequence[str]],
                       split: str = "test") -> dict[str, Any]:
  """Paired differences averaged over training seeds: ``model_dirs[k]`` and each
  ``against[name][k]`` are runs of seed k. On every resample of the slides all runs evaluated,
  the difference is the mean over seeds of (model_k's metric minus the other run_k's), so the
  interval holds both the slides' and the seeds' variation of the mean difference. Same output
  as :func:`compare` (``against`` holds the name; ``seeds`` the number of seed pairs), which
  ``report.ablation_table`` renders."""
  rows, missing = [], []
  for name, other_dirs in against.items():
    if len(other_dirs) != len(model_dirs):
      raise ValueError(f"{name}: {len(other_dirs)} runs against {len(model_dirs)} of the model "
                       "(one per seed each)")
    for metric in metrics_of(model_dirs[0]):
      runs = [(_rows(m, metric.evaluator_type, split), _rows(o, metric.evaluator_type, split))
              for m, o in zip(model_dirs, other_dirs)]
      if any(a is None or b is None for a, b in runs):
        missing.append(f"{metric.key} against {name}: per-slide rows missing in some seed")
        continue
      common = set.intersection(*[{r["slide_id"] for r in rows}
                                  for pair in runs for rows in pair])
      if not common:
        missing.append(f"{metric.key} against {name}: no slide in common")
        continue
      order = sorted(common)
      fns = []
      for mine, theirs in runs:
        by_id_m, by_id_t = ({r["slide_id"]: r for r in mine}, {r["slide_id"]: r for r in theirs})
        fns.append((metric.build([by_id_m[s] for s in order]),
                    metric.build([by_id_t[s] for s in order])))
      if any(a is None or b is None for a, b in fns):
        missing.append(f"{metric.key} against {name}: not in the rows of every run")
        continue
      model_mean = lambda idx, fns=fns: float(np.mean([a(idx) for a, _ in fns]))  # noqa: E731
      other_mean = lambda idx, fns=fns: float(np.mean([b(idx) for _, b in fns]))  # noqa: E731
      n = len(order)
      difference, low, high = stats.paired_interval(model_mean, other_mean, n)
      everything = np.arange(n)
      rows.append({"metric": metric.key, "label": metric.label, "against": name,
                   "model": model_mean(everything), "other": other_mean(everything),
                   "difference": difference, "ci_low": low, "ci_high": high,
                   "num_slides": float(n), "seeds": float(len(fns))})
  return {"model": ", ".join(model_dirs), "split": split, "rows": rows, "missing": missing}


def seed_summary(dirs: Sequence[str], split: str = "test") -> dict[str, Any]:
  """Mean and spread over runs (seeds of one configuration) of each metric of ``METRICS``
  their rows have: {"runs", "split", "metrics": {key: {label, mean, std (ddof 1; nan for one
  run), min, max, runs, values}}}."""
  out: dict[str, Any] = {"runs": list(dirs), "split": split, "metrics": {}}
  for metric in METRICS:
    values = []
    for run_dir in dirs:
      rows = _rows(run_dir, metric.evaluator_type, split)
      fn = metric.build(rows) if rows else None
      values.append(fn(np.arange(len(rows))) if fn is not None else float("nan"))
    array = np.array(values, np.float64)
    finite = array[np.isfinite(array)]
    if not len(finite):
      continue
    out["metrics"][metric.key] = {
        "label": metric.label, "mean": float(finite.mean()),
        "std": float(finite.std(ddof=1)) if len(finite) > 1 else float("nan"),
        "min": float(finite.min()), "max": float(finite.max()), "runs": float(len(finite)),
        "values": [float(v) for v in array]}
  return out


def main(argv: Sequence[str] | None = None) -> str:
  parser = argparse.ArgumentParser(prog="python -m pathflip_jax.compare",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="", help="the run whose metrics come first")
  parser.add_argument("--against", action="extend", nargs="+", default=[],
                      help="runs to subtract from --model (repeatable)")
  parser.add_argument("--seeds", nargs="+", default=[],
                      help="runs of one configuration with different seeds: mean and spread")
  parser.add_argument("--split", default="test", help="the split the runs were evaluated on")
  parser.add_argument("--output", default="", help="also write the Markdown here")
  args = parser.parse_args(argv)
  if not args.seeds and not (args.model and args.against):
    parser.error("give --model and --against, or --seeds")
  from pathflip_jax import report  # pylint: disable=import-outside-toplevel
  lines = []
  try:
    if args.model and args.against:
      lines += report.ablation_table(compare(args.model, args.against, args.split))
    if args.seeds:
      lines += report.seed_table(seed_summary(args.seeds, args.split))
  except (FileNotFoundError, ValueError, KeyError) as e:
    raise SystemExit(f"[compare] {e}") from None
  text = "\n".join(lines)
  if args.output:
    with open(args.output, "w") as f:
      f.write(text + "\n")
  print(text)
  return text


if __name__ == "__main__":
  main(sys.argv[1:])
