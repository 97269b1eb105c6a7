"""95% bootstrap intervals over evaluation slides, and paired differences on the same slides.

Every evaluator metric is a function of a set of slides (a mean of per-slide values, or a corpus
score such as balanced accuracy or BLEU recomputed on the set). Its interval is the 2.5 and 97.5
percentiles of the metric over ``SAMPLES`` resamples of the slides with replacement; a
comparison of two models (or a model and a baseline) on the same slides is the difference of the
two metrics over the *same* resamples (paired bootstrap), so slide-to-slide variation common to
both cancels. Resamples are drawn from a fixed seed: the same slides give the same interval.

Result keys: ``<metric>`` (on all slides), ``<metric>/ci_low`` and ``<metric>/ci_high``
(:func:`add_interval`, or :func:`add_intervals` for several metrics of one resample);
``is_interval_key`` tells them apart. A paired difference is a metric of its own
(:func:`add_paired`: ``minus_<baseline>/<metric>`` by convention, with its interval).

Metrics of patches (patch-level evaluators) resample the slides the patches come from
(:func:`by_group`), so that patches of one slide, which are not independent, stay together.

Per-slide rows for comparisons across runs are written next to an evaluator's outputs as
``W/eval/<evaluator>_<split>_slides.jsonl`` (:func:`write_slide_rows`, :func:`read_slide_rows`).
"""

from __future__ import annotations

import json
from typing import Any, Callable, Sequence

import jax
import numpy as np

from pathflip_jax import storage

SAMPLES = 1000
LEVEL = 0.95
CI_LOW, CI_HIGH = "/ci_low", "/ci_high"

Metric = Callable[[np.ndarray], float]   # slide indices (with repeats) -> metric value


def is_interval_key(key: str) -> bool:
  return key.endswith(CI_LOW) or key.endswith(CI_HIGH)


def resamples(n: int, samples: int = SAMPLES, seed: int = 0) -> np.ndarray:
  """[samples, n] slide indices drawn with replacement (the same for the same n and seed)."""
  return np.random.default_rng([seed, n]).integers(0, n, size=(samples, n))


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
  values = values[np.isfinite(values)]
  if not len(values):
    return float("nan"), float("nan")
  tail = (1.0 - level) / 2.0 * 100.0
  low, high = np.percentile(values, [tail, 100.0 - tail])
  return float(low), float(high)


def interval(metric: Metric, n: int, *, samples: int = SAMPLES, seed: int = 0,
             level: float = LEVEL) -> tuple[float, float]:
  """Percentile bootstrap interval of ``metric`` over resamples of ``n`` slides; resamples
  where the metric is undefined (nan, e.g. an AUC of one class) are left out."""
  if n == 0:
    return float("nan"), float("nan")
  values = np.array([metric(idx) for idx in resamples(n, samples, seed)], np.float64)
  return _percentiles(values, level)


def paired_interval(metric_a: Metric, metric_b: Metric, n: int, *, samples: int = SAMPLES,
                    seed: int = 0, level: float = LEVEL) -> tuple[float, float, float]:
  """(a - b on all slides, interval low, high) of the difference of two metrics of the same
  ``n`` slides, both computed on each resample."""
  everything = np.arange(n)
  difference = float(metric_a(everything) - metric_b(everything)) if n else float("nan")
  if n == 0:
    return difference, float("nan"), float("nan")
  values = np.array([metric_a(idx) - metric_b(idx) for idx in resamples(n, samples, seed)],
                    np.float64)
  return (difference, *_percentiles(values, level))


def add_interval(out: dict[str, float], name: str, metric: Metric, n: int, **kw: Any) -> None:
  """``out[name]`` = the metric on all ``n`` slides, and its interval under ``name/ci_low``,
  ``name/ci_high``."""
  out[name] = float(metric(np.arange(n))) if n else float("nan")
  out[name + CI_LOW], out[name + CI_HIGH] = interval(metric, n, **kw)


