r"""Questions on the demo cohort whose answers are defined on the tiled patch grid.

  python -m data_prep.demo_questions --cohort_dir C --patches P [--region_patches 2] \
      [--max_regions 0] [--output C/questions.csv] [--train_question_draws 3] \
      [--eval_questions 2] [--seed 0]

Runs after tiling (``data_prep.tile_slides``). The instruct stage's decoder sees a slide as a
slide token and one token per region of R x R tiled patches (``regions.group_patches``) with the
region's place relative to the bounding box of all tissue cells (``instruct.relative_positions``).
Every answer here is a function of that view only, with each region's tissue composition taken
from the cohort's label maps (the mean tissue fractions of its patches):

  present    a type covers at least 10% of some region; absent: no tiled patch shows any of it
             (types in between are never an option of absence questions)
  presence   asked of a place (a ninth of the tissue's box, as for location): a type is present
             there when a region whose centre lies at least 0.03 inside it covers 10% of it,
             absent when no region centred within 0.03 of it shows any (types in between are
             never an option)
  diagnosis  the slide's label, asked only where the rule agrees: tumour present -> necrosis
             present: carcinoma with necrosis; more lymphocytes than stroma: lymph node
             metastasis; else carcinoma; no tumour -> benign
  area       regions holding >= 10% of a type, 8-connected on the region grid; the largest
             area is the one with the most of the type (sum of its regions' fractions, in
             regions), its place the type-weighted centre of its regions
  location   that centre in a 3 x 3 grid of thirds of the tissue's box ("in the upper left",
             "on the right side", "in the centre", ...)
  size       that amount against the tertiles of the same type's largest areas on the training
             slides: small, medium-sized, large; "absent" where none of it was tiled

A question is left out where its answer is fragile: a centre within 0.03 of a third line, a
largest area less than 1.25 times the next, an amount within 10% of a tertile.

Multiple-choice questions have four options (A-D), the right letter cycling per split and
category, and are chosen so that the options alone do not give the answer away. Presence and
absence questions (whose distractors the slide forces: its absent or present types) are asked
in whole cycles per option set, each member of a set that can be right right once per cycle,
sets with fewer than three such members never: the cohort's tissues co-occur (necrosis only
beside tumour, lymphocytes not beside stroma and tumour), so a set can otherwise imply its
answer. (For the same reason presence is asked of a place: on the whole slide the absent types
nearly fix the diagnosis, and no option set has three members that can be right.) Location and size
questions of evaluation slides take every answer of a text equally often, with distractors drawn
as often as they are answers, so that the four options are exchangeable; on training slides no
answer takes more than about 0.3 of a text's questions nor is right in more than about 0.3 of
the questions offering it. Evaluation slides (val, test) get up to ``--eval_questions`` per
category, each about another fact (diagnosis: one); training slides get ``--eval_questions`` x
``--train_question_draws`` per category, facts repeated with other distractors. Open questions (diagnosis, presence list,
description = the caption, location of a lesion) use the same definitions.

Writes ``--output`` (the SlideBench-like CSV of ``instructions.read_questions``) and, beside it,
``<output stem>.json``: the definitions' parameters (region_patches, max_regions, size tertiles)
that ``data_prep.demo_vqa_oracle`` answers with, and the counts.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import itertools
import json
import os
import sys
import time
from typing import Any, Iterable, Sequence

import numpy as np
from scipy import ndimage

from data_prep import make_demo_cohort
from pathflip_jax.data import demo_annotations, instructions, patch_shards, regions
from pathflip_jax.data import synthetic_he as he

TISSUES = tuple(demo_annotations.TISSUE_NAMES[c] for c in demo_annotations.CLASS_LABELS)
DIAGNOSES = he.DIAGNOSES
LESIONS = ("tumour", "necrosis", "benign glands")      # what the cohort's size targets count
ASKED = LESIONS + ("fat",)                             # location and size questions ask these
PRESENT_MIN = 0.1          # share of a region a type must cover somewhere to count as present
LOCATION_MARGIN = 0.03     # a centre this close to a third line has no robust place
DOMINANCE = 1.25           # the largest area must hold this many times the next one
SIZE_MARGIN = 0.1          # an amount this close (relative) to a tertile has no robust size
ANSWER_CAP = 0.3           # at most this share of a question text's questions has one answer
TRAIN_SLACK = 2            # ... give or take this many questions on training slides
MIN_ANSWERS = 3            # location and size questions of evaluation slides: the fewest
                           # different answers a question text may have
PLACES, SIZE_WORDS = make_demo_cohort.PLACES, make_demo_cohort.SIZE_WORDS   # the captions' words
ABSENT = "absent"
_THIRDS = {"upper": (0.0, 1 / 3), "lower": (2 / 3, 1.0), "central": (1 / 3, 2 / 3),
           "left": (0.0, 1 / 3), "right": (2 / 3, 1.0), "middle": (1 / 3, 2 / 3)}
# Each place's box ((x0, x1), (y0, y1)) in the tissue's box, as place_words names them.
PLACE_BOXES = {
    "in the upper left": (_THIRDS["left"], _THIRDS["upper"]),
    "in the upper right": (_THIRDS["right"], _THIRDS["upper"]),
    "in the lower left": (_THIRDS["left"], _THIRDS["lower"]),
    "in the lower right": (_THIRDS["right"], _THIRDS["lower"]),
    "in the centre": (_THIRDS["middle"], _THIRDS["central"]),
    "on the left side": (_THIRDS["left"], _THIRDS["central"]),
    "on the right side": (_THIRDS["right"], _THIRDS["central"]),
    "in the upper part": (_THIRDS["middle"], _THIRDS["upper"]),
    "in the lower part": (_THIRDS["middle"], _THIRDS["lower"]),
}
CATEGORIES = ("diagnosis", "presence", "absence", "location", "size")
QUESTION = {
    "diagnosis": "What is the most likely diagnosis for this slide?",
    "presence": "Which of these tissue types is present {} of the tissue?",
    "absence": "Which of these tissue types is NOT present on the slide?",
    "location": "Where is the largest area of {} located?",
    "size": "How large is the largest area of {}?",
}
COLUMNS = instructions.COLUMNS


# ------------------------------------------------------------------------ the region view


def relative_positions(cells_m2: np.ndarray, all_cells_n2: np.ndarray) -> np.ndarray:
  """Region grid cells -> centres in [0, 1]^2 relative to the bounding box of all cells (as
  ``pathflip_jax.tasks.instruct.relative_positions``, without importing JAX)."""
  low = all_cells_n2.min(axis=0)
  span = np.maximum(all_cells_n2.max(axis=0) - low + 1, 1)
  return ((cells_m2 - low + 0.5) / span).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Area:
  """A connected area of one tissue type on the region grid."""

  amount: float       # sum of its regions' fractions of the type, in regions
  x: float            # type-weighted centre, relative to the tissue's box
  y: float


@dataclasses.dataclass
class SlideRegions:
  """What the decoder receives of one slide, its pixels aside: per region the tissue composition
  ``fractions`` [M, len(TISSUES)] (mean over the region's patches) and place ``positions``
  [M, 2] (x, y in [0, 1] relative to the bounding box of every tissue region)."""

  fractions: np.ndarray
  positions: np.ndarray

  def amount(self, tissue: str) -> float:
    return float(self.fractions[:, TISSUES.index(tissue)].sum()) if len(self.fractions) else 0.0

  def peak(self, tissue: str) -> float:
    return float(self.fractions[:, TISSUES.index(tissue)].max()) if len(self.fractions) else 0.0

  def present(self, tissue: str) -> bool:
    return self.peak(tissue) >= PRESENT_MIN

  def absent(self, tissue: str) -> bool:
    return self.amount(tissue) <= 0.0

  def in_place(self, place: str, margin: float = 0.0) -> np.ndarray:
    """[M] bool: regions whose centre lies in ``place`` (one of ``PLACES``, a ninth of the
    tissue's box), its borders moved in by ``margin`` (out, where negative)."""
    (x0, x1), (y0, y1) = PLACE_BOXES[place]
    x, y = self.positions[:, 0], self.positions[:, 1]
    return ((x >= x0 + margin) & (x < x1 - margin) & (y >= y0 + margin) & (y < y1 - margin))

  def peak_in(self, tissue: str, place: str, margin: float = 0.0) -> float:
    """The largest share of ``tissue`` in a region of ``place`` (0 where it has none)."""
    inside = self.in_place(place, margin)
    return float(self.fractions[inside, TISSUES.index(tissue)].max()) if inside.any() else 0.0

  @functools.cached_property
  def cells(self) -> np.ndarray:
    """[M, 2] integer grid cells recovered from the positions: (cell + 0.5) / span, so the span
    of an axis is the smallest one that makes every position * span - 0.5 whole."""
    out = np.zeros(self.positions.shape, np.int64)
    for axis in range(2):
      values = self.positions[:, axis].astype(np.float64)
      for span in range(1, 100001):
        scaled = values * span - 0.5
        if np.all(np.abs(scaled - np.round(scaled)) < 1e-3 * max(1.0, span / 1000)):
          out[:, axis] = np.round(scaled).astype(np.int64)
          break
      else:
        raise ValueError(f"region positions {values[:4]} are not on a grid of at most 100000 "
                         "cells")
    return out

  def areas(self, tissue: str) -> list[Area]:
    """The connected areas of ``tissue``, largest first."""
    share = self.fractions[:, TISSUES.index(tissue)] if len(self.fractions) else np.zeros(0)
    member = share >= PRESENT_MIN
    if not member.any():
      return []
    cells = self.cells
    low = cells.min(axis=0)
    grid = np.zeros(tuple(cells.max(axis=0) - low + 1), bool)
    grid[tuple((cells[member] - low).T)] = True
    labels, count = ndimage.label(grid, structure=np.ones((3, 3), int))
    of_region = labels[tuple((cells - low).T)]
    out = []
    for k in range(1, count + 1):
      weight = np.where(member & (of_region == k), share, 0.0)
      total = float(weight.sum())
      x, y = (weight[:, None] * self.positions).sum(axis=0) / total
      out.append(Area(total, float(x), float(y)))
    return sorted(out, key=lambda a: -a.amount)


def slide_regions(coords_n2: np.ndarray, patch_size_level0: float, fractions_nk: np.ndarray,
                  region_patches: int, max_regions: int = 0) -> SlideRegions:
  """One slide's region view: patches grouped as ``regions.group_patches`` does, each region's
  mean patch composition, its place as ``instruct.relative_positions``; with ``max_regions``
  only the fullest regions, as the align stage's evaluation example keeps them
  (``data.eval_num_regions``)."""
  grid, _ = regions.group_patches(coords_n2, patch_size_level0, region_patches)
  fractions_nk = np.asarray(fractions_nk, np.float64)
  means = np.stack([fractions_nk[m].mean(axis=0) for m in grid.members]) if grid.members \
      else np.zeros((0, len(TISSUES)))
  keep = np.arange(grid.num_regions)
  if max_regions and grid.num_regions > max_regions:
    keep = keep[np.argsort(-grid.counts(), kind="stable")][:max_regions]
  positions = relative_positions(grid.cells[keep], grid.cells) if len(keep) else \
      np.zeros((0, 2), np.float32)
  return SlideRegions(means[keep], positions)


# --------------------------------------------------------------------------- definitions


def place_words(x: float, y: float) -> str:
  """A place in thirds of the tissue's box (one of ``PLACES``)."""
  vertical = "upper" if y < 1 / 3 else "lower" if y > 2 / 3 else "central"
  horizontal = "left" if x < 1 / 3 else "right" if x > 2 / 3 else ""
  if vertical == "central":
    return f"on the {horizontal} side" if horizontal else "in the centre"
  return f"in the {vertical} {horizontal}" if horizontal else f"in the {vertical} part"


def _near_line(value: float) -> bool:
  return min(abs(value - 1 / 3), abs(value - 2 / 3)) < LOCATION_MARGIN


def diagnosis_rule(view: SlideRegions) -> str:
  """The diagnosis that the region compositions show."""
  if not view.present("tumour"):
    return "benign"
  if view.present("necrosis"):
    return "carcinoma with necrosis"
  if view.amount("lymphocytes") > view.amount("stroma"):
    return "lymph node metastasis"
  return "carcinoma"


def size_word(amount: float, tertiles: Sequence[float]) -> str:
  return SIZE_WORDS[int(np.searchsorted(np.asarray(tertiles), amount, side="right"))]


@dataclasses.dataclass
class SlideFacts:
  """The answers one slide's region view defines (None: no robust answer, not asked)."""

  present: list[str]
  absent: list[str]
  present_in: dict[str, list[str]]     # per place: types present there (robustly)
  absent_in: dict[str, list[str]]      # per place: types nowhere near it
  diagnosis: str
  place: dict[str, str | None]
  size: dict[str, str | None]


def largest_area(view: SlideRegions, tissue: str) -> Area | None:
  areas = view.areas(tissue)
  return areas[0] if areas else None


def robust_place(view: SlideRegions, tissue: str) -> str | None:
  areas = view.areas(tissue)
  if not areas or (len(areas) > 1 and areas[0].amount < DOMINANCE * areas[1].amount):
    return None
  if _near_line(areas[0].x) or _near_line(areas[0].y):
    return None
  return place_words(areas[0].x, areas[0].y)


def robust_size(view: SlideRegions, tissue: str, tertiles: Sequence[float] | None
                ) -> str | None:
  if tertiles is None:
    return None
  if view.absent(tissue):
    return ABSENT
  areas = view.areas(tissue)
  if not areas or (len(areas) > 1 and areas[0].amount < DOMINANCE * areas[1].amount):
    return None
  if any(abs(areas[0].amount - t) < SIZE_MARGIN * t for t in tertiles):
    return None
  return size_word(areas[0].amount, tertiles)


def slide_facts(view: SlideRegions, tertiles: dict[str, list[float] | None]) -> SlideFacts:
  # In a place: present where a region at least LOCATION_MARGIN inside it holds PRESENT_MIN of
  # the type; absent where no region within LOCATION_MARGIN of it holds any.
  present_in = {p: [t for t in TISSUES if view.peak_in(t, p, LOCATION_MARGIN) >= PRESENT_MIN]
                for p in PLACES if view.in_place(p).any()}
  absent_in = {p: [t for t in TISSUES if view.peak_in(t, p, -LOCATION_MARGIN) <= 0.0]
               for p in present_in}
  return SlideFacts(
      present=[t for t in TISSUES if view.present(t)],
      absent=[t for t in TISSUES if view.absent(t)],
      present_in=present_in, absent_in=absent_in,
      diagnosis=diagnosis_rule(view),
      place={t: robust_place(view, t) if view.present(t) else None for t in ASKED},
      size={t: robust_size(view, t, tertiles.get(t)) for t in ASKED})


def size_tertiles(views: Iterable[SlideRegions]) -> dict[str, list[float] | None]:
  """Per asked type, the tertiles of its largest area over ``views`` (None with fewer than
  three slides showing it: its size is not asked)."""
  views = list(views)
  out = {}
  for tissue in ASKED:
    amounts = [a.amount for a in (largest_area(v, tissue) for v in views) if a is not None]
    out[tissue] = ([float(q) for q in np.quantile(amounts, [1 / 3, 2 / 3])]
                   if len(amounts) >= 3 else None)
  return out


# ---------------------------------------------------------------------- reading a cohort


@dataclasses.dataclass
class TiledSlide:
  slide_id: str
  num_patches: int
  coords: np.ndarray            # [n, 2] level-0 top-left corners
  patch_size_level0: float
  fractions: np.ndarray         # [n, len(TISSUES)] true tissue fractions (label maps)


def read_tiled(cohort_dir: str, patches_dir: str, slide_ids: set[str] | None = None
               ) -> dict[str, TiledSlide]:
  """Every tiled slide of the cohort (or of ``slide_ids``) with its patches' true tissue
  fractions; slides the tiling job skipped or failed are left out."""
  annotations = demo_annotations.CohortAnnotations(cohort_dir)
  shards = patch_shards.PatchShards(patches_dir)
  out = {}
  for row in patch_shards.read_slide_index(patches_dir):
    slide_id = row["slide_id"]
    if (slide_ids is not None and slide_id not in slide_ids) or not row.get("num_patches"):
      continue
    if slide_id not in annotations.slides:
      raise KeyError(f"{patches_dir}/slides.jsonl: slide {slide_id!r} is not in the demo cohort "
                     f"{cohort_dir}/manifest.jsonl")
    start, stop = shards.slide_range(slide_id)
    coords = np.array([[p["x"], p["y"]] for p in (shards[i] for i in range(start, stop))],
                      np.float64)
    size = float(row["patch_size_level0"])
    out[slide_id] = TiledSlide(slide_id, stop - start, coords, size,
                               annotations.tissue_fractions(slide_id, coords, size))
  shards.close()
  return out


def definitions_path(questions_csv: str) -> str:
  """The JSON written beside a questions CSV: its definitions' parameters and counts."""
  return os.path.splitext(questions_csv)[0] + ".json"


def read_definitions(questions_csv: str) -> dict[str, Any]:
  path = definitions_path(questions_csv)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path} not found: {questions_csv} was not written by data_prep.demo_questions "
        "(python -m data_prep.demo_questions --cohort_dir C --patches P), so the grid its "
        "answers are defined on is unknown")
  with open(path, encoding="utf-8") as f:
    definitions = json.load(f)
  for key in ("region_patches", "max_regions", "size_tertiles"):
    if key not in definitions:
      raise ValueError(f"{path}: field {key!r} missing")
  return definitions


