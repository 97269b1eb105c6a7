"""python -m pathflip_jax.infer from a raw slide file: tiling and features as the jobs make them,
zero-shot, heatmaps (PNG + GeoJSON inside the slide), caption and answers, the page, and errors.

The runs are untrained (checkpoints of freshly initialised models): what is checked is that
every output is made from the slide, not the models' quality (the demo runs measure that)."""

import json

import numpy as np
import pytest
from PIL import Image

from pathflip_jax import checkpointing, infer
from pathflip_jax.data import slides
from tests import runs as runs_lib


@pytest.fixture(scope="module")
def runs(demo_cohort, demo_tiles, demo_questions, tmp_path_factory):
  root = tmp_path_factory.mktemp("infer_runs")
  runs_lib.untrained_demo_runs(root, demo_tiles[0], demo_questions)
  return root


def _check_outputs(summary, output_dir, slide_path, queries):
  with slides.Slide(slide_path) as slide:
    width, height = slide.info.width, slide.info.height
  assert summary["num_patches"] > 0 and summary["width"] == width
  names = [c["name"] for c in summary["zero_shot"]["classes"]]
  assert sorted(names) == sorted(["benign", "carcinoma", "carcinoma with necrosis",
                                  "lymph node metastasis"])
  np.testing.assert_allclose(sum(c["probability"] for c in summary["zero_shot"]["classes"]), 1.0,
                             rtol=1e-6)
  assert [h["query"] for h in summary["heatmaps"]] == queries
  for entry in summary["heatmaps"]:
    image = Image.open(entry["png"])
    assert image.width > 200 and image.mode == "RGB"
    collection = json.load(open(entry["geojson"]))
    assert collection["type"] == "FeatureCollection"
    assert len(collection["features"]) == summary["num_patches"]
    for feature in collection["features"]:
      assert feature["type"] == "Feature" and feature["geometry"]["type"] == "Polygon"
      ring = np.array(feature["geometry"]["coordinates"][0])
      assert ring.shape == (5, 2) and (ring[0] == ring[-1]).all()
      assert ring.min() >= 0 and ring[:, 0].max() <= width and ring[:, 1].max() <= height
      assert feature["properties"]["classification"]["name"] == entry["query"]
      assert np.isfinite(feature["properties"]["measurements"]["score"])
    outlines = json.load(open(entry["contours"]))
    assert outlines["type"] == "FeatureCollection" and outlines["features"]
    for feature in outlines["features"]:
      ring = np.array(feature["geometry"]["coordinates"][0])
      assert feature["properties"]["objectType"] == "annotation"
      assert ring.min() >= -1 and ring[:, 0].max() <= width + 1 and ring[:, 1].max() <= height + 1
  on_disk = json.load(open(output_dir / "summary.json"))
  assert on_disk["slide_id"] == summary["slide_id"]
  page = (output_dir / "index.html").read_text()
  assert "thumbnail.png" in page and "Zero-shot" in page
  assert Image.open(output_dir / "thumbnail.png").size[0] > 100
  return page


@pytest.mark.slow
def test_infer_on_a_real_slide_and_a_held_out_demo_slide(runs, demo_cohort, cmu_slide, tmp_path):
  out = tmp_path / "cmu"
  summary = infer.infer(str(runs / "instruct"), str(cmu_slide), str(out),
                        queries=["invasive carcinoma", "fibrous stroma"],
                        questions=["What is the diagnosis?",
                                   "Which tissue is present? | fat | tumour | necrosis"])
  page = _check_outputs(summary, out, str(cmu_slide), ["invasive carcinoma", "fibrous stroma"])
  assert isinstance(summary["caption"], str) and "Caption" in page
  assert [a["question"] for a in summary["answers"]] == [
      "What is the diagnosis?", "Which tissue is present? | fat | tumour | necrosis"]
  assert summary["instruct_workdir"] == str(runs / "instruct")
  # The checkpoints that made the outputs: each run's latest (neither trained with use_best).
  for run in ("align", "instruct"):
    steps = checkpointing.checkpoint_steps(str(runs / run))
    assert summary[f"{run}_checkpoint"] == str(runs / run / "checkpoints" / str(steps[-1]))
  assert summary["align_checkpoint"] in page

  manifest = [json.loads(line) for line in open(demo_cohort / "manifest.jsonl")]
  held_out = next(row for row in manifest if row["split"] != "train")
  path = held_out["path"] if held_out["path"].startswith("/") else str(demo_cohort /
                                                                         held_out["path"])
  out = tmp_path / "demo"
  infer.main(["--workdir", str(runs / "align"), "--slide", path, "--output_dir", str(out)])
  summary = json.load(open(out / "summary.json"))
  _check_outputs(summary, out, path, ["benign", "carcinoma", "carcinoma with necrosis",
                                      "lymph node metastasis"])
  assert "caption" not in summary                     # an align run: no decoder


def test_infer_errors_name_the_input(runs, tmp_path):
  broken = tmp_path / "broken.svs"
  broken.write_bytes(b"not a slide")
  with pytest.raises(SystemExit, match=f"cannot read slide {broken}"):
    infer.main(["--workdir", str(runs / "align"), "--slide", str(broken),
                "--output_dir", str(tmp_path / "o")])
  with pytest.raises(SystemExit, match="--question needs an instruct run"):
    infer.main(["--workdir", str(runs / "align"), "--slide", str(broken),
                "--output_dir", str(tmp_path / "o"), "--question", "What is it?"])
  with pytest.raises(SystemExit, match="5 options; give 2 to 4"):
    infer.main(["--workdir", str(runs / "instruct"), "--slide", str(broken), "--output_dir",
                str(tmp_path / "o"), "--question", "Q? | a | b | c | d | e"])
  with pytest.raises(SystemExit, match="is not a training workdir"):
    infer.main(["--workdir", str(tmp_path), "--slide", str(broken),
                "--output_dir", str(tmp_path / "o")])
  other_stage = tmp_path / "patch_clip_run"
  other_stage.mkdir()
  (other_stage / "config.json").write_text(json.dumps({"stage": "patch_clip"}))
  with pytest.raises(SystemExit, match="stage is 'patch_clip'; --workdir .* must be a run of "
                                       "stage 'align' or 'instruct'"):
    infer.main(["--workdir", str(other_stage), "--slide", str(broken),
                "--output_dir", str(tmp_path / "o")])
