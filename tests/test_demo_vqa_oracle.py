"""The VQA ceiling of the demo cohort: the oracle's answers on a hand-made patch grid, and its
table on a generated cohort (with a model's predictions and a patch probe merged in)."""

import json

import numpy as np
import pytest

from data_prep import demo_vqa_oracle as oracle
from pathflip_jax.data import demo_annotations, feature_shards, instructions, patch_shards

TUMOUR, NECROSIS, STROMA, LYMPHOCYTES = (oracle.TISSUES.index(t) for t in
                                         ("tumour", "necrosis", "stroma", "lymphocytes"))


def _slide(tissue_by_cell: dict[tuple[int, int], dict[int, float]], side: int = 3
           ) -> oracle.SlidePatches:
  """A side x side grid of patches (0.1 mm), stroma except where ``tissue_by_cell`` says."""
  cells, fractions = [], []
  for row in range(side):
    for col in range(side):
      share = np.zeros(len(oracle.TISSUES))
      share[STROMA] = 1.0
      for kind, value in tissue_by_cell.get((col, row), {}).items():
        share[kind] = value
        share[STROMA] -= value
      cells.append((col, row))
      fractions.append(share)
  return oracle.SlidePatches(np.array(cells), np.array(fractions), patch_mm=0.1)


def _question(category: str, question: str, options: tuple[str, ...]) -> instructions.Question:
  return instructions.Question(slide_id="S", split="test", category=category, question=question,
                               options=options, answer="A", answer_text=options[0],
                               type=instructions.MULTIPLE_CHOICE)


def test_oracle_answers_from_the_patch_grid():
  # Tumour fills the upper-right patch (column 2, row 0) and half of the one below it; a lone
  # tumour patch in the lower left is a smaller area.
  slide = _slide({(2, 0): {TUMOUR: 1.0}, (2, 1): {TUMOUR: 0.5}, (0, 2): {TUMOUR: 0.4}})
  where = _question("location", "Where is the largest area of tumour located?",
                    ("in the upper right", "in the lower left", "in the centre",
                     "on the right side"))
  assert oracle.oracle_answer(where, slide) == "in the upper right"
  size = _question("size", "How large is the largest area of tumour?",
                   ("small", "medium-sized", "large", "absent"))
  assert oracle.oracle_answer(size, slide) == "small"            # 1.5 patches = 0.015 mm2
  big = _slide({(c, r): {TUMOUR: 1.0} for c in range(3) for r in range(3)}, side=3)
  big.patch_mm = 0.2                                             # 9 x 0.04 mm2 = 0.36 mm2
  assert oracle.oracle_answer(size, big) == "large"
  necrosis_size = _question("size", "How large is the largest area of necrosis?", size.options)
  assert oracle.oracle_answer(necrosis_size, slide) == "absent"
  present = _question("presence", "Which of these tissue types is present on the slide?",
                      ("fat", "tumour", "necrosis", "lymphocytes"))
  assert oracle.oracle_answer(present, slide) == "tumour"
  absent = _question("absence", "Which of these tissue types is NOT present on the slide?",
                     ("tumour", "stroma", "necrosis"))
  assert oracle.oracle_answer(absent, slide) == "necrosis"
  diagnosis = _question("diagnosis", "What is the most likely diagnosis for this slide?",
                        ("benign", "carcinoma", "carcinoma with necrosis",
                         "lymph node metastasis"))
  assert oracle.oracle_answer(diagnosis, slide) == "carcinoma"
  assert oracle.oracle_answer(diagnosis, _slide({})) == "benign"
  assert oracle.oracle_answer(
      diagnosis, _slide({(1, 1): {TUMOUR: 1.0}, (0, 1): {NECROSIS: 0.3}})) == \
      "carcinoma with necrosis"
  node = _slide({(c, r): {LYMPHOCYTES: 1.0} for c in range(3) for r in range(3)
                 if (c, r) != (1, 1)} | {(1, 1): {TUMOUR: 1.0}})
  assert oracle.oracle_answer(diagnosis, node) == "lymph node metastasis"
  with pytest.raises(ValueError, match="no tissue type named"):
    oracle.oracle_answer(_question("size", "How large is the largest area of cartilage?",
                                   size.options), slide)