# ------------------------------------------------------------------------ option drawing


class Balancer:
  """Counts, per split, category and question text, how often each option text was offered and
  right, and picks each question's answer and distractors so that

  * no answer takes more than ``ANSWER_CAP`` of a question text's questions, nor is right in
    more than ``ANSWER_CAP`` of the questions offering it (give or take a few): a question is
    skipped rather than asked with such an answer (a slide whose only present types are common
    ones gets no presence question), so neither the most common answer nor the option most
    often right is a good guess;
  * distractors keep every option text right about a quarter of the times it is offered;
  * among what is left, rarer answers go first (answers spread over the texts)."""

  def __init__(self, rng: np.random.Generator):
    self.rng = rng
    self.offered: dict[tuple, dict[str, int]] = {}
    self.right: dict[tuple, dict[str, int]] = {}
    self.letters: dict[tuple, int] = {}

  def _cost(self, key: tuple, correct: str, options: Sequence[str]) -> float:
    offered, right = self.offered.get(key, {}), self.right.get(key, {})
    cost = 0.0
    for text in options:
      o, c = offered.get(text, 0), right.get(text, 0)
      new_c = c + (text == correct)
      cost += (new_c - (o + 1) / 4) ** 2 - (c - o / 4) ** 2
    return cost + 0.25 * right.get(correct, 0)

  def allowed(self, key: tuple, correct: str, slack: float = TRAIN_SLACK) -> bool:
    """Whether ``correct`` may be the answer of one more question of ``key``: its share of the
    key's answers and the share of its offers that were right both stay under ``ANSWER_CAP``
    (give or take ``slack`` questions)."""
    right, offered = self.right.get(key, {}), self.offered.get(key, {})
    count = right.get(correct, 0) + 1
    limit = ANSWER_CAP * min(sum(right.values()) + 1, offered.get(correct, 0) + 1)
    return count <= limit + slack

  def pick(self, group: tuple, candidates: Sequence[tuple[str, str, Sequence[str]]],
           used: set[tuple], capped: bool = True, slack: float = TRAIN_SLACK
           ) -> tuple[str, str, tuple[str, ...]] | None:
    """The best (question, correct, 3 distractors) among ``candidates`` (question, correct,
    distractor pool), skipping option sets in ``used`` and, when ``capped``, answers over their
    cap; None when nothing is left."""
    best, best_cost = None, np.inf
    for question, correct, pool in candidates:
      key = group + (question,)
      if capped and not self.allowed(key, correct, slack):
        continue
      for wrong in itertools.combinations(sorted(pool), 3):
        if (question, correct, wrong) in used:
          continue
        cost = self._cost(key, correct, (correct,) + wrong) + 1e-6 * self.rng.random()
        if cost < best_cost:
          best, best_cost = (question, correct, wrong), cost
    return best

  def commit(self, group: tuple, question: str, correct: str, wrong: Sequence[str]
             ) -> tuple[list[str], str]:
    """Counts a picked question; returns its options A-D and the right letter (cycled per
    split and category, distractors in a random order)."""
    key = group + (question,)
    offered = self.offered.setdefault(key, {})
    for text in (correct,) + tuple(wrong):
      offered[text] = offered.get(text, 0) + 1
    right = self.right.setdefault(key, {})
    right[correct] = right.get(correct, 0) + 1
    position = self.letters.get(group, 0) % 4
    self.letters[group] = self.letters.get(group, 0) + 1
    options = [wrong[i] for i in self.rng.permutation(len(wrong))]
    options.insert(position, correct)
    return options, instructions.LETTERS[position]


