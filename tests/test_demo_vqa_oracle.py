"""The rule-based answerer of the demo questions: its answers on hand-made region views, the
question-only baselines, and its table on a generated cohort (with a model's predictions and a
patch probe merged in)."""

import json

import numpy as np
import pytest

from data_prep import demo_questions as dq
from data_prep import demo_vqa_oracle as oracle
from pathflip_jax.data import demo_annotations, feature_shards, instructions, patch_shards
from tests import synthetic

TUMOUR, NECROSIS, STROMA, LYMPHOCYTES = (dq.TISSUES.index(t) for t in
                                         ("tumour", "necrosis", "stroma", "lymphocytes"))
TERTILES = {"tumour": [1.0, 3.0], "necrosis": [0.5, 1.0], "benign glands": [1.0, 2.0],
            "fat": [1.0, 2.0]}


def _view(tissue_by_cell: dict[tuple[int, int], dict[int, float]], side: int = 3):
  return synthetic.region_grid(tissue_by_cell, side)


def _question(category: str, question: str, options: tuple[str, ...], answer: int = 0,
              split: str = "test") -> instructions.Question:
  return instructions.Question(slide_id="S", split=split, category=category, question=question,
                               options=options, answer="ABCD"[answer],
                               answer_text=options[answer], type=instructions.MULTIPLE_CHOICE)


def test_oracle_answers_from_the_region_view():
  # Tumour fills the upper-right region (column 2, row 0) and half of the one below it; a lone
  # tumour region in the lower left is a smaller area.
  view = _view({(2, 0): {TUMOUR: 1.0}, (2, 1): {TUMOUR: 0.5}, (0, 2): {TUMOUR: 0.4}})
  where = _question("location", "Where is the largest area of tumour located?",
                    ("in the upper right", "in the lower left", "in the centre",
                     "on the right side"))
  assert oracle.oracle_answer(where, view, TERTILES) == "in the upper right"
  size = _question("size", "How large is the largest area of tumour?",
                   ("small", "medium-sized", "large", "absent"))
  assert oracle.oracle_answer(size, view, TERTILES) == "medium-sized"     # 1.5 regions
  big = _view({(c, r): {TUMOUR: 1.0} for c in range(3) for r in range(2)})
  assert oracle.oracle_answer(size, big, TERTILES) == "large"            # 6 regions
  assert oracle.oracle_answer(size, view, {"tumour": None}) == ""
  necrosis_size = _question("size", "How large is the largest area of necrosis?", size.options)
  assert oracle.oracle_answer(necrosis_size, view, TERTILES) == "absent"
  necrosis_where = _question("location", "Where is the largest area of necrosis located?",
                             where.options)
  assert oracle.oracle_answer(necrosis_where, view, TERTILES) == ""
  with_stroma, without = ("fat", "tumour", "necrosis", "stroma"), ("fat", "tumour", "necrosis",
                                                                   "lymphocytes")
  # The lower-left region is 40% tumour, 60% stroma: tumour is the answer unless stroma is an
  # option.
  for place, options, answer in (("in the upper right", with_stroma, "tumour"),
                                 ("in the lower left", without, "tumour"),
                                 ("in the lower left", with_stroma, "stroma"),
                                 ("in the centre", with_stroma, "stroma")):
    present = _question("presence", f"Which of these tissue types is present {place} of the "
                        "tissue?", options)
    assert oracle.oracle_answer(present, view, TERTILES) == answer, place
  with pytest.raises(ValueError, match="no place named"):
    oracle.oracle_answer(_question("presence", "Which of these is present?", without), view,
                         TERTILES)
  absent = _question("absence", "Which of these tissue types is NOT present on the slide?",
                     ("tumour", "stroma", "necrosis"))
  assert oracle.oracle_answer(absent, view, TERTILES) == "necrosis"
  diagnosis = _question("diagnosis", "What is the most likely diagnosis for this slide?",
                        dq.DIAGNOSES)
  assert oracle.oracle_answer(diagnosis, view, TERTILES) == "carcinoma"
  assert oracle.oracle_answer(diagnosis, _view({}), TERTILES) == "benign"
  assert oracle.oracle_answer(
      diagnosis, _view({(1, 1): {TUMOUR: 1.0}, (0, 1): {NECROSIS: 0.3}}), TERTILES) == \
      "carcinoma with necrosis"
  node = _view({(c, r): {LYMPHOCYTES: 1.0} for c in range(3) for r in range(3)
                if (c, r) != (1, 1)} | {(1, 1): {TUMOUR: 1.0}})
  assert oracle.oracle_answer(diagnosis, node, TERTILES) == "lymph node metastasis"
  with pytest.raises(ValueError, match="no tissue type named"):
    oracle.oracle_answer(_question("size", "How large is the largest area of cartilage?",
                                   size.options), view, TERTILES)


