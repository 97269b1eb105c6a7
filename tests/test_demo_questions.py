"""Demo questions defined on the tiled patch grid: the region view, the definitions on hand-made
grids, option balancing, and the questions of a generated cohort."""

import csv
import json

import numpy as np
import pytest

from data_prep import demo_questions as dq
from pathflip_jax.data import instructions, regions
from tests import synthetic

TUMOUR, NECROSIS, STROMA, LYMPHOCYTES, FAT = (dq.TISSUES.index(t) for t in (
    "tumour", "necrosis", "stroma", "lymphocytes", "fat"))


def _view(tissue_by_cell: dict[tuple[int, int], dict[int, float]], side: int = 6):
  return synthetic.region_grid(tissue_by_cell, side)


def test_region_view_is_what_the_decoder_gets():
  from pathflip_jax.tasks import instruct  # noqa: PLC0415 - imports JAX
  rng = np.random.default_rng(0)
  size = 512.0                                   # a 40x slide: 256 px at 0.5 µm/px
  cols, rows = np.meshgrid(np.arange(3, 17), np.arange(5, 14))
  keep = rng.random(cols.size) < 0.7
  coords = np.stack([cols.ravel()[keep], rows.ravel()[keep]], 1) * size + 1000.0
  fractions = rng.dirichlet(np.ones(len(dq.TISSUES)), len(coords))
  view = dq.slide_regions(coords, size, fractions, region_patches=2)
  grid, _ = regions.group_patches(coords, size, 2)
  assert len(view.fractions) == grid.num_regions
  np.testing.assert_array_equal(view.positions, instruct.relative_positions(grid.cells,
                                                                            grid.cells))
  for r, members in enumerate(grid.members):
    np.testing.assert_allclose(view.fractions[r], fractions[members].mean(0))
  np.testing.assert_array_equal(view.cells, grid.cells - grid.cells.min(0))
  # The fullest regions only (as the align stage's evaluation example keeps them): still placed
  # relative to every region, and the grid is still recovered from the places.
  fullest = dq.slide_regions(coords, size, fractions, region_patches=2, max_regions=10)
  order = np.argsort(-grid.counts(), kind="stable")[:10]
  np.testing.assert_array_equal(fullest.positions,
                                instruct.relative_positions(grid.cells[order], grid.cells))
  np.testing.assert_array_equal(fullest.cells, grid.cells[order] - grid.cells.min(0))


def test_definitions_on_a_hand_made_grid():
  # Tumour fills a 2 x 2 block in the upper left and one lone region lower right (a smaller
  # area); necrosis covers 5% of one region (a trace: neither present nor absent).
  view = _view({(0, 0): {TUMOUR: 1.0}, (1, 0): {TUMOUR: 1.0}, (0, 1): {TUMOUR: 0.8},
                (1, 1): {TUMOUR: 0.6}, (5, 5): {TUMOUR: 0.9}, (3, 3): {NECROSIS: 0.05}})
  areas = view.areas("tumour")
  assert [round(a.amount, 2) for a in areas] == [3.4, 0.9]
  assert areas[0].x < 1 / 3 and areas[0].y < 1 / 3
  assert dq.robust_place(view, "tumour") == "in the upper left"
  assert view.present("tumour") and not view.present("necrosis") and not view.absent("necrosis")
  facts = dq.slide_facts(view, {"tumour": [1.0, 3.0], "necrosis": [0.5, 1.0],
                                "benign glands": None, "fat": [0.5, 1.0]})
  assert facts.present == ["stroma", "tumour"] and "necrosis" not in facts.absent
  assert facts.size == {"tumour": "large", "necrosis": None, "benign glands": None,
                        "fat": dq.ABSENT}
  assert facts.diagnosis == "carcinoma"
  assert dq.size_word(2.0, [1.0, 3.0]) == "medium-sized" and dq.size_word(0.5, [1, 3]) == "small"
  assert dq.robust_size(view, "tumour", [3.2, 5.0]) is None       # 3.4 is within 10% of 3.2
  # Two areas of about the same amount: which is the largest is not robust.
  twins = _view({(0, 0): {TUMOUR: 1.0}, (5, 5): {TUMOUR: 0.9}})
  assert dq.robust_place(twins, "tumour") is None
  # A centre on a third line has no robust place (6 columns: the line between 2nd and 3rd).
  on_line = _view({(1, 3): {FAT: 1.0}, (2, 3): {FAT: 1.0}, (1, 4): {FAT: 1.0},
                   (2, 4): {FAT: 1.0}, (1, 5): {FAT: 1.0}, (2, 5): {FAT: 1.0}})
  assert dq.largest_area(on_line, "fat").x == pytest.approx(1 / 3)
  assert dq.robust_place(on_line, "fat") is None
  assert dq.place_words(0.5, 0.5) == "in the centre"
  assert dq.place_words(0.9, 0.5) == "on the right side"
  assert dq.place_words(0.5, 0.9) == "in the lower part"
  # Thirds of the box: 0.65 is still the middle row, 0.3 already the left column.
  assert dq.place_words(0.65, 0.65) == "in the centre"
  assert dq.place_words(0.3, 0.68) == "in the lower left"
  assert {dq.place_words(x, y) for x in (0.1, 0.5, 0.9) for y in (0.1, 0.5, 0.9)} == \
      set(dq.PLACES)
  # Diagnoses from compositions.
  assert dq.diagnosis_rule(_view({})) == "benign"
  assert dq.diagnosis_rule(_view({(2, 2): {TUMOUR: 0.5}, (4, 4): {NECROSIS: 0.2}})) == \
      "carcinoma with necrosis"
  node = _view({(c, r): {LYMPHOCYTES: 1.0} for c in range(6) for r in range(6)}
               | {(2, 2): {TUMOUR: 1.0}})
  assert dq.diagnosis_rule(node) == "lymph node metastasis"