def select_evaluation(pools: dict[str, list[tuple[str, str, list[str]]]], quota: int,
                      rng: np.random.Generator, equalise: bool = True
                      ) -> list[tuple[str, tuple[str, str, list[str]]]]:
  """(slide, candidate) pairs of one evaluation split and category: at most ``quota`` per
  slide, each a different fact, and per question text every answer equally often.

  Each text goes in cycles that ask each of its answers still on offer once (scarcest first,
  from the slide with the most quota left); a text stops at the first cycle with fewer than
  ``MIN_ANSWERS`` answers, so no answer of a text is right much more than a third of the time
  (an answer that runs out early leaves the others at most a third each). Without
  ``equalise`` (diagnosis, balanced by the cohort), every slide's first candidate."""
  if not equalise:
    return [(s, pool[0]) for s, pool in pools.items() if pool]
  left = {s: quota for s in pools}
  by_text: dict[str, dict[str, list[tuple[str, tuple]]]] = {}
  for slide_id, pool in pools.items():
    for candidate in pool:
      by_text.setdefault(candidate[0], {}).setdefault(candidate[1], []).append(
          (slide_id, candidate))
  active = [q for q in sorted(by_text) if len(by_text[q]) >= MIN_ANSWERS]
  out = []
  while active:
    for question in [active[int(i)] for i in rng.permutation(len(active))]:
      answers = by_text[question]
      # Answers no slide with quota left can give any more drop out of the text's cycles.
      for answer in [a for a, offers in answers.items() if not any(left[s] for s, _ in offers)]:
        del answers[answer]
      spare = dict(left)
      cycle = []
      for answer in sorted(answers, key=lambda a: (sum(left[s] > 0 for s, _ in answers[a]), a)):
        offers = [(s, c) for s, c in answers[answer] if spare[s] > 0]
        if offers:
          best = max(spare[s] for s, _ in offers)
          offers = [o for o in offers if spare[o[0]] == best]
          slide_id, candidate = offers[int(rng.integers(len(offers)))]
          spare[slide_id] -= 1
          cycle.append((slide_id, candidate))
      if len(cycle) < MIN_ANSWERS:
        active.remove(question)
        continue
      for slide_id, candidate in cycle:
        left[slide_id] -= 1
        answers[candidate[1]].remove((slide_id, candidate))
        out.append((slide_id, candidate))
  return out