def test_question_only_baselines():
  where = "Where is the largest area of tumour located?"
  places = ("in the centre", "on the left side", "on the right side", "in the upper part")
  # In training "in the centre" is the most frequent answer, but "in the upper part" is right
  # every time it is offered (it is offered rarely).
  train = [_question("location", where, places[:3] + ("in the lower part",), 0, "train")] * 3
  train += [_question("location", where, places, 3, "train")]
  test = _question("location", where, places, 1)
  assert oracle.question_only(train)(test) == "in the centre"
  assert oracle.question_only(train, by_rate=True)(test) == "in the upper part"
  # An unseen question text falls back on its category's training questions.
  fat = _question("location", "Where is the largest area of fat located?", places, 2)
  assert oracle.question_only(train)(fat) == "in the centre"
  # The same four options, the answer told apart by the set (b beside a: a is right).
  sets = [_question("presence", "Q?", ("a", "b", "c", "d"), 0),
          _question("presence", "Q?", ("b", "c", "d", "e"), 0),
          _question("presence", "Q?", ("b", "c", "d", "e"), 0),
          _question("presence", "Q?", ("a", "c", "d", "e"), 1)]
  by_set = oracle.question_only(sets, by_set=True)
  assert by_set(_question("presence", "Q?", ("d", "c", "b", "a"), 3)) == "a"
  assert oracle.question_only(sets)(_question("presence", "Q?", ("d", "c", "b", "a"), 3)) == "b"
  result = {"size": {"oracle": 0.97, "best_single_letter": 0.5, "letter": "B",
                     "question_only": 0.2, "option_set": 0.45}, "all": {}}
  assert oracle.failures(result) == ["size: rule-based 0.970 < 0.98",
                                     "size: always B 0.500 > 0.4",
                                     "size: option-set 0.450 > 0.4"]


@pytest.fixture(scope="module")
def questions(demo_questions) -> str:
  """demo_questions on the 8-slide session cohort (tests/conftest.py), written outside it."""
  return str(demo_questions)


@pytest.mark.slow
def test_ceiling_table_on_a_demo_cohort(demo_cohort, demo_tiles, questions, tmp_path, capsys):
  patches, _ = demo_tiles
  table = [q for q in instructions.read_questions(questions)
           if q.type == instructions.MULTIPLE_CHOICE]
  # A model that is right on every diagnosis question and wrong on all others.
  predictions = tmp_path / "vqa_test.jsonl"
  with open(predictions, "w") as f:
    for q in table:
      wrong = next(x for x in "ABCD" if x != q.answer)
      f.write(json.dumps({"slide_id": q.slide_id, "question": q.question, "type": q.type,
                          "answer": q.answer,
                          "parsed": q.answer if q.category == "diagnosis" else wrong}) + "\n")
  output = tmp_path / "oracle.json"
  result = oracle.main(["--cohort_dir", str(demo_cohort), "--patches", str(patches), "--split",
                        "", "--questions", questions, "--predictions", str(predictions),
                        "--output", str(output)])
  assert json.loads(output.read_text()) == result
  assert result["all"]["questions"] == len(table)
  assert result["diagnosis"]["model"] == 1.0 and result["location"]["model"] == 0.0
  # The answers are defined on the region view the rules read: every one is recovered.
  assert all(result[c]["oracle"] == 1.0 for c in dq.CATEGORIES if c in result)
  assert set(result) >= {"all", "presence", "location", "size", "diagnosis"}
  assert result["all"]["best_single_letter"] <= 0.3
  out = capsys.readouterr().out
  assert "| all | " in out and "| rule-based |" in out and "| question-only |" in out
  with pytest.raises(ValueError, match="no multiple-choice questions of split 'holdout'"):
    oracle.evaluate(str(demo_cohort), str(patches), "holdout", questions=questions)
  # The same questions read on a coarser grid than they were written for: some answers change.
  definitions = dq.read_definitions(questions)
  coarse = oracle.true_views(str(demo_cohort), str(patches), {q.slide_id for q in table},
                             definitions | {"region_patches": 8})
  assert np.mean([oracle.oracle_answer(q, coarse[q.slide_id], definitions["size_tertiles"])
                  == q.correct_text for q in table]) < 0.95
  # Without --questions, the cohort's questions.csv is read: the cohort has none before
  # demo_questions writes it there.
  with pytest.raises(FileNotFoundError, match="questions"):
    oracle.evaluate(str(demo_cohort), str(patches), "")


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
def test_patch_probe_follows_what_the_features_show(demo_cohort, demo_tiles, questions,
                                                    tmp_path, capsys):
  patches, _ = demo_tiles
  rng = np.random.default_rng(0)
  truth = _write_features(tmp_path / "truth", demo_cohort, patches, lambda f: f)
  noise = _write_features(tmp_path / "noise", demo_cohort, patches,
                          lambda f: rng.normal(size=f.shape))
  seeing = oracle.main(["--cohort_dir", str(demo_cohort), "--patches", str(patches), "--split",
                        "", "--questions", questions, "--features", truth])
  assert "| patch probe |" in capsys.readouterr().out
  blind = oracle.evaluate(str(demo_cohort), str(patches), "", features_dir=noise,
                          questions=questions)
  # Features that are the tissue fractions: the probe names each patch's main tissue, so it
  # answers most questions as the rules on the true compositions do (it loses the minor tissue
  # of mixed patches, which moves areas and amounts).
  assert seeing["all"]["patch_probe"] >= seeing["all"]["oracle"] - 0.3
  assert seeing["diagnosis"]["patch_probe"] == 1.0
  assert blind["all"]["patch_probe"] < seeing["all"]["patch_probe"] - 0.2
  assert "patch_probe" not in oracle.evaluate(str(demo_cohort), str(patches), "",
                                              questions=questions)["all"]
  no_train = _write_features(tmp_path / "test_only", demo_cohort, patches, lambda f: f)
  with pytest.raises(ValueError, match="no features of the cohort's training slides"):
    oracle.probe_views(str(demo_cohort), no_train, set(), {"P000-S1"},
                       dq.read_definitions(questions))