def _facts(rng) -> tuple[dq.SlideFacts, str]:
  """Random slide facts with a skewed truth: most slides lack necrosis, stroma is nearly always
  there, tumours sit in the centre more often than elsewhere."""
  diagnosis = str(rng.choice(dq.DIAGNOSES))
  present = ["stroma"] if rng.random() < 0.9 else ["lymphocytes"]
  present += [t for t, p in (("tumour", 0.7), ("necrosis", 0.2), ("benign glands", 0.4),
                             ("fat", 0.3)) if rng.random() < p]
  place = {t: ("in the centre" if rng.random() < 0.5 else str(rng.choice(dq.PLACES)))
           if t in present else None for t in dq.ASKED}
  size = {t: str(rng.choice(dq.SIZE_WORDS)) if t in present else dq.ABSENT for t in dq.ASKED}
  return dq.SlideFacts(present, [t for t in dq.TISSUES if t not in present], {}, {}, diagnosis,
                       place, size), diagnosis


BALANCED = ("diagnosis", "location", "size")   # the Balancer's categories (training slides)


def test_balancer_leaves_letters_and_option_texts_uninformative():
  rng = np.random.default_rng(0)
  balancer = dq.Balancer(rng)
  rows = []
  for _ in range(400):
    facts, diagnosis = _facts(rng)
    for category in BALANCED:
      picked = balancer.pick(("test", category), dq.candidates(category, facts, diagnosis),
                             set(), capped=category != "diagnosis")
      if picked is None:
        continue
      question, correct, wrong = picked
      options, letter = balancer.commit(("test", category), question, correct, wrong)
      assert options[instructions.LETTERS.index(letter)] == correct
      pools = {c[:2]: c[2] for c in dq.candidates(category, facts, diagnosis)}
      assert len(set(options)) == 4 and set(wrong) <= set(pools[(question, correct)])
      rows.append((category, question, correct, tuple(options), letter))
  for category in BALANCED:
    mine = [r for r in rows if r[0] == category]
    assert len(mine) >= 100, category
    letters = [r[4] for r in mine]
    assert max(letters.count(x) for x in "ABCD") / len(mine) <= 0.27
    for question in {r[1] for r in mine}:
      asked = [r for r in mine if r[1] == question]
      if len(asked) < 20:
        continue
      for text in {t for r in asked for t in r[3]}:
        offered = [r for r in asked if text in r[3]]
        right = sum(r[2] == text for r in offered)
        # Never right in more than 0.3 of its offers nor of the text's questions (give or
        # take two questions).
        assert right <= 0.3 * len(offered) + 2, (question, text, right, len(offered))
        assert right <= 0.3 * len(asked) + 2, (question, text, right, len(asked))
  # Without balancing the same facts make "absent" the usual size answer; with it, not.
  sizes = [r for r in rows if r[0] == "size"]
  assert sum(r[2] == dq.ABSENT for r in sizes) / len(sizes) <= 0.32


def test_forced_option_sets_are_asked_in_whole_cycles():
  """Presence-like pools where tissues co-occur (b only with a; c never with d): every option
  set asked has each of its possible answers equally often, so the set says nothing of the
  answer; a set whose members cannot each be the lone answer of some slide is never asked."""
  rng = np.random.default_rng(0)
  kinds = ["a", "b", "c", "d", "e", "f"]
  pools = {}
  for i in range(300):
    present = {k for k in kinds if rng.random() < 0.4}
    if "b" in present:
      present.add("a")
    if "c" in present:
      present.discard("d")
    absent = [k for k in kinds if k not in present]
    pools[f"s{i}"] = ([("Q?", t, absent) for t in sorted(present)] if len(absent) >= 3 else [])
  picks = dq.select_balanced_sets(pools, 2, rng)
  assert len(picks) >= 100
  by_set: dict[tuple, list[str]] = {}
  per_slide: dict[str, int] = {}
  for slide_id, (question, correct, wrong) in picks:
    assert correct in [c for _, c, _ in pools[slide_id]] and set(wrong) <= set(
        next(p for _, c, p in pools[slide_id] if c == correct))
    by_set.setdefault(tuple(sorted((correct,) + wrong)), []).append(correct)
    per_slide[slide_id] = per_slide.get(slide_id, 0) + 1
  assert max(per_slide.values()) <= 2
  for members, answers in by_set.items():
    counts = [answers.count(m) for m in set(answers)]
    assert len(counts) >= 3 and max(counts) == min(counts), (members, answers)
    # b is never the lone present one beside a: a set holding both has b never right.
    if {"a", "b"} <= set(members):
      assert "b" not in answers