def select_balanced_sets(pools: dict[str, list[tuple[str, str, list[str]]]], quota: int,
                         rng: np.random.Generator, repeat_facts: bool = False
                         ) -> list[tuple[str, tuple[str, str, tuple[str, ...]]]]:
  """(slide, (question, correct, distractors)) picks of one split and category whose
  distractors are forced by the slide (presence: its absent types; absence: its present
  ones), chosen so that for every option set each of its four members is the answer equally
  often. Balancing each option's marginal share is not enough: the cohort's tissues co-occur
  (necrosis only beside tumour), so an option set can imply its answer; with every set asked
  in whole cycles (each member right once), the options alone say nothing and a question-only
  predictor is at chance on every set. At most ``quota`` questions per slide; a slide's fact
  (its correct answer) is asked once unless ``repeat_facts`` (training: the same fact with other
  distractors). Sets that cannot complete a cycle (a member never the lone present or absent
  type of any slide) are never asked."""
  by_set: dict[tuple[str, tuple[str, ...]], dict[str, list[str]]] = {}
  for slide_id, pool in pools.items():
    for question, correct, distractors in pool:
      for wrong in itertools.combinations(sorted(distractors), 3):
        key = (question, tuple(sorted((correct,) + wrong)))
        by_set.setdefault(key, {}).setdefault(correct, []).append(slide_id)
  left = {s: quota for s in pools}
  asked: set[tuple] = set()
  out = []
  active = [k for k in sorted(by_set) if len(by_set[k]) >= MIN_ANSWERS]
  while active:
    progressed = False
    for key in [active[int(i)] for i in rng.permutation(len(active))]:
      question, members = key
      spare, cycle = dict(left), []
      # The scarcest answer first, each from the slide with the most quota left.
      for answer in sorted(by_set[key], key=lambda a: (len(by_set[key][a]), a)):
        offers = [s for s in by_set[key][answer] if spare[s] > 0
                  and (s, question, answer, members) not in asked
                  and (repeat_facts or (s, question, answer) not in asked)]
        if not offers:
          continue
        best = max(spare[s] for s in offers)
        offers = [s for s in offers if spare[s] == best]
        slide_id = offers[int(rng.integers(len(offers)))]
        spare[slide_id] -= 1
        cycle.append((slide_id, answer))
      if len(cycle) < len(by_set[key]):   # an answer ran out: the set's cycles end
        active.remove(key)
        continue
      for slide_id, answer in cycle:
        left[slide_id] -= 1
        asked.update({(slide_id, question, answer, members), (slide_id, question, answer)})
        wrong = tuple(m for m in members if m != answer)
        out.append((slide_id, (question, answer, wrong)))
      progressed = True
    if not progressed:
      break
  return out


