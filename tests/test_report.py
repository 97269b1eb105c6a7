"""pathflip_jax.report and docs/results.py: every metric a run wrote, beside its baseline, in
REPORT.md and in the results page that names the run; pathflip_jax.compare's paired differences
across runs and spread over seeds, and their tables."""

import importlib.util
import json
import pathlib

import numpy as np
import pytest

from pathflip_jax import report

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"


def _workdir(tmp_path):
  """A quickstart workdir as its stages leave it, with numbers chosen to be recognisable."""
  results = {
      "patch_clip": {"zero_shot/balanced_accuracy": 0.611, "zero_shot/chance_balanced_accuracy":
                     0.2, "linear_probe/accuracy": 0.912, "linear_probe/colour_mean_accuracy":
                     0.833},
      "align": {"zero_shot/balanced_accuracy": 0.437, "zero_shot/chance_balanced_accuracy": 0.25,
                "retrieval/slide_to_text_r@1": 0.321, "retrieval/chance_r@1": 0.077,
                "localization/auroc/tumour": 0.871, "localization/num_slides/tumour": 10.0,
                "localization/mean_lesion_auroc": 0.654},
      "instruct": {"captioning/bleu_1": 0.543, "captioning/random_train_caption/bleu_1": 0.512,
                   "vqa/mc/accuracy": 0.667, "vqa/mc/best_single_letter_accuracy": 0.289},
  }
  for stage, values in results.items():
    (tmp_path / stage).mkdir()
    (tmp_path / stage / "results.json").write_text(json.dumps(values))
  (tmp_path / "timings.json").write_text(json.dumps({"seconds": {"cohort": 12.0, "align": 75.0},
                                                     "total_seconds": 87.0}))
  return tmp_path


def test_report_puts_each_metric_beside_its_baseline(tmp_path):
  text = report.render(str(_workdir(tmp_path)), examples=[])
  assert text.startswith("# PathFLIP quickstart report")
  for row in ("| balanced accuracy (chance) | 0.437 | 0.250 |",
              "| slide to text R@1 | 0.321 | 0.077 |",
              "| tumour | 0.871 | – | – | 10 |",
              "| **lesions (mean)** | 0.654 | – | – | – |",
              "| BLEU-1 | 0.543 | 0.512 |",
              "| **all** | – | 0.289 | – | – | 0.667 |",
              "| linear probe accuracy (baseline: same probe on colour means) | 0.912 | 0.833 |"):
    assert row in text, row
  # A metric the run did not write has no row (no made-up value).
  assert "R@5" not in text and "## Biomarker" not in text
  assert "cohort 12, align 75; 87 in all" in text
  assert report.render(str(tmp_path), examples=[], title="").startswith("## Patch encoder")


def test_results_page_names_its_run(tmp_path):
  workdir = _workdir(tmp_path)
  spec = importlib.util.spec_from_file_location("docs_results", DOCS / "results.py")
  results = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(results)
  (workdir / "run.json").write_text(json.dumps({
      "command": "python -m pathflip_jax.quickstart --workdir W", "started": "2026-12-07T21:00",
      "git_commit": "abc123", "git_dirty": False,
      "machine": {"cpu": "AMD EPYC", "cores": 2, "memory_gib": 23.5, "platform": "Linux"},
      "jax": {"version": "0.10.2", "backend": "cpu", "devices": 1, "device_kind": "cpu"},
      "earlier": [{"started": "2026-12-07T20:00", "git_commit": "fed987", "git_dirty": True}]}))
  text = results.render(str(workdir))
  assert text.startswith("# Results")
  for line in ("- command: `python -m pathflip_jax.quickstart --workdir W`",
               "- code: git abc123", "- machine: AMD EPYC, 2 cores, 23.5 GiB; Linux",
               "- resumed: 1 earlier invocation(s) ran some stages first:",
               "  - started 2026-12-07T20:00, git fed987 with uncommitted changes",
               "| balanced accuracy (chance) | 0.437 | 0.250 |"):
    assert line in text, line
  assert "# PathFLIP quickstart report" not in text
  (workdir / "run.json").unlink()
  try:
    results.render(str(workdir))
  except SystemExit as e:
    assert "no run.json" in str(e)
  else:
    raise AssertionError("a workdir without run.json must not give a results page")