def add_intervals(out: dict[str, float], metrics: Callable[[np.ndarray], dict[str, float]],
                  n: int, *, samples: int = SAMPLES, seed: int = 0, level: float = LEVEL) -> None:
  """:func:`add_interval` for several metrics computed together on each resample (one pass over
  the resamples: the metrics share their work, e.g. recall at several k of one ranking).
  ``metrics(idx)`` returns the same keys for every resample; a key missing from one counts as
  nan there."""
  if n == 0:
    return
  point = {k: float(v) for k, v in metrics(np.arange(n)).items()}
  values = {k: np.full(samples, np.nan) for k in point}
  for r, idx in enumerate(resamples(n, samples, seed)):
    for k, v in metrics(idx).items():
      if k in values:
        values[k][r] = v
  for k, v in point.items():
    out[k] = v
    out[k + CI_LOW], out[k + CI_HIGH] = _percentiles(values[k], level)


def add_paired(out: dict[str, float], name: str, metric_a: Metric, metric_b: Metric, n: int,
               **kw: Any) -> None:
  """``out[name]`` = a - b on all ``n`` slides and its paired interval (``name/ci_low``,
  ``name/ci_high``)."""
  out[name], out[name + CI_LOW], out[name + CI_HIGH] = paired_interval(metric_a, metric_b, n,
                                                                       **kw)


def differences(metrics_a: Callable[[np.ndarray], dict[str, float]],
                metrics_b: Callable[[np.ndarray], dict[str, float]],
                names: dict[str, str]) -> Callable[[np.ndarray], dict[str, float]]:
  """The dict metric {name: a[key] - b[key]} for ``names`` {name: key}: given to
  :func:`add_intervals`, paired differences of several metrics from one pass over the
  resamples (a and b see the same resample)."""

  def metric(idx: np.ndarray) -> dict[str, float]:
    a, b = metrics_a(idx), metrics_b(idx)
    return {name: float(a.get(key, np.nan)) - float(b.get(key, np.nan))
            for name, key in names.items()}

  return metric


def group_members(groups: Sequence[Any]) -> tuple[Callable[[np.ndarray], np.ndarray], int]:
  """(group indices -> the indices of their items, number of groups): a resample of groups
  (slides) takes every item (patch) of each drawn group, as often as the group is drawn.
  Groups are numbered in sorted order of their names."""
  _, inverse = np.unique(np.asarray(groups), return_inverse=True)
  inverse = inverse.reshape(-1)
  order = np.argsort(inverse, kind="stable")
  counts = np.bincount(inverse)
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
  members = [order[s:s + c] for s, c in zip(starts, counts)]

  def items(idx: np.ndarray) -> np.ndarray:
    chosen = [members[i] for i in idx]
    return np.concatenate(chosen) if chosen else np.zeros((0,), np.int64)

  return items, len(members)


def by_group(metric: Metric, groups: Sequence[Any]) -> tuple[Metric, int]:
  """A metric of items (patches) as a metric of their groups (slides): (metric of group
  indices, number of groups)."""
  items, count = group_members(groups)
  return (lambda idx: metric(items(idx))), count


def mean_of(values: Sequence[float]) -> Metric:
  """The metric "mean of per-slide values" (nan values, slides where it is undefined, are left
  out of each mean)."""
  array = np.asarray(values, np.float64)

  def metric(idx: np.ndarray) -> float:
    chosen = array[idx]
    chosen = chosen[np.isfinite(chosen)]
    return float(chosen.mean()) if len(chosen) else float("nan")

  return metric


def slide_rows_path(output_dir: str, evaluator: str, split: str) -> str:
  return storage.join(output_dir, f"{evaluator}_{split}_slides.jsonl")


def write_slide_rows(output_dir: str, evaluator: str, split: str,
                     rows: Sequence[dict[str, Any]]) -> str:
  """One JSON row per evaluated slide (``slide_id`` first), for paired comparisons across runs."""
  path = slide_rows_path(output_dir, evaluator, split)
  if jax.process_index() == 0:   # every process evaluated the same slides; one writes
    storage.makedirs(output_dir)
    storage.write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
  return path


def read_slide_rows(output_dir: str, evaluator: str, split: str) -> list[dict[str, Any]]:
  path = slide_rows_path(output_dir, evaluator, split)
  if not storage.exists(path):
    raise FileNotFoundError(f"{path} not found: the run has no per-slide rows of evaluator "
                            f"{evaluator!r} on split {split!r} (evaluate it first)")
  return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]
