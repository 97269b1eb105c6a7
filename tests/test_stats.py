"""Bootstrap intervals over slides (evaluators.stats): coverage on a known distribution, paired
differences, undefined resamples, grouped resampling, and the per-slide rows."""

import math

import numpy as np
import pytest

from pathflip_jax.evaluators import stats


def test_interval_covers_the_true_mean_at_about_the_nominal_rate():
  # 300 samples of 60 "slides" from an exponential of mean 1 (skewed, as per-slide metrics
  # often are): the 95% interval should hold the true mean about 95% of the time (the
  # percentile bootstrap runs a little short at this size).
  rng = np.random.default_rng(0)
  trials, covered, widths = 300, 0, []
  for _ in range(trials):
    values = rng.exponential(1.0, size=60)
    low, high = stats.interval(stats.mean_of(values), len(values), samples=400)
    covered += low <= 1.0 <= high
    widths.append(high - low)
  assert 0.89 <= covered / trials <= 0.99
  # The width is that of a normal interval of the mean: 2 x 1.96 x sd / sqrt(n).
  assert np.mean(widths) == pytest.approx(2 * 1.96 / math.sqrt(60), rel=0.12)


def test_interval_is_deterministic_and_narrows_with_more_slides():
  values = np.random.default_rng(1).normal(size=200)
  metric = stats.mean_of(values)
  assert stats.interval(metric, 200) == stats.interval(metric, 200)
  wide = stats.interval(stats.mean_of(values[:20]), 20)
  narrow = stats.interval(metric, 200)
  assert narrow[1] - narrow[0] < wide[1] - wide[0]


def test_paired_interval_of_identical_metrics_is_zero():
  values = np.random.default_rng(2).random(50)
  metric = stats.mean_of(values)
  assert stats.paired_interval(metric, metric, 50) == (0.0, 0.0, 0.0)
  # A constant shift is a difference with no spread at all: the slides' variation cancels.
  shifted = stats.mean_of(values + 0.1)
  difference, low, high = stats.paired_interval(shifted, metric, 50)
  assert difference == pytest.approx(0.1) and low == pytest.approx(0.1)
  assert high == pytest.approx(0.1)
  # Unpaired, each interval alone is wide and they overlap.
  a, b = stats.interval(shifted, 50), stats.interval(metric, 50)
  assert a[0] < b[1]


def test_undefined_resamples_are_left_out():
  # A metric undefined whenever slide 0 is drawn (like an AUC with one class present).
  values = np.arange(10, dtype=np.float64)

  def metric(idx):
    return float("nan") if (idx == 0).any() else float(values[idx].mean())

  low, high = stats.interval(metric, 10)
  assert np.isfinite(low) and np.isfinite(high)
  kept = [metric(idx) for idx in stats.resamples(10)]
  kept = np.array([v for v in kept if np.isfinite(v)])
  assert 0 < len(kept) < stats.SAMPLES
  np.testing.assert_allclose((low, high), np.percentile(kept, [2.5, 97.5]))
  assert stats.interval(lambda idx: float("nan"), 10) == pytest.approx(
      (float("nan"), float("nan")), nan_ok=True)
  # mean_of leaves out nan slides inside each mean.
  assert stats.mean_of([1.0, float("nan"), 3.0])(np.array([0, 1, 2])) == 2.0


def test_add_intervals_matches_add_interval_and_differences_pair():
  rng = np.random.default_rng(3)
  a, b = rng.random(40), rng.random(40)
  one: dict = {}
  stats.add_interval(one, "a", stats.mean_of(a), 40)
  both: dict = {}
  stats.add_intervals(both, lambda idx: {"a": a[idx].mean(), "b": b[idx].mean()}, 40)
  assert both["a"] == one["a"] and both["a/ci_low"] == one["a/ci_low"]
  assert both["a/ci_high"] == one["a/ci_high"] and "b/ci_high" in both
  assert stats.is_interval_key("a/ci_low") and not stats.is_interval_key("a")
  paired: dict = {}
  stats.add_paired(paired, "minus_b/x", stats.mean_of(a), stats.mean_of(b), 40)
  many: dict = {}
  stats.add_intervals(many, stats.differences(lambda i: {"x": a[i].mean()},
                                              lambda i: {"x": b[i].mean()},
                                              {"minus_b/x": "x"}), 40)
  assert paired == pytest.approx(many)
  assert paired["minus_b/x"] == pytest.approx(a.mean() - b.mean())
  empty: dict = {}
  stats.add_intervals(empty, lambda idx: {"a": 1.0}, 0)
  assert empty == {}


def test_grouped_resampling_keeps_a_slides_patches_together():
  groups = np.array(["s2", "s1", "s2", "s1", "s3"])
  items, count = stats.group_members(groups)
  assert count == 3
  assert sorted(items(np.array([1, 1])).tolist()) == [0, 0, 2, 2]     # s2 drawn twice
  # Patches of one slide agree with each other: the slide, not the patch, is the unit, so the
  # interval is as wide as with one value per slide.
  rng = np.random.default_rng(4)
  slide_values = rng.random(30)
  patches = np.repeat(slide_values, 20)
  slide_of = np.repeat(np.arange(30), 20)
  grouped, n = stats.by_group(stats.mean_of(patches), slide_of)
  by_slide = stats.interval(grouped, n)
  by_patch = stats.interval(stats.mean_of(patches), len(patches))
  per_slide = stats.interval(stats.mean_of(slide_values), 30)
  assert n == 30
  assert by_slide[1] - by_slide[0] == pytest.approx(per_slide[1] - per_slide[0], rel=0.15)
  assert by_patch[1] - by_patch[0] < 0.5 * (by_slide[1] - by_slide[0])


def test_slide_rows_round_trip(tmp_path):
  rows = [{"slide_id": "a", "label": 1, "scores": [0.1, 0.9]}, {"slide_id": "b", "label": 0,
                                                              "scores": [0.7, 0.3]}]
  path = stats.write_slide_rows(str(tmp_path / "eval"), "zero_shot", "test", rows)
  assert path.endswith("zero_shot_test_slides.jsonl")
  assert stats.read_slide_rows(str(tmp_path / "eval"), "zero_shot", "test") == rows
  with pytest.raises(FileNotFoundError, match="evaluator 'zero_shot' on split 'val'"):
    stats.read_slide_rows(str(tmp_path / "eval"), "zero_shot", "val")