def test_report_shows_intervals_baselines_and_paired_differences(tmp_path):
  workdir = _workdir(tmp_path)
  align = json.loads((workdir / "align" / "results.json").read_text())
  align.update({
      "zero_shot/balanced_accuracy/ci_low": 0.301, "zero_shot/balanced_accuracy/ci_high": 0.562,
      "zero_shot/reference/balanced_accuracy": 0.512,
      "zero_shot/reference/balanced_accuracy/ci_low": 0.4,
      "zero_shot/reference/balanced_accuracy/ci_high": 0.6,
      "zero_shot/minus_reference/balanced_accuracy": -0.075,
      "zero_shot/minus_reference/balanced_accuracy/ci_low": -0.2,
      "zero_shot/minus_reference/balanced_accuracy/ci_high": 0.05,
      "mil/balanced_accuracy": 0.9, "mil/balanced_accuracy/ci_low": 0.8,
      "mil/balanced_accuracy/ci_high": 1.0,
      "localization/auroc/tumour/ci_low": 0.8, "localization/auroc/tumour/ci_high": 0.93,
      "localization/dice/tumour": 0.5, "localization/dice_threshold/tumour": 0.35,
      "localization/minus_reference/mean_lesion_auroc": 0.1,
      "localization/minus_reference/mean_lesion_auroc/ci_low": float("nan"),
      "localization/minus_reference/mean_lesion_auroc/ci_high": float("nan")})
  (workdir / "align" / "results.json").write_text(json.dumps(align))
  text = report.render(str(workdir), examples=[])
  for row in ("| balanced accuracy (chance) | 0.437 [0.301, 0.562] | 0.250 |",
              "| balanced accuracy (baseline: the patch encoder's own text alignment, mean-pooled "
              "patches) | 0.437 [0.301, 0.562] | 0.512 [0.400, 0.600] |",
              "| balanced accuracy (baseline: attention-MIL trained on the diagnosis labels) | "
              "0.437 [0.301, 0.562] | 0.900 [0.800, 1.000] |",
              "| balanced accuracy: model − the patch encoder's own text alignment | "
              "-0.075 [-0.200, +0.050] |",
              "| query | AUROC | Dice (threshold from val) | FROC | slides |",
              "| tumour | 0.871 [0.800, 0.930] | 0.500 | – | 10 |",
              # An interval that is undefined is left out, not printed as nan.
              "| mean lesion AUROC: model − the patch encoder's own text alignment | +0.100 |",
              "Brackets hold 95% bootstrap intervals"):
    assert row in text, row
  assert "ci_low" not in text and "ci high" not in text


