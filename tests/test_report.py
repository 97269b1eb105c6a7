"""pathflip_jax.report and docs/results.py: every metric a run wrote, beside its baseline, in
REPORT.md and in the results page that names the run."""

import importlib.util
import json
import pathlib

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
              "| multiple choice, generated answer (best single letter) | 0.667 | 0.289 |",
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
      "earlier": [{"started": "2026-12-07T20:00"}]}))
  text = results.render(str(workdir))
  assert text.startswith("# Results")
  for line in ("- command: `python -m pathflip_jax.quickstart --workdir W`",
               "- code: git abc123", "- machine: AMD EPYC, 2 cores, 23.5 GiB; Linux",
               "- resumed: 1 earlier invocation(s) ran some stages first (the first started "
               "2026-12-07T20:00)", "| balanced accuracy (chance) | 0.437 | 0.250 |"):
    assert line in text, line
  assert "# PathFLIP quickstart report" not in text
  (workdir / "run.json").unlink()
  try:
    results.render(str(workdir))
  except SystemExit as e:
    assert "no run.json" in str(e)
  else:
    raise AssertionError("a workdir without run.json must not give a results page")