@pytest.fixture(scope="module")
def questions(demo_cohort, demo_tiles, tmp_path_factory):
  """demo_questions on the 8-slide session cohort, written outside it (other tests read the
  cohort's own questions.csv)."""
  patches, _ = demo_tiles
  out = tmp_path_factory.mktemp("questions") / "questions.csv"
  summary = dq.run(["--cohort_dir", str(demo_cohort), "--patches", str(patches), "--output",
                    str(out)])
  return out, summary


@pytest.mark.slow
def test_questions_of_a_tiled_cohort(demo_cohort, demo_tiles, questions):
  path, summary = questions
  with open(dq.definitions_path(str(path))) as f:
    assert json.load(f) == summary
  assert summary["region_patches"] == 2 and summary["max_regions"] == 0
  rows = [json.loads(line) for line in (demo_cohort / "manifest.jsonl").read_text().splitlines()]
  split = {r["slide_id"]: r["split"] for r in rows}
  assert summary["slides"] == {sp: list(split.values()).count(sp) for sp in ("train", "val",
                                                                             "test")}
  assert summary["diagnosis_rule_disagrees"] == []
  table = instructions.read_questions(str(path))
  with open(path, newline="") as f:
    assert tuple(csv.DictReader(f).fieldnames) == instructions.COLUMNS
  mcq = [q for q in table if q.type == instructions.MULTIPLE_CHOICE]
  # Absence questions need slides of at least three tissue compositions that make whole
  # cycles of an option set (select_balanced_sets): 8 slides seldom have them.
  assert {q.category for q in mcq} >= set(dq.CATEGORIES) - {"absence"}
  assert all(q.split == split[q.slide_id] for q in table)
  # Every answer is what the region view of the tiled patches says, recomputed here from the
  # shards and label maps through regions.group_patches.
  tiled = dq.read_tiled(str(demo_cohort), str(demo_tiles[0]))
  views = {s: dq.slide_regions(t.coords, t.patch_size_level0, t.fractions, 2)
           for s, t in tiled.items()}
  for q in mcq:
    view = views[q.slide_id]
    assert len(set(q.options)) == 4 and q.correct_text == q.answer_text
    if q.category == "presence":
      place = next(p for p in dq.PLACES if f" {p} " in q.question)
      assert view.peak_in(q.correct_text, place, dq.LOCATION_MARGIN) >= dq.PRESENT_MIN
      assert all(view.peak_in(o, place, -dq.LOCATION_MARGIN) == 0
                 for o in q.options if o != q.correct_text)
    elif q.category == "absence":
      assert view.absent(q.correct_text)
      assert all(view.present(o) for o in q.options if o != q.correct_text)
    elif q.category == "location":
      tissue = q.question.split(" of ")[-1].replace(" located?", "")
      area = dq.largest_area(view, tissue)
      assert dq.place_words(area.x, area.y) == q.correct_text
    elif q.category == "size":
      tissue = q.question.split(" of ")[-1].rstrip("?")
      assert q.options and set(q.options) == set(dq.SIZE_WORDS) | {dq.ABSENT}
      if q.correct_text == dq.ABSENT:
        assert view.absent(tissue)
      else:
        assert dq.size_word(dq.largest_area(view, tissue).amount,
                            summary["size_tertiles"][tissue]) == q.correct_text
  # Training slides get more questions; evaluation slides up to two per category.
  per_slide = {s: sum(q.slide_id == s for q in mcq) for s in split}
  assert min(per_slide[s] for s in split if split[s] == "train") > \
      max(per_slide[s] for s in split if split[s] != "train")
  for s in split:
    if split[s] != "train":
      for category in dq.CATEGORIES:
        assert sum(q.slide_id == s and q.category == category for q in mcq) <= 2
  opened = {(q.slide_id, q.category) for q in table if q.type == instructions.OPEN}
  assert {(s, "description") for s in split} <= opened
  assert {(s, "presence") for s in split} <= opened


def test_command_line(demo_cohort, tmp_path, capsys):
  with pytest.raises(SystemExit) as done:
    dq.run(["--help"])
  assert done.value.code == 0
  assert capsys.readouterr().out.startswith("usage:")
  with pytest.raises(FileNotFoundError, match="no patches-"):
    dq.run(["--cohort_dir", str(demo_cohort), "--patches", str(tmp_path)])
  with pytest.raises(SystemExit, match="--region_patches 0"):
    dq.run(["--cohort_dir", str(demo_cohort), "--patches", str(tmp_path),
            "--region_patches", "0"])
  with pytest.raises(FileNotFoundError, match="questions.json not found"):
    dq.read_definitions(str(tmp_path / "questions.csv"))