@pytest.mark.slow
def test_ceiling_table_on_a_demo_cohort(demo_cohort, demo_tiles, tmp_path, capsys):
  patches, _ = demo_tiles
  questions = [q for q in instructions.read_questions(str(demo_cohort / "questions.csv"))
               if q.type == instructions.MULTIPLE_CHOICE]
  # A model that is right on every diagnosis question and wrong on all others.
  predictions = tmp_path / "vqa_test.jsonl"
  with open(predictions, "w") as f:
    for q in questions:
      wrong = next(x for x in "ABCD" if x != q.answer)
      f.write(json.dumps({"slide_id": q.slide_id, "question": q.question, "type": q.type,
                          "answer": q.answer,
                          "parsed": q.answer if q.category == "diagnosis" else wrong}) + "\n")
  output = tmp_path / "oracle.json"
  result = oracle.main(["--cohort_dir", str(demo_cohort), "--patches", str(patches), "--split",
                        "", "--predictions", str(predictions), "--output", str(output)])
  assert json.loads(output.read_text()) == result
  assert result["all"]["questions"] == len(questions)
  assert result["diagnosis"]["model"] == 1.0 and result["location"]["model"] == 0.0
  # What the patches show answers most questions: well above always one letter.
  assert result["all"]["oracle"] > result["all"]["best_single_letter"] + 0.3
  assert result["presence"]["oracle"] > 0.8
  table = capsys.readouterr().out
  assert "| all | " in table and "| oracle |" in table
  with pytest.raises(ValueError, match="no multiple-choice questions of split 'holdout'"):
    oracle.evaluate(str(demo_cohort), str(patches), "holdout")


def _write_features(directory, cohort, patches_dir, featurise) -> str:
  """A feature directory over the cohort's tiles: ``featurise(true fractions [n, 6])``."""
  annotations = demo_annotations.CohortAnnotations(str(cohort))
  patches = patch_shards.PatchShards(str(patches_dir))
  writer = feature_shards.FeatureWriter(str(directory), {"encoder": "test", "feature_dim": 6})
  rows = []
  for slide_id in sorted(annotations.slides):
    start, stop = patches.slide_range(slide_id)
    records = [patches[i] for i in range(start, stop)]
    coords = np.array([[r["x"], r["y"]] for r in records], np.int64)
    size = records[0]["patch_size_level0"]
    features = featurise(annotations.tissue_fractions(slide_id, coords, size))
    writer.add({"slide_id": slide_id, "features": features.astype(np.float16), "coords": coords,
                "patch_size_level0": size, "mpp": 0.5, "encoder": "test", "weights_hash": "",
                "source": "test"}, {"slide_id": slide_id})
    rows.append({"slide_id": slide_id})
  writer.close(rows)
  return str(directory)


@pytest.mark.slow
def test_patch_probe_follows_what_the_features_show(demo_cohort, demo_tiles, tmp_path, capsys):
  patches, _ = demo_tiles
  rng = np.random.default_rng(0)
  truth = _write_features(tmp_path / "truth", demo_cohort, patches, lambda f: f)
  noise = _write_features(tmp_path / "noise", demo_cohort, patches,
                          lambda f: rng.normal(size=f.shape))
  seeing = oracle.main(["--cohort_dir", str(demo_cohort), "--patches", str(patches), "--split",
                        "", "--features", truth])
  assert "| patch probe |" in capsys.readouterr().out
  blind = oracle.evaluate(str(demo_cohort), str(patches), "", features_dir=noise)
  # Features that are the tissue fractions: the probe names each patch's main tissue, so it
  # answers nearly as the oracle does (it loses only the minor tissue of mixed patches).
  assert seeing["all"]["patch_probe"] >= seeing["all"]["oracle"] - 0.25
  assert seeing["diagnosis"]["patch_probe"] == 1.0
  assert blind["all"]["patch_probe"] < seeing["all"]["patch_probe"] - 0.2
  assert "patch_probe" not in oracle.evaluate(str(demo_cohort), str(patches), "")["all"]
  no_train = _write_features(tmp_path / "test_only", demo_cohort, patches, lambda f: f)
  with pytest.raises(ValueError, match="no features of the cohort's training slides"):
    oracle.probe_slides(str(demo_cohort), no_train, set(), {"P000-S1"})