def draw_like_answers(pool: Sequence[str], answered: dict[str, int],
                      rng: np.random.Generator) -> tuple[str, ...]:
  """Three distractors from ``pool``, each drawn (without replacement) in proportion to how
  often it is the answer of the same question text (``answered``), texts never an answer
  only when nothing else is left. The four options are then as likely to have been drawn as
  answer as as distractors, so which one is right cannot be read off them: a question-only
  predictor is at chance."""
  pool = sorted(pool)
  weights = np.array([answered.get(t, 0) + 1e-3 for t in pool], np.float64)
  picks = rng.choice(len(pool), size=3, replace=False, p=weights / weights.sum())
  return tuple(sorted(pool[int(i)] for i in picks))


def candidates(category: str, facts: SlideFacts, diagnosis: str
               ) -> list[tuple[str, str, list[str]]]:
  """(question, correct option, distractor pool) of every question ``category`` can ask."""
  if category == "diagnosis":
    if facts.diagnosis != diagnosis:
      return []
    return [(QUESTION["diagnosis"], diagnosis, [d for d in DIAGNOSES if d != diagnosis])]
  if category == "presence":
    return [(QUESTION["presence"].format(place), t, list(facts.absent_in[place]))
            for place, present in facts.present_in.items() if len(facts.absent_in[place]) >= 3
            for t in present]
  if category == "absence":
    if len(facts.present) < 3:
      return []
    return [(QUESTION["absence"], t, list(facts.present)) for t in facts.absent]
  if category == "location":
    return [(QUESTION["location"].format(t), place, [p for p in PLACES if p != place])
            for t, place in facts.place.items() if place]
  if category == "size":
    options = SIZE_WORDS + (ABSENT,)
    return [(QUESTION["size"].format(t), word, [w for w in options if w != word])
            for t, word in facts.size.items() if word]
  raise ValueError(f"question category {category!r}: expected one of {CATEGORIES}")


