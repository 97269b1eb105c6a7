r"""How far the demo cohort's multiple-choice questions can be answered from the tiled patches.

  python -m data_prep.demo_vqa_oracle --cohort_dir runs/quickstart/cohort \
      --patches runs/quickstart/patches [--split test] [--predictions W2/eval/vqa_test.jsonl] \
      [--features runs/quickstart/features] [--output oracle.json]

The oracle knows the exact tissue composition of every tiled patch (from the cohort's label
maps) and nothing else, and answers each question the way the generator words it:

  diagnosis  necrosis seen -> carcinoma with necrosis; tumour on a lymphoid background (more
             lymphocytes than stroma) -> lymph node metastasis; tumour -> carcinoma; else benign
  presence   the option with the most tissue; absence: the option with the least
  location   the tissue-weighted centre of the largest connected patch area of that tissue,
             placed in thirds of the tiled tissue's bounding box (make_demo_cohort's words)
  size       that area (tissue fractions x patch area) in make_demo_cohort's size words

It is a perfect patch-level tissue classifier, so its accuracy is a practical ceiling for the
instruct stage's VQA accuracy (beside the floor of always answering one letter); not a proven
one, since a patch's pixels also show where inside it a lesion lies. Location and
size fall short of 1 because the generator words them from each lesion's exact outline and the
whole tissue's bounding box, while a slide shows ~30-40 patches of 128 µm: a lesion of a few
patches that straddles a third of the box has no single right answer on the patch grid.
``--predictions`` (the vqa evaluator's per-question output) adds the model's accuracy on the
same questions.

``--features`` (an extract_features output of the cohort) adds a realistic pipeline beside the
ceiling: a patch probe, a logistic regression on the frozen patch features trained on the
training slides' patch labels (each patch's main tissue, from the label maps; L2 by
cross-validation grouped by slide, as the patch_linear_probe evaluator), whose predicted tissue per
patch goes through the same rules. It has far more supervision than the instruct stage (a label
for every training patch against a few questions per slide), so it tells whether the features
or the weak supervision limit the model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from data_prep import make_demo_cohort
from pathflip_jax import report
from pathflip_jax.data import demo_annotations, feature_shards, instructions, manifest, patch_shards
from pathflip_jax.evaluators import linear_probe

TISSUES = [demo_annotations.TISSUE_NAMES[c] for c in demo_annotations.CLASS_LABELS]


class SlidePatches:
  """One slide's tiled patches: grid cells [n, 2] (col, row) and tissue fractions [n, tissues]."""

  def __init__(self, cells_n2: np.ndarray, fractions_nk: np.ndarray, patch_mm: float):
    self.cells, self.fractions, self.patch_mm = cells_n2, fractions_nk, patch_mm

  def total(self, tissue: str) -> float:
    return float(self.fractions[:, TISSUES.index(tissue)].sum())

  def largest_area(self, tissue: str) -> np.ndarray:
    """Per patch, its fraction of ``tissue`` if it belongs to the largest connected area of it."""
    share = self.fractions[:, TISSUES.index(tissue)]
    low = self.cells.min(axis=0)
    grid = np.zeros(tuple(self.cells.max(axis=0) - low + 1), np.float64)
    grid[tuple((self.cells - low).T)] = share
    labels, count = ndimage.label(grid > 0)
    if not count:
      return np.zeros_like(share)
    sums = ndimage.sum(grid, labels, range(1, count + 1))
    keep = labels[tuple((self.cells - low).T)] == int(np.argmax(sums)) + 1
    return np.where(keep, share, 0.0)


def oracle_answer(question: instructions.Question, slide: SlidePatches) -> str:
  """The option text the oracle picks ("" when none of the options says what it sees)."""
  options = list(question.options)
  category = question.category
  if category == "presence":
    return max(options, key=slide.total)
  if category == "absence":
    return min(options, key=slide.total)
  if category == "diagnosis":
    seen = {t: slide.total(t) > 0 for t in TISSUES}
    if not seen["tumour"]:
      return "benign"
    if seen["necrosis"]:
      return "carcinoma with necrosis"
    if slide.total("lymphocytes") > slide.total("stroma"):
      return "lymph node metastasis"
    return "carcinoma"
  if category in ("location", "size"):
    tissue = question.question.rsplit(" of ", 1)[-1].replace(" located", "").rstrip("?").strip()
    if tissue not in TISSUES:
      raise ValueError(f"{category} question {question.question!r}: no tissue type named")
    weight = slide.largest_area(tissue)
    if category == "size":
      area_mm2 = float(weight.sum()) * slide.patch_mm ** 2
      return make_demo_cohort._size_word(area_mm2) if area_mm2 > 0 else "absent"  # pylint: disable=protected-access
    if not weight.any():
      return ""
    centre = ((slide.cells + 0.5) * weight[:, None]).sum(0) / weight.sum()
    low, high = slide.cells.min(axis=0), slide.cells.max(axis=0) + 1
    return make_demo_cohort._location_words(  # pylint: disable=protected-access
        float(centre[0]), float(centre[1]), (low[0], low[1], high[0], high[1]), near_edge=False)
  raise ValueError(f"question category {category!r}: the oracle answers diagnosis, presence, "
                   "absence, location and size")


