"""python -m pathflip_jax.quickstart end to end at --size test: every stage runs, REPORT.md holds
every table with numbers and the example heatmaps, and a re-run skips the finished stages."""

import json
import os
import re

import pytest

from pathflip_jax import quickstart

TABLES = ("## Patch encoder", "## Zero-shot diagnosis", "## Slide - caption retrieval",
          "## Text-prompted localization", "## Biomarker", "## Captioning",
          "## Visual question answering", "### Sample captions", "## Example slides")


@pytest.mark.slow
def test_quickstart_runs_every_stage_and_reports(tmp_path, capsys):
  workdir = tmp_path / "qs"
  quickstart.main(["--workdir", str(workdir), "--size", "test", "--examples", "2"])
  report_path = capsys.readouterr().out.strip().splitlines()[-1]
  assert report_path == str(workdir / "REPORT.md")
  report = (workdir / "REPORT.md").read_text()
  for heading in TABLES:
    assert heading in report, heading
  # Numbers beside baselines, e.g. "| balanced accuracy (chance) | 0.250 | 0.250 |".
  assert re.search(r"\| balanced accuracy \(chance\) \| [01]\.\d{3} \| 0\.250 \|", report)
  assert re.search(r"\| \*\*lesions \(mean\)\*\* \| [01]\.\d{3} \|", report)
  images = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", report)
  assert len(images) == 2 * len(quickstart.EXAMPLE_QUERIES)
  assert all((workdir / image).exists() for image in images)
  timings = json.load(open(workdir / "timings.json"))
  assert set(timings["seconds"]) == {"cohort", "tiles", "patch_clip", "features", "align",
                                     "instruct", "heatmaps", "report"}

  # An interrupted run continues: with the instruct results gone, only instruct and what
  # follows run again; finished stages are not redone.
  os.remove(workdir / "instruct" / "results.json")
  stamp = os.path.getmtime(workdir / "align" / "results.json")
  quickstart.main(["--workdir", str(workdir), "--size", "test", "--examples", "2"])
  log = capsys.readouterr().err
  for stage in ("cohort", "tiles", "patch_clip", "features", "align", "heatmaps"):
    assert re.search(rf"stage \d/8 {stage}: already complete, skipped", log), stage
  assert "stage 6/8 instruct ..." in log
  assert os.path.getmtime(workdir / "align" / "results.json") == stamp
  assert (workdir / "instruct" / "results.json").exists()
