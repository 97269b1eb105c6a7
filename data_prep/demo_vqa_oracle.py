r"""The demo questions answered by rules from what the decoder receives: region compositions
and places.

  python -m data_prep.demo_vqa_oracle --cohort_dir runs/quickstart/cohort \
      --patches runs/quickstart/patches [--questions COHORT/questions.csv] [--split test] \
      [--predictions W2/eval/vqa_test.jsonl] [--features runs/quickstart/features] \
      [--output oracle.json] [--check]

``data_prep.demo_questions`` defines every multiple-choice answer from the tiled slide's regions
of R x R patches: each region's tissue composition (the mean tissue fractions of its patches)
and its place relative to the tissue's bounding box, the view the instruct stage's decoder gets
(a slide token and one token per region with its position). This answerer reads only that view
(with the region size and size tertiles recorded beside the questions, ``questions.json``):

  diagnosis  tumour present (>= 10% of some region) -> necrosis present: carcinoma with
             necrosis; more lymphocytes than stroma: lymph node metastasis; else carcinoma;
             no tumour -> benign
  presence   the option covering the most of some region centred in the place the question
             names; absence: the option covering the least of the slide
  location   the largest connected area of the type on the region grid, its type-weighted
             centre in thirds of the tissue's box
  size       that area's amount (in regions) against the tertiles; "absent" if not present

With the true compositions (from the cohort's label maps) it is a perfect region reader: its
accuracy (``oracle``) tells whether the questions are answerable from the decoder's input at all
(>= 0.98 in every category by construction of the questions, unless the view is cut, e.g. by
fewer regions than the questions were written for). Beside it, per category: the best single
letter (always answering it) and three predictors that see the question and option texts
only, fitted on the *training* questions and applied to the split's: ``question_only`` (per
question text, the option text most often the right answer), ``option_prior`` (the option text
right in the largest share of the questions offering it) and ``option_set`` (per question text
and set of four options, the member most often right). Balanced options keep them <= 0.40
(``--check`` requires it of the letter, question-only and option set; the option prior is
reported).
``--predictions`` (the vqa evaluator's per-question output) adds the model's accuracy on the
same questions.

``--features`` (an extract_features output of the cohort) adds a realistic pipeline beside the
ceiling: a patch probe, a logistic regression on the frozen patch features trained on the
training slides' patch labels (each patch's main tissue, from the label maps; L2 by
cross-validation grouped by slide, as the patch_linear_probe evaluator), whose predicted tissue
per patch (one-hot) makes the region compositions the same rules read. It has far more
supervision than the instruct stage (a label for every training patch against a few questions
per slide), so it tells whether the features or the weak supervision limit the model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Sequence

import numpy as np

from data_prep import demo_questions as dq
from pathflip_jax import report
from pathflip_jax.data import demo_annotations, feature_shards, instructions, manifest

TISSUES = dq.TISSUES
# Acceptance of a question set (``--check``): the view answers it, nothing else does.
MIN_ORACLE = 0.98
MAX_TRIVIAL = 0.40


def question_tissue(question: instructions.Question) -> str:
  """The tissue type a location or size question names ("... largest area of tumour ...")."""
  tissue = question.question.rsplit(" of ", 1)[-1].replace(" located", "").rstrip("?").strip()
  if tissue not in TISSUES:
    raise ValueError(f"{question.category} question {question.question!r} of slide "
                     f"{question.slide_id}: no tissue type named (expected one of {TISSUES})")
  return tissue


def question_place(question: instructions.Question) -> str:
  """The place a presence question names ("... present in the upper left of the tissue?")."""
  for place in sorted(dq.PLACES, key=len, reverse=True):
    if f" {place} " in question.question:
      return place
  raise ValueError(f"presence question {question.question!r} of slide {question.slide_id}: "
                   f"no place named (expected one of {dq.PLACES})")


def oracle_answer(question: instructions.Question, view: dq.SlideRegions,
                  tertiles: dict[str, Sequence[float] | None]) -> str:
  """The option text the rules pick from a slide's region view ("" where the view gives no
  answer, e.g. the location of a type it does not show)."""
  options = list(question.options)
  category = question.category
  if category == "presence":
    place = question_place(question)
    return max(options, key=lambda t: view.peak_in(t, place))
  if category == "absence":
    return min(options, key=view.peak)
  if category == "diagnosis":
    return dq.diagnosis_rule(view)
  if category in ("location", "size"):
    tissue = question_tissue(question)
    area = dq.largest_area(view, tissue)
    if category == "size":
      if not view.present(tissue):
        return dq.ABSENT
      thresholds = tertiles.get(tissue)
      return dq.size_word(area.amount, thresholds) if thresholds is not None else ""
    return dq.place_words(area.x, area.y) if area is not None else ""
  raise ValueError(f"question category {category!r}: the oracle answers {dq.CATEGORIES}")


def question_only(train: Sequence[instructions.Question], by_rate: bool = False,
                  by_set: bool = False) -> Callable[[instructions.Question], str]:
  """A predictor that sees the question and option texts only, fitted on ``train``: per question
  text (else per category), the option that was most often the right answer, or with
  ``by_rate`` the one right in the largest share of the questions offering it (stronger where
  distractors are forced, e.g. types that are rarely absent are rarely absence distractors),
  or with ``by_set`` the one most often right with the same four options (what a decoder
  trained without visual tokens can learn: which member of an option set is right).
  Ties: the more often right, then the later text."""
  offered: dict[tuple, dict[str, int]] = {}
  right: dict[tuple, dict[str, int]] = {}

  def keys(q: instructions.Question) -> tuple[tuple, ...]:
    text = (q.category, q.question)
    return ((text + (tuple(sorted(q.options)),), text, (q.category,)) if by_set
            else (text, (q.category,)))

  for q in train:
    for key in keys(q):
      for text in q.options:
        offered.setdefault(key, {})[text] = offered.get(key, {}).get(text, 0) + 1
      right.setdefault(key, {})[q.correct_text] = right.get(key, {}).get(q.correct_text, 0) + 1

  def predict(q: instructions.Question) -> str:
    key = next(k for k in keys(q) + ((),) if k in offered or not k)
    seen, hits = offered.get(key, {}), right.get(key, {})
    if by_rate:
      return max(q.options, key=lambda t: (hits.get(t, 0) / seen[t] if seen.get(t) else 0.0,
                                           hits.get(t, 0), t))
    return max(q.options, key=lambda t: (hits.get(t, 0), t))
  return predict


def true_views(cohort_dir: str, patches_dir: str, slide_ids: set[str],
               definitions: dict[str, Any]) -> dict[str, dq.SlideRegions]:
  """Region views of ``slide_ids`` with their true tissue compositions (slides without tiled
  patches are left out)."""
  return {s: dq.slide_regions(t.coords, t.patch_size_level0, t.fractions,
                              definitions["region_patches"], definitions["max_regions"])
          for s, t in dq.read_tiled(cohort_dir, patches_dir, slide_ids).items()}


def probe_views(cohort_dir: str, features_dir: str, train_ids: set[str], slide_ids: set[str],
                definitions: dict[str, Any]) -> dict[str, dq.SlideRegions]:
  """Region views of ``slide_ids`` whose compositions come from the tissue a patch probe
  predicts (one-hot per patch); the probe is a logistic regression on the frozen features of
  ``train_ids``' patches, labelled with each patch's main tissue (patches that no type covers
  by half are left out of training)."""
  from pathflip_jax.evaluators import linear_probe  # pylint: disable=import-outside-toplevel
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
      slides[slide_id] = (coords, size, features)
  if not train_x:
    raise ValueError(f"{features_dir}: no features of the cohort's training slides to fit the "
                     "patch probe on")
  logits_fn, _ = linear_probe.fit_probe(np.concatenate(train_x), np.concatenate(train_y),
                                        np.array(groups), len(TISSUES))
  eye = np.eye(len(TISSUES))
  return {s: dq.slide_regions(coords, size, eye[logits_fn(features).argmax(axis=1)],
                              definitions["region_patches"], definitions["max_regions"])
          for s, (coords, size, features) in slides.items()}


def token_views(cohort_dir: str, patches_dir: str, align_workdir: str, train_ids: set[str],
                slide_ids: set[str], definitions: dict[str, Any], ridge: float = 1.0
                ) -> dict[str, dq.SlideRegions]:
  """Region views of ``slide_ids`` whose compositions are read off the region tokens the
  instruct stage's decoder gets from ``align_workdir`` (``instruct.encode_visual_tokens``): a
  ridge regression from a region token to its region's true tissue fractions, fitted on the
  ``train_ids`` slides' regions. A linear read-out of what the decoder is given: whether the
  tokens carry what the questions ask, apart from how well the decoder learns to read them."""
  # pylint: disable=import-outside-toplevel
  import jax
  from pathflip_jax import predict, sharding
  from pathflip_jax.tasks import instruct
  align_task, model = predict.load_align(align_workdir)
  mesh = sharding.make_mesh(data=1, fsdp=1, model=1, devices=jax.devices()[:1])
  tokens = instruct.encode_visual_tokens(align_task, model, mesh, 8)
  truth = true_views(cohort_dir, patches_dir, train_ids | slide_ids, definitions)
  pairs: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
  for split, slides in tokens.items():
    for text, visual in zip(align_task.splits[split].texts, slides):
      if text.slide_id not in truth:
        continue
      view = truth[text.slide_id]
      # Region tokens (after the slide token) matched to the true view's regions by place.
      index = {tuple(np.round(p, 5)): i for i, p in enumerate(view.positions)}
      matched = [(j, index[key]) for j, key in
                 enumerate(tuple(np.round(p, 5)) for p in visual["positions"][1:, 1:])
                 if key in index]
      regions = [i for _, i in matched]
      pairs[text.slide_id] = (visual["tokens"][1:][[j for j, _ in matched]],
                              view.fractions[regions], view.positions[regions])
  train = [pairs[s] for s in sorted(train_ids) if s in pairs]
  if not train:
    raise ValueError(f"{align_workdir}: no training slide with region tokens to fit the token "
                     "probe on")
  x = np.concatenate([t for t, _, _ in train]).astype(np.float64)
  y = np.concatenate([f for _, f, _ in train])
  mean_x, mean_y = x.mean(0), y.mean(0)
  xc = x - mean_x
  weights = np.linalg.solve(xc.T @ xc + ridge * len(x) * np.eye(x.shape[1]), xc.T @ (y - mean_y))
  out = {}
  for slide_id in sorted(slide_ids & set(pairs)):
    region_tokens, _, positions = pairs[slide_id]
    predicted = np.clip((region_tokens - mean_x) @ weights + mean_y, 0.0, None)
    predicted /= np.maximum(predicted.sum(axis=1, keepdims=True), 1e-9)
    out[slide_id] = dq.SlideRegions(predicted, positions)
  return out


def evaluate(cohort_dir: str, patches_dir: str, split: str = "test", predictions: str = "",
             features_dir: str = "", questions: str = "", align_workdir: str = ""
             ) -> dict[str, Any]:
  """Per category, then "all" over every multiple-choice question of ``split`` ("": every
  split): ``questions``, ``oracle`` (the rule-based answerer on the true region view),
  ``best_single_letter`` (its share; ``letter``: which), ``question_only`` and
  ``option_prior`` (see :func:`question_only`; fitted on the training questions), and with
  ``predictions`` the model's accuracy (``model``), with ``features_dir`` the patch probe's
  (``patch_probe``), with ``align_workdir`` the region-token probe's (``token_probe``,
  :func:`token_views`). ``questions``: the CSV (default COHORT/questions.csv), written by
  data_prep.demo_questions with its definitions beside it."""
  questions = questions or os.path.join(cohort_dir, "questions.csv")
  definitions = dq.read_definitions(questions)
  tertiles = definitions["size_tertiles"]
  every = [q for q in instructions.read_questions(questions)
           if q.type == instructions.MULTIPLE_CHOICE]
  chosen = [q for q in every if not split or q.split == split]
  if not chosen:
    raise ValueError(f"{questions}: no multiple-choice questions of split {split!r}")
  views = true_views(cohort_dir, patches_dir, {q.slide_id for q in chosen}, definitions)
  chosen = [q for q in chosen if q.slide_id in views]
  train = [q for q in every if q.split == "train"]
  blind, prior = question_only(train), question_only(train, by_rate=True)
  by_set = question_only(train, by_set=True)
  probed = {}
  if features_dir:
    train_ids = {q.slide_id for q in every if q.split == "train"}
    probed = probe_views(cohort_dir, features_dir, train_ids, set(views), definitions)
  tokened = {}
  if align_workdir:
    train_ids = {q.slide_id for q in every if q.split == "train"}
    tokened = token_views(cohort_dir, patches_dir, align_workdir, train_ids, set(views),
                          definitions)
  model = {}
  if predictions:
    for _, row in manifest.json_lines(predictions):
      if row.get("type") == instructions.MULTIPLE_CHOICE:
        model[(row["slide_id"], row["question"])] = row.get("parsed") == row["answer"]
  rows: dict[str, dict[str, list]] = {}
  for q in chosen:
    for key in (q.category, "all"):
      entry = rows.setdefault(key, {"oracle": [], "letters": [], "blind": [], "prior": [],
                                    "set": [], "model": [], "probe": [], "tokens": []})
      entry["oracle"].append(oracle_answer(q, views[q.slide_id], tertiles) == q.correct_text)
      entry["letters"].append(q.answer)
      entry["blind"].append(blind(q) == q.correct_text)
      entry["prior"].append(prior(q) == q.correct_text)
      entry["set"].append(by_set(q) == q.correct_text)
      if q.slide_id in probed:
        entry["probe"].append(oracle_answer(q, probed[q.slide_id], tertiles) == q.correct_text)
      if q.slide_id in tokened:
        entry["tokens"].append(oracle_answer(q, tokened[q.slide_id], tertiles)
                               == q.correct_text)
      if (q.slide_id, q.question) in model:
        entry["model"].append(model[(q.slide_id, q.question)])
  result = {}
  for key, entry in rows.items():
    letters = entry["letters"]
    letter = max(sorted(set(letters)), key=letters.count)
    result[key] = {"questions": len(letters), "oracle": float(np.mean(entry["oracle"])),
                   "best_single_letter": letters.count(letter) / len(letters), "letter": letter,
                   "question_only": float(np.mean(entry["blind"])),
                   "option_prior": float(np.mean(entry["prior"])),
                   "option_set": float(np.mean(entry["set"]))}
    if entry["model"]:
      result[key]["model"] = float(np.mean(entry["model"]))
    if entry["probe"]:
      result[key]["patch_probe"] = float(np.mean(entry["probe"]))
    if entry["tokens"]:
      result[key]["token_probe"] = float(np.mean(entry["tokens"]))
  return result


def failures(result: dict[str, Any]) -> list[str]:
  """What keeps a question set from measuring: per category, the view must answer at least
  MIN_ORACLE and neither one letter nor the option texts alone more than MAX_TRIVIAL."""
  out = []
  for key, row in sorted(result.items()):
    if key == "all":
      continue
    if row["oracle"] < MIN_ORACLE:
      out.append(f"{key}: rule-based {row['oracle']:.3f} < {MIN_ORACLE}")
    if row["best_single_letter"] > MAX_TRIVIAL:
      out.append(f"{key}: always {row['letter']} {row['best_single_letter']:.3f} > {MAX_TRIVIAL}")
    for name in ("question_only", "option_set"):
      if row[name] > MAX_TRIVIAL:
        out.append(f"{key}: {name.replace('_', '-')} {row[name]:.3f} > {MAX_TRIVIAL}")
  return out


def table(result: dict[str, Any]) -> list[str]:
  """Markdown lines: per category the rule-based answerer beside the trivial predictors (and
  the patch probe and model where they ran)."""
  order = sorted(k for k in result if k != "all") + ["all"]
  probe, model = "patch_probe" in result["all"], "model" in result["all"]
  tokens = "token_probe" in result["all"]
  header = ["category", "questions", "rule-based", "best single letter", "question-only",
            "option prior", "option set"]
  header += ["patch probe"] * probe + ["region-token probe"] * tokens + ["model"] * model
  return report.markdown_table(header, [
      (k, result[k]["questions"], result[k]["oracle"],
       f"{result[k]['best_single_letter']:.3f} ({result[k]['letter']})",
       result[k]["question_only"], result[k]["option_prior"], result[k]["option_set"])
      + (result[k].get("patch_probe"),) * probe + (result[k].get("token_probe"),) * tokens
      + (result[k].get("model"),) * model for k in order])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(prog="python -m data_prep.demo_vqa_oracle",
                                   description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--cohort_dir", required=True, help="make_demo_cohort output")
  parser.add_argument("--patches", required=True, help="tile_slides output of that cohort")
  parser.add_argument("--questions", default="",
                      help="demo_questions output (default: COHORT_DIR/questions.csv)")
  parser.add_argument("--split", default="test", help='questions of this split ("": all)')
  parser.add_argument("--predictions", default="",
                      help="the vqa evaluator's per-question output (eval/vqa_<split>.jsonl)")
  parser.add_argument("--features", default="",
                      help="extract_features output of the cohort: adds the patch probe")
  parser.add_argument("--align_workdir", default="",
                      help="an align run of the cohort: adds the region-token probe (a ridge "
                           "read-out of region compositions from the decoder's region tokens)")
  parser.add_argument("--output", default="", help="write the result as JSON here")
  parser.add_argument("--check", action="store_true",
                      help=f"exit with status 1 unless, in every category, rule-based >= "
                           f"{MIN_ORACLE} and best single letter, question-only <= {MAX_TRIVIAL}")
  args = parser.parse_args(argv)
  result = evaluate(args.cohort_dir, args.patches, args.split, args.predictions, args.features,
                    args.questions, args.align_workdir)
  print("\n".join(table(result)))
  problems = failures(result)
  for problem in problems:
    print(f"[demo_vqa_oracle] FAIL {problem}", file=sys.stderr)
  if args.output:
    with open(args.output, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1, sort_keys=True)
  if args.check and problems:
    raise SystemExit(1)
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