def test_report_states_the_papers_claims_from_paired_differences(tmp_path):
  """Captions against the nearest-neighbour caption, VQA ranking against the question-only and
  shuffled baselines per category, each ablation on the headline metrics: a verdict read off
  each interval."""
  workdir = _workdir(tmp_path)
  instruct = json.loads((workdir / "instruct" / "results.json").read_text())

  def difference(key, value, low, high):
    instruct.update({key: value, key + "/ci_low": low, key + "/ci_high": high})

  difference("captioning/minus_nearest_train_caption/cider_d", 0.2, 0.05, 0.35)
  for category, low in (("location", 0.1), ("size", -0.02)):
    instruct[f"vqa/mc/ranked_accuracy/{category}"] = 0.9
    instruct[f"vqa/question_only/mc/ranked_accuracy/{category}"] = 0.3
    difference(f"vqa/minus_question_only/mc/ranked_accuracy/{category}", 0.6, 0.5, 0.7)
    difference(f"vqa/minus_shuffled_visual/mc/ranked_accuracy/{category}", 0.1, low, 0.2)
  (workdir / "instruct" / "results.json").write_text(json.dumps(instruct))
  # Ablation runs as the quickstart names them: what they switch off.
  comparison = {"model": "a", "split": "test", "missing": [], "rows": [
      {"metric": "localization/mean_lesion_auroc", "label": "lesion AUROC", "against": name,
       "model": 0.8, "other": 0.7, "difference": 0.1, "ci_low": low, "ci_high": 0.2,
       "num_slides": 40.0}
      for name, low in (("no_region_loss", 0.02), ("no_slide_qformer", -0.01))]}
  text = report.render(str(workdir), examples=[], comparison=comparison)
  for row in ("| captions beat the nearest-neighbour caption on CIDEr-D | holds | "
              "+0.200 [+0.050, +0.350] |",
              "| VQA option ranking beats the question-only decoder in every category | holds | "
              "location +0.600 [+0.500, +0.700]; size +0.600 [+0.500, +0.700] |",
              "| VQA option ranking beats shuffled visual tokens in every category | does not "
              "hold |",
              "| the full model beats `region_loss=False` on lesion AUROC, zero-shot or R@1 | "
              "holds | lesion AUROC +0.100 [+0.020, +0.200] |",
              "| the full model beats `slide_qformer=False` on lesion AUROC, zero-shot or R@1 | "
              "does not hold |",
              "| location | 0.900 | – | 0.300 | – | – |"):
    assert row in text, row
  # Nothing measured, no claims section.
  (tmp_path / "bare").mkdir()
  assert "claims" not in report.render(str(_workdir(tmp_path / "bare")), examples=[])


def _fake_run(directory, zero_shot_right, retrieval_ranks, aurocs, name="zero_shot"):
  """A run as its evaluators leave it: config.json naming the evaluators, per-slide rows."""
  from pathflip_jax.evaluators import stats
  eval_dir = directory / "eval"
  directory.mkdir(parents=True)
  (directory / "config.json").write_text(json.dumps({"evals": {
      name: {"type": "slide_zero_shot"}, "retrieval": {"type": "slide_retrieval"},
      "localization": {"type": "localization"}}}))
  ids = [f"s{i}" for i in range(len(aurocs))]
  stats.write_slide_rows(str(eval_dir), name, "test", [
      {"slide_id": sid, "label": i % 2,
       "scores": [1.0, 0.0] if (i % 2 == 0) == bool(right) else [0.0, 1.0]}
      for i, (sid, right) in enumerate(zip(ids, zero_shot_right))])
  stats.write_slide_rows(str(eval_dir), "retrieval", "test", [
      {"slide_id": sid, "slide_to_text_rank": rank, "text_to_slide_rank": rank}
      for sid, rank in zip(ids, retrieval_ranks)])
  stats.write_slide_rows(str(eval_dir), "localization", "test", [
      {"slide_id": sid, "auroc": {"tumour": a, "necrosis": None}, "dice": {"tumour": 0.5},
       "lesions": ["tumour", "necrosis"]} for sid, a in zip(ids, aurocs)])
  return str(directory)