def read_slides(cohort_dir: str, patches_dir: str, slide_ids: set[str]
                ) -> dict[str, SlidePatches]:
  """Tiled patches of ``slide_ids`` with their true tissue fractions (slides without tiled
  patches, e.g. failed ones, are left out)."""
  annotations = demo_annotations.CohortAnnotations(cohort_dir)
  shards = patch_shards.PatchShards(patches_dir)
  out = {}
  for row in patch_shards.read_slide_index(patches_dir):
    slide_id = row["slide_id"]
    if slide_id not in slide_ids:
      continue
    start, stop = shards.slide_range(slide_id)
    patches = [shards[i] for i in range(start, stop)]
    size = float(row["patch_size_level0"])
    coords = np.array([[p["x"], p["y"]] for p in patches], np.float64)
    cells = np.array([[p["col"], p["row"]] for p in patches], np.int64)
    out[slide_id] = SlidePatches(cells, annotations.tissue_fractions(slide_id, coords, size),
                                 patch_mm=size * float(row["mpp"]) / 1000.0)
  return out


def probe_slides(cohort_dir: str, features_dir: str, train_ids: set[str],
                 slide_ids: set[str]) -> dict[str, SlidePatches]:
  """``slide_ids``' patches with the tissue a patch probe predicts (one-hot fractions); the probe
  is a logistic regression on the frozen features of ``train_ids``' patches, labelled with each
  patch's main tissue (patches that no tissue type covers by half are left out of training)."""
  annotations = demo_annotations.CohortAnnotations(cohort_dir)
  shards = feature_shards.FeatureShards(features_dir)
  train_x, train_y, groups, slides = [], [], [], {}
  for slide_id in sorted((train_ids | slide_ids) & set(shards.slide_ids)):
    record = shards.get(slide_id)
    coords = np.asarray(record["coords"], np.float64)
    size = float(record["patch_size_level0"])
    features = np.asarray(record["features"], np.float64)
    if slide_id in train_ids:
      fractions = annotations.tissue_fractions(slide_id, coords, size)
      labelled = fractions.max(axis=1) >= 0.5
      train_x.append(features[labelled])
      train_y.append(fractions[labelled].argmax(axis=1))
      groups += [slide_id] * int(labelled.sum())
    if slide_id in slide_ids:
      # Grid cells from the patch origins: the oracle's rules use cell offsets only.
      cells = np.floor(coords / size).astype(np.int64)
      slides[slide_id] = (cells, features, size * float(record["mpp"]) / 1000.0)
  if not train_x:
    raise ValueError(f"{features_dir}: no features of the cohort's training slides to fit the "
                     "patch probe on")
  logits_fn, _ = linear_probe.fit_probe(np.concatenate(train_x), np.concatenate(train_y),
                                        np.array(groups), len(TISSUES))
  eye = np.eye(len(TISSUES))
  return {slide_id: SlidePatches(cells, eye[logits_fn(features).argmax(axis=1)], patch_mm)
          for slide_id, (cells, features, patch_mm) in slides.items()}


def evaluate(cohort_dir: str, patches_dir: str, split: str = "test",
             predictions: str = "", features_dir: str = "") -> dict[str, Any]:
  """Per category: questions, oracle accuracy, best single letter (and the model's accuracy
  from a vqa evaluator output, the patch probe's from ``features_dir``); "all" over every
  multiple-choice question of ``split``."""
  every = instructions.read_questions(os.path.join(cohort_dir, "questions.csv"))
  questions = [q for q in every
               if q.type == instructions.MULTIPLE_CHOICE and (not split or q.split == split)]
  if not questions:
    raise ValueError(f"{cohort_dir}/questions.csv: no multiple-choice questions of split "
                     f"{split!r}")
  slides = read_slides(cohort_dir, patches_dir, {q.slide_id for q in questions})
  questions = [q for q in questions if q.slide_id in slides]
  probed = {}
  if features_dir:
    train_ids = {q.slide_id for q in every if q.split == "train"}
    probed = probe_slides(cohort_dir, features_dir, train_ids, set(slides))
  model = {}
  if predictions:
    for _, row in manifest.json_lines(predictions):
      if row.get("type") == instructions.MULTIPLE_CHOICE:
        model[(row["slide_id"], row["question"])] = row.get("parsed") == row["answer"]
  rows: dict[str, dict[str, list]] = {}
  for q in questions:
    right = oracle_answer(q, slides[q.slide_id]) == q.correct_text
    for key in (q.category, "all"):
      entry = rows.setdefault(key, {"oracle": [], "letters": [], "model": [], "probe": []})
      entry["oracle"].append(right)
      entry["letters"].append(q.answer)
      if q.slide_id in probed:
        entry["probe"].append(oracle_answer(q, probed[q.slide_id]) == q.correct_text)
      if (q.slide_id, q.question) in model:
        entry["model"].append(model[(q.slide_id, q.question)])
  result = {}
  for key, entry in rows.items():
    letters = entry["letters"]
    result[key] = {"questions": len(letters), "oracle": float(np.mean(entry["oracle"])),
                   "best_single_letter": max(letters.count(x) for x in set(letters))
                   / len(letters)}
    if entry["model"]:
      result[key]["model"] = float(np.mean(entry["model"]))
    if entry["probe"]:
      result[key]["patch_probe"] = float(np.mean(entry["probe"]))
  return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--cohort_dir", required=True, help="make_demo_cohort output")
  parser.add_argument("--patches", required=True, help="tile_slides output of that cohort")
  parser.add_argument("--split", default="test", help='questions of this split ("": all)')
  parser.add_argument("--predictions", default="",
                      help="the vqa evaluator's per-question output (eval/vqa_<split>.jsonl)")
  parser.add_argument("--features", default="",
                      help="extract_features output of the cohort: adds the patch probe")
  parser.add_argument("--output", default="", help="write the result as JSON here")
  args = parser.parse_args(argv)
  result = evaluate(args.cohort_dir, args.patches, args.split, args.predictions, args.features)
  print("\n".join(report.vqa_ceiling_table(result)))
  if args.output:
    with open(args.output, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1, sort_keys=True)
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
