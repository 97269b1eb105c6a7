"""pathflip_jax.quickstart's choice of example slides (the whole run: tests/test_colabs.py)."""

import json

from pathflip_jax import quickstart


def _write_jsonl(path, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_example_slides_skip_slides_the_tiler_skipped(tmp_path):
  """A test slide with no tissue (status "failed" in the tiling index) is never an example: the
  heatmap stage would stop on it (seen on the ``--seed 7`` cohort)."""
  manifest = [
      {"slide_id": "A", "split": "test", "diagnosis": "lymph node metastasis"},
      {"slide_id": "B", "split": "test", "diagnosis": "lymph node metastasis"},
      {"slide_id": "C", "split": "test", "diagnosis": "benign"},
      {"slide_id": "D", "split": "train", "diagnosis": "carcinoma"},
  ]
  _write_jsonl(tmp_path / "cohort" / "manifest.jsonl", manifest)
  _write_jsonl(tmp_path / "patches" / "slides.jsonl", [
      {"slide_id": "A", "status": "failed", "reason": "no_tissue"},
      {"slide_id": "B", "status": "ok"}, {"slide_id": "C", "status": "ok"},
      {"slide_id": "D", "status": "ok"}])
  picked = quickstart.Quickstart(str(tmp_path), size="test").example_slides()
  assert [r["slide_id"] for r in picked] == ["B", "C"]