def test_compare_pairs_runs_slide_by_slide(tmp_path):
  from pathflip_jax import compare
  rng = np.random.default_rng(0)
  n = 40
  base_auroc = rng.uniform(0.5, 0.9, size=n)
  model = _fake_run(tmp_path / "align", [1] * 30 + [0] * 10, [1] * 20 + [3] * 20,
                    base_auroc + 0.05, name="zs")
  other = _fake_run(tmp_path / "align_no_region_loss", [1] * 20 + [0] * 20, [1] * 20 + [3] * 20,
                    base_auroc)
  result = compare.compare(model, [other, model], "test")
  rows = {(r["metric"], r["against"]): r for r in result["rows"]}
  auroc = rows[("localization/mean_lesion_auroc", other)]
  # A shift of 0.05 on every slide: the paired interval has no width, though each run's own
  # values spread over 0.5-0.9.
  assert auroc["difference"] == pytest.approx(0.05)
  assert auroc["ci_low"] == pytest.approx(0.05) and auroc["ci_high"] == pytest.approx(0.05)
  assert auroc["model"] == pytest.approx(base_auroc.mean() + 0.05) and auroc["num_slides"] == n
  zero_shot = rows[("slide_zero_shot/balanced_accuracy", other)]
  assert zero_shot["difference"] == pytest.approx(0.25) and zero_shot["ci_low"] > 0.0
  recall = rows[("slide_retrieval/slide_to_text_r@1", other)]
  assert (recall["difference"], recall["ci_low"], recall["ci_high"]) == (0.0, 0.0, 0.0)
  same = rows[("slide_zero_shot/balanced_accuracy", model)]
  assert (same["difference"], same["ci_low"], same["ci_high"]) == (0.0, 0.0, 0.0)
  # No FROC detections in these rows: said, not made up.
  assert not any(r["metric"] == "localization/mean_lesion_froc" for r in result["rows"])
  assert any("mean_lesion_froc" in m for m in result["missing"])

  # Only the slides both runs evaluated are paired.
  partial = _fake_run(tmp_path / "partial", [1] * 10, [1] * 10, base_auroc[:10])
  rows = {r["metric"]: r for r in compare.compare(model, [partial])["rows"]}
  assert rows["localization/mean_lesion_auroc"]["num_slides"] == 10

  lines = report.ablation_table(result)
  text = "\n".join(lines)
  assert "| lesion AUROC | `" + other + "` | " in text
  assert "| +0.050 [+0.050, +0.050] | 40 |" in text
  assert "Not compared:" in text

  out = tmp_path / "table.md"
  printed = compare.main(["--model", model, "--against", other, "--seeds", model, other,
                          "--output", str(out)])
  assert out.read_text().strip() == printed.strip()
  assert "model − run [95% interval]" in printed and "| metric | mean | sd |" in printed
  with pytest.raises(SystemExit):
    compare.main(["--model", model])                # nothing to compare against
  # A run that was never evaluated: every comparison missing, each said why.
  missing = compare.compare(model, [str(tmp_path / "nowhere")])
  assert not missing["rows"] and len(missing["missing"]) == len(compare.metrics_of(model)) == 5
  assert "no per-slide rows of slide_zero_shot on split 'test'" in missing["missing"][1]


def _fake_instruct_run(directory, captions, right):
  """An instruct run's per-slide caption rows and per-question VQA rows (two questions a
  slide; ``right[i]``: how many of slide i's the ranking got right)."""
  from pathflip_jax.evaluators import stats
  directory.mkdir(parents=True)
  (directory / "config.json").write_text(json.dumps({"evals": {
      "captioning": {"type": "captioning"}, "vqa": {"type": "vqa"}}}))
  references = [f"tumour in the centre and fat on the left side {i}" for i in range(len(right))]
  stats.write_slide_rows(str(directory / "eval"), "captioning", "test", [
      {"slide_id": f"s{i}", "generated": c, "reference": r}
      for i, (c, r) in enumerate(zip(captions, references))])
  stats.write_slide_rows(str(directory / "eval"), "vqa", "test", [
      {"slide_id": f"s{i}", "type": "multiple_choice", "question": q, "options": {"A": "x"},
       "ranked_correct": k < r} for i, r in enumerate(right) for k, q in enumerate("ab")] + [
      {"slide_id": f"s{i}", "type": "open", "question": "c", "f1": 0.5}
      for i in range(len(right))])
  return str(directory)