def open_questions(facts: SlideFacts, diagnosis: str, caption: str
                   ) -> list[tuple[str, str, str]]:
  """(category, question, answer) of the open questions, defined as the multiple-choice ones."""
  out = []
  if facts.diagnosis == diagnosis:
    out.append(("diagnosis", "What is the diagnosis?", diagnosis))
  if facts.present:
    out.append(("presence", "Which tissue types are present on the slide?",
                ", ".join(sorted(facts.present))))
  if caption:
    out.append(("description", "Describe the slide.", caption))
  for tissue in ASKED:
    place = facts.place.get(tissue)
    if place:
      out.append(("location", f"Where is the largest area of {tissue}?",
                  place[0].upper() + place[1:] + "."))
      break
  return out


# ------------------------------------------------------------------------------------ run


def _median_patches(tiled: dict[str, TiledSlide]) -> float:
  return float(np.median([t.num_patches for t in tiled.values()])) if tiled else 0.0


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Writes the questions CSV and its definitions JSON; returns the summary (also in the
  JSON)."""
  parser = argparse.ArgumentParser(prog="python -m data_prep.demo_questions",
                                   description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--cohort_dir", required=True, help="make_demo_cohort output")
  parser.add_argument("--patches", required=True, help="tile_slides output of that cohort")
  parser.add_argument("--region_patches", type=int, default=2,
                      help="R: regions of R x R patches (the align run's data.region_patches)")
  parser.add_argument("--max_regions", type=int, default=0,
                      help="keep the fullest N regions of a slide, as the align run's "
                           "data.eval_num_regions does (0: all)")
  parser.add_argument("--output", default="", help="default: COHORT_DIR/questions.csv")
  parser.add_argument("--train_question_draws", type=int, default=3,
                      help="training slides get this many times --eval_questions per "
                           "category, facts repeated with other distractors (0: as many as "
                           "evaluation slides)")
  parser.add_argument("--eval_questions", type=int, default=2,
                      help="validation and test slides: questions per category (diagnosis: 1)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  if args.region_patches < 1:
    raise SystemExit(f"--region_patches {args.region_patches}: expected >= 1")
  if args.max_regions < 0 or args.eval_questions < 1 or args.train_question_draws < 0:
    raise SystemExit("--max_regions and --train_question_draws must be >= 0, "
                     "--eval_questions >= 1")
  start = time.time()
  output = args.output or os.path.join(args.cohort_dir, "questions.csv")
  annotations = demo_annotations.CohortAnnotations(args.cohort_dir)
  tiled = read_tiled(args.cohort_dir, args.patches)
  if not tiled:
    raise ValueError(f"{args.patches}: no tiled slide of the cohort {args.cohort_dir}")
  views = {s: slide_regions(t.coords, t.patch_size_level0, t.fractions, args.region_patches,
                            args.max_regions) for s, t in tiled.items()}
  split_of = {s: annotations.split(s) for s in tiled}
  train_views = [v for s, v in views.items() if split_of[s] == "train"]
  # Tertiles from the training slides (nothing is chosen on the test split); a cohort too small
  # to have three training slides with a type takes them from all its slides.
  tertiles = size_tertiles(train_views)
  everywhere = size_tertiles(views.values())
  tertiles = {t: tertiles[t] if tertiles[t] is not None else everywhere[t] for t in ASKED}
  facts = {s: slide_facts(v, tertiles) for s, v in views.items()}

  rng = np.random.default_rng([args.seed, 58])
  balancer = Balancer(rng)
  chosen: dict[str, list[dict[str, str]]] = {s: [] for s in tiled}
  order = [list(tiled)[int(i)] for i in rng.permutation(len(tiled))]
  pools = {(s, c): candidates(c, facts[s], annotations.slides[s]["diagnosis"])
           for s in order for c in CATEGORIES}

  def ask(slide_id: str, category: str, picked: tuple[str, str, tuple[str, ...]]) -> None:
    split = split_of[slide_id]
    question, correct, wrong = picked
    texts, letter = balancer.commit((split, category), question, correct, wrong)
    chosen[slide_id].append({
        "slide_id": slide_id, "split": split, "category": category, "question": question,
        "A": texts[0], "B": texts[1], "C": texts[2], "D": texts[3], "answer": letter,
        "answer_text": correct, "type": instructions.MULTIPLE_CHOICE})

  # Training slides: round by round over the slides, so that each slide's later questions are
  # balanced against every slide's earlier ones; answers capped, not equalised (training needs
  # many questions more than exact balance).
  train_quota = args.eval_questions * (args.train_question_draws or 1)
  used: dict[tuple, set[tuple]] = {}
  for round_ in range(train_quota):
    for slide_id in (s for s in order if split_of[s] == "train"):
      for category in CATEGORIES:
        # One diagnosis question has one option set (the four diagnoses): asking it again
        # would only reorder them, which training does itself (instructions.shuffle_options).
        if round_ and category == "diagnosis":
          continue
        if category in ("presence", "absence"):
          continue   # below, in whole cycles per option set
        seen = used.setdefault((slide_id, category), set())
        # Diagnoses are balanced in every split by the cohort itself.
        picked = balancer.pick(("train", category), pools[(slide_id, category)], seen,
                               capped=category != "diagnosis", slack=TRAIN_SLACK)
        if picked is not None:
          seen.add(picked)
          ask(slide_id, category, picked)
  # Presence and absence, whose distractors are forced (the slide's absent or present types),
  # on every split: whole cycles per option set (select_balanced_sets). Location and size on
  # evaluation slides: every answer of a question text equally often (select_evaluation),
  # distractors drawn like the answers (draw_like_answers).
  for split in ("train", "val", "test"):
    slides = [s for s in order if split_of[s] == split]
    for category in ("presence", "absence"):
      picks = select_balanced_sets({s: pools[(s, category)] for s in slides},
                                   train_quota if split == "train" else args.eval_questions,
                                   rng, repeat_facts=split == "train")
      for index in rng.permutation(len(picks)):
        slide_id, picked = picks[int(index)]
        ask(slide_id, category, picked)
  for split in ("val", "test"):
    slides = [s for s in order if split_of[s] == split]
    for category in CATEGORIES:
      if category in ("presence", "absence"):
        continue
      quota = 1 if category == "diagnosis" else args.eval_questions
      picks = select_evaluation({s: pools[(s, category)] for s in slides}, quota, rng,
                                equalise=category != "diagnosis")
      answered: dict[str, dict[str, int]] = {}
      for _, (question, correct, _) in picks:
        answered.setdefault(question, {})[correct] = answered.get(question, {}).get(correct,
                                                                                     0) + 1
      for index in rng.permutation(len(picks)):
        slide_id, (question, correct, pool) = picks[int(index)]
        ask(slide_id, category,
            (question, correct, draw_like_answers(pool, answered[question], rng)))

  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  counts: dict[str, dict[str, int]] = {}
  tmp = f"{output}.partial"
  with open(tmp, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=list(COLUMNS))
    writer.writeheader()
    rank = {s: i for i, s in enumerate(annotations.slides)}
    for slide_id in sorted(tiled, key=rank.__getitem__):
      row = annotations.slides[slide_id]
      for question in chosen[slide_id]:
        writer.writerow(question)
        split_counts = counts.setdefault(question["split"], {})
        split_counts[question["category"]] = split_counts.get(question["category"], 0) + 1
      for category, question, answer in open_questions(facts[slide_id], row["diagnosis"],
                                                       row.get("caption", "")):
        writer.writerow({"slide_id": slide_id, "split": split_of[slide_id],
                         "category": category, "question": question, "A": "", "B": "", "C": "",
                         "D": "", "answer": "", "answer_text": answer,
                         "type": instructions.OPEN})
  os.replace(tmp, output)

  test = [s for s in tiled if split_of[s] == "test"]
  summary = {
      "questions": os.path.abspath(output), "region_patches": args.region_patches,
      "max_regions": args.max_regions, "size_tertiles": tertiles,
      "present_min": PRESENT_MIN, "location_margin": LOCATION_MARGIN, "dominance": DOMINANCE,
      "size_margin": SIZE_MARGIN, "train_question_draws": args.train_question_draws,
      "eval_questions": args.eval_questions, "seed": args.seed,
      "slides": {sp: sum(v == sp for v in split_of.values()) for sp in ("train", "val", "test")},
      "multiple_choice": counts,
      "diagnosis_rule_disagrees": sorted(s for s in tiled if facts[s].diagnosis
                                         != annotations.slides[s]["diagnosis"]),
      "test_slides_per_diagnosis": {d: sum(annotations.slides[s]["diagnosis"] == d for s in test)
                                    for d in DIAGNOSES},
      "test_slides_per_lesion": {t: sum(t in facts[s].present for s in test) for t in LESIONS},
      "median_tissue_patches": _median_patches(tiled),
      "median_regions": float(np.median([len(v.fractions) for v in views.values()])),
      "seconds": round(time.time() - start, 1),
  }
  path = definitions_path(output)
  with open(f"{path}.partial", "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=1)
  os.replace(f"{path}.partial", path)
  print(f"[demo_questions] {sum(sum(c.values()) for c in counts.values())} multiple-choice "
        f"questions on {len(tiled)} tiled slides in {summary['seconds']}s -> {output}",
        file=sys.stderr)
  return summary


def main() -> None:
  run(sys.argv[1:])


if __name__ == "__main__":
  from data_prep import demo_questions
  demo_questions.main()