def test_compare_instruct_runs_on_captions_and_questions(tmp_path):
  """Caption metrics and VQA accuracy are compared slide by slide (a slide's questions
  together); an align metric is not asked of an instruct run."""
  from pathflip_jax import compare
  from pathflip_jax.evaluators import text_metrics
  n = 30
  good = [f"tumour in the centre and fat on the left side {i}" for i in range(n)]
  model = _fake_instruct_run(tmp_path / "smollm2", good, [2] * 20 + [1] * 10)
  other = _fake_instruct_run(tmp_path / "scratch", ["fat"] * n, [1] * 30)
  result = compare.compare(model, [other])
  assert not result["missing"]
  rows = {r["metric"]: r for r in result["rows"]}
  assert set(rows) == {m.key for m in compare.METRICS if m.evaluator_type in (
      "captioning", "vqa")}
  vqa = rows["vqa/mc/ranked_accuracy"]
  assert vqa["model"] == pytest.approx(50 / 60) and vqa["other"] == pytest.approx(0.5)
  assert vqa["difference"] == pytest.approx(20 / 60) and vqa["ci_low"] > 0
  assert rows["vqa/open/f1"]["difference"] == 0.0
  corpus = text_metrics.CaptionCorpus([[c] for c in good])
  expected = corpus.metrics({"m": [["fat"] * n]})["m"](np.arange(n))["cider_d"]
  assert rows["captioning/cider_d"]["other"] == pytest.approx(expected)
  assert rows["captioning/cider_d"]["difference"] > 0 and rows["captioning/cider_d"]["ci_low"] > 0


def test_seed_summary_gives_mean_and_spread(tmp_path):
  from pathflip_jax import compare
  runs = [_fake_run(tmp_path / f"seed{s}", [1] * 10, [1] * (5 + s) + [2] * (5 - s),
                    [0.6 + 0.1 * s] * 10) for s in range(3)]
  summary = compare.seed_summary(runs)
  auroc = summary["metrics"]["localization/mean_lesion_auroc"]
  assert auroc["mean"] == pytest.approx(0.7) and auroc["std"] == pytest.approx(0.1)
  assert auroc["min"] == pytest.approx(0.6) and auroc["runs"] == 3
  recall = summary["metrics"]["slide_retrieval/slide_to_text_r@1"]
  assert recall["values"] == pytest.approx([0.5, 0.6, 0.7])
  text = "\n".join(report.seed_table(summary))
  assert "| lesion AUROC | 0.700 | 0.100 | 0.600 | 0.800 | 3 |" in text
  assert "Over 3 runs" in text


def test_compare_over_seeds_averages_paired_differences(tmp_path):
  """Each seed's model against the same seed's ablation: the difference is the mean over seeds,
  and a difference every seed shows has an interval that excludes 0."""
  from pathflip_jax import compare
  model = [_fake_run(tmp_path / f"model{s}", [1] * 20, [1] * 20, [0.8 + 0.01 * s] * 20)
           for s in range(3)]
  ablation = [_fake_run(tmp_path / f"ablation{s}", [1] * 20, [1] * 10 + [3] * 10,
                        [0.6 + 0.02 * s] * 20) for s in range(3)]
  same = [_fake_run(tmp_path / f"same{s}", [1] * 20, [1] * 20, [0.8 + 0.01 * s] * 20)
          for s in range(3)]
  result = compare.compare_over_seeds(model, {"no_x": ablation, "copy": same})
  rows = {(r["against"], r["metric"]): r for r in result["rows"]}
  auroc = rows[("no_x", "localization/mean_lesion_auroc")]
  assert auroc["difference"] == pytest.approx(0.81 - 0.62) and auroc["seeds"] == 3
  assert auroc["ci_low"] > 0
  recall = rows[("no_x", "slide_retrieval/slide_to_text_r@1")]
  assert recall["difference"] == pytest.approx(0.5) and recall["ci_low"] > 0
  copy = rows[("copy", "slide_zero_shot/balanced_accuracy")]
  assert copy["difference"] == 0 and copy["ci_low"] == copy["ci_high"] == 0
  assert "no_x" in "\n".join(report.ablation_table(result))
  with pytest.raises(ValueError, match="one per seed"):
    compare.compare_over_seeds(model, {"no_x": ablation[:2]})
