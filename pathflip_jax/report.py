"""REPORT.md of a quickstart workdir: every metric beside its chance baseline, sample captions
against their references, and the example slides' heatmaps, captions and answers.

Reads what the stages wrote (``results.json`` of each training run, the captioning
predictions, the examples' ``summary.json``); computes nothing itself. A metric with a 95%
bootstrap interval in the results (``<key>/ci_low``, ``<key>/ci_high``; ``evaluators.stats``)
reads ``value [low, high]``, one without as the value alone; each section ends with the paired
differences its evaluator wrote (``<evaluator>/minus_<baseline>/<metric>``: the model minus a
baseline on the same slides). ``ablation_table`` and ``seed_table`` render
``pathflip_jax.compare``'s comparisons across runs.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence

CI_LOW, CI_HIGH = "/ci_low", "/ci_high"   # evaluators.stats' suffixes
# What each paired difference's baseline is, for the tables' labels.
BASELINE_NAMES = {
    "reference": "the patch encoder's own text alignment",
    "majority": "majority class (of the training split)",
    "chance": "chance",
    "mean_patch_feature": "the same probe on mean patch features",
    "colour_mean": "the same probe on colour means",
    "random_train_caption": "a random training caption",
    "nearest_train_caption": "the nearest-neighbour training caption",
    "best_single_letter": "always the best single letter",
    "question_only": "the question-only decoder",
    "shuffled_visual": "shuffled visual tokens",
}


def _load(path: str) -> dict[str, Any]:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _fmt(value: Any, digits: int) -> str:
  if value is None:
    return "–"
  if isinstance(value, float):
    return f"{value:.{digits}f}"
  return str(value)


def _finite(value: Any) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value)


def with_interval(value: float, low: Any, high: Any, digits: int = 3, sign: bool = False) -> str:
  """``value [low, high]`` (the interval left out when it is undefined)."""
  spec = f"{'+' if sign else ''}.{digits}f"
  text = format(value, spec) if _finite(value) else str(value)
  if _finite(low) and _finite(high):
    text += f" [{format(low, spec)}, {format(high, spec)}]"
  return text


def cell(results: dict[str, Any], key: str | float | None, digits: int = 3) -> Any:
  """A table cell for a result key: the value with its interval when the results have one, the
  bare value when not, a number given as itself, None (a dash) when absent."""
  if not isinstance(key, str):
    return key
  if key not in results:
    return None
  low, high = results.get(key + CI_LOW), results.get(key + CI_HIGH)
  if low is None and high is None:
    return results[key]
  return with_interval(results[key], low, high, digits)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3
                   ) -> list[str]:
  """Lines of a Markdown table (floats to ``digits`` places, None as a dash), then a blank."""
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(_fmt(v, digits) for v in row) + " |" for row in rows]
  return lines + [""]


def _rows(results: dict[str, Any], items: Sequence[tuple[str, str, str | float | None]]):
  """(label, metric key, baseline key or value) -> table rows, metrics that exist only (each
  with its interval where the results have one)."""
  out = []
  for label, key, baseline in items:
    if key not in results:
      continue
    out.append((label, cell(results, key), cell(results, baseline)))
  return out


def _metric_label(metric: str) -> str:
  """``mean_lesion_auroc`` -> ``mean lesion AUROC``: a result key's words as the tables say them."""
  words = {"auc": "AUC", "auroc": "AUROC", "froc": "FROC", "dice": "Dice", "f1": "F1",
           "mc": "multiple choice", "cider_d": "CIDEr-D", "rouge_l": "ROUGE-L",
           "meteor": "METEOR", **{f"bleu_{n}": f"BLEU-{n}" for n in range(1, 5)}}
  parts = [words.get(p, p) for p in metric.split("/")]
  return " ".join(words.get(w, w) for part in parts for w in (
      [part] if part in words.values() else part.replace("_", " ").split()))


def differences_table(results: dict[str, Any], prefix: str) -> list[str]:
  """The paired differences ``<prefix>minus_<baseline>/<metric>`` of the results as a table
  (no lines when there are none)."""
  rows = []
  for key in sorted(results):
    if not key.startswith(prefix + "minus_") or key.endswith((CI_LOW, CI_HIGH)):
      continue
    baseline, metric = key[len(prefix + "minus_"):].split("/", 1)
    value = results[key]
    rows.append((f"{_metric_label(metric)}: model − {BASELINE_NAMES.get(baseline, baseline)}",
                 with_interval(value, results.get(key + CI_LOW), results.get(key + CI_HIGH),
                               sign=True)))
  if not rows:
    return []
  return markdown_table(["paired difference (same slides)", "value [95% interval]"], rows)


def ablation_table(comparison: dict[str, Any]) -> list[str]:
  """Lines of the table of ``compare.compare``'s output: per metric and other run, both values
  and the paired difference (model minus the run, on the slides both evaluated) with its 95%
  interval; then what could not be compared."""
  lines = [f"Model: `{comparison['model']}`; paired differences on the {comparison['split']} "
           "slides both runs evaluated, with 95% bootstrap intervals over those slides.", ""]
  lines += markdown_table(
      ["metric", "run", "model", "run's value", "model − run [95% interval]", "slides"],
      [(row["label"], f"`{row['against']}`", row["model"], row["other"],
        with_interval(row["difference"], row["ci_low"], row["ci_high"], sign=True),
        int(row["num_slides"])) for row in comparison["rows"]])
  if comparison.get("missing"):
    lines += ["Not compared:", ""] + [f"- {why}" for why in comparison["missing"]] + [""]
  return lines


def seed_table(summary: dict[str, Any]) -> list[str]:
  """Lines of the table of ``compare.seed_summary``'s output: mean, standard deviation, range
  of each metric over the runs."""
  lines = [f"Over {len(summary['runs'])} runs of one configuration (seeds): "
           + ", ".join(f"`{r}`" for r in summary["runs"]) + f"; {summary['split']} split.", ""]
  lines += markdown_table(
      ["metric", "mean", "sd", "min", "max", "runs"],
      [(m["label"], m["mean"], m["std"] if _finite(m["std"]) else None, m["min"], m["max"],
        int(m["runs"])) for m in summary["metrics"].values()])
  return lines


def vqa_ceiling_table(result: dict[str, dict[str, Any]]) -> list[str]:
  """Lines of the table of data_prep.demo_vqa_oracle's result: per multiple-choice category
  (then "all") the questions, the model (a dash without predictions), the best single letter,
  the patch probe (when it ran) and the oracle."""
  order = sorted(k for k in result if k != "all") + ["all"]
  probe, tokens = "patch_probe" in result["all"], "token_probe" in result["all"]
  header = ["category", "questions", "model", "best single letter"]
  header += ["patch probe"] * probe + ["region-token probe"] * tokens + ["oracle"]
  return markdown_table(
      header, [(k, result[k]["questions"], result[k].get("model"), result[k]["best_single_letter"])
               + (result[k].get("patch_probe"),) * probe
               + (result[k].get("token_probe"),) * tokens + (result[k]["oracle"],)
               for k in order])


CAPTION_METRICS = (("BLEU-1", "bleu_1"), ("BLEU-2", "bleu_2"), ("BLEU-3", "bleu_3"),
                   ("BLEU-4", "bleu_4"), ("METEOR", "meteor"), ("ROUGE-L", "rouge_l"),
                   ("CIDEr-D", "cider_d"), ("distinct captions", "distinct_captions"))
CAPTION_BASELINES = ("random_train_caption", "nearest_train_caption")
VQA_BASELINES = (("best single letter", "best_single_letter_accuracy"),
                 ("question only", "question_only/mc/ranked_accuracy"),
                 ("shuffled visual tokens", "shuffled_visual/mc/ranked_accuracy"))


def caption_tables(instruct: dict[str, Any]) -> list[str]:
  """The captioning section: COCO-style metrics beside a random training caption and the
  nearest-neighbour one (the training caption of the closest slide embedding), then the paired
  differences."""
  lines = ["## Captioning", "",
           "COCO-style metrics (PTB tokenization; CIDEr-D as pycocoevalcap) of the generated "
           "captions against each test slide's reference. Baselines: a random training "
           "caption; the nearest-neighbour caption, the training caption of the slide whose "
           "embedding is closest. Distinct captions: the share of test slides whose caption no "
           "other slide gets.", ""]
  rows = [(name, cell(instruct, f"captioning/{key}"),
           *(cell(instruct, f"captioning/{b}/{key}") for b in CAPTION_BASELINES))
          for name, key in CAPTION_METRICS if f"captioning/{key}" in instruct]
  lines += markdown_table(["metric", "model", "random training caption",
                           "nearest-neighbour caption"], rows)
  return lines + differences_table(instruct, "captioning/")


def _vqa_categories(instruct: dict[str, Any]) -> list[str]:
  """The multiple-choice categories with a ranked accuracy in the results."""
  prefix = "vqa/mc/ranked_accuracy/"
  return sorted({k[len(prefix):] for k in instruct
                 if k.startswith(prefix) and k.count("/") == 3
                 and k[len(prefix):] not in ("ci_low", "ci_high")})


def vqa_tables(instruct: dict[str, Any]) -> list[str]:
  """The VQA section: per multiple-choice category, option log-likelihood ranking (the
  headline) beside the best single letter, the question-only decoder and shuffled visual
  tokens, the generated answer after them; then open questions and the paired differences."""
  categories = _vqa_categories(instruct)
  header = ["category", "most likely option", *(name for name, _ in VQA_BASELINES),
            "generated answer"]
  rows = [(c, cell(instruct, f"vqa/mc/ranked_accuracy/{c}"),
           *(cell(instruct, f"vqa/mc/{key}/{c}" if "/" not in key else f"vqa/{key}/{c}")
             for _, key in VQA_BASELINES), cell(instruct, f"vqa/mc/accuracy/{c}"))
          for c in categories]
  rows.append(("**all**", cell(instruct, "vqa/mc/ranked_accuracy"),
               *(cell(instruct, f"vqa/mc/{key}" if "/" not in key else f"vqa/{key}")
                 for _, key in VQA_BASELINES), cell(instruct, "vqa/mc/accuracy")))
  lines = ["## Visual question answering", "",
           "Multiple choice (four options): the option the decoder gives the highest "
           "log-likelihood, beside always the best single letter, a decoder trained on the same "
           "questions without visual tokens (question only) and the model given another test "
           "slide's visual tokens (shuffled); the generated answer last.", ""]
  lines += markdown_table(header, rows)
  open_rows = _rows(instruct, [("open: exact match", "vqa/open/exact_match", None),
                               ("open: token F1", "vqa/open/f1", None)])
  if any(r[1] is not None for r in open_rows):
    lines += markdown_table(["metric", "value", "baseline"], open_rows)
  return lines + differences_table(instruct, "vqa/")


HEADLINE_METRICS = ("localization/mean_lesion_auroc", "slide_zero_shot/balanced_accuracy",
                    "slide_retrieval/slide_to_text_r@1")


def _difference(values: dict[str, Any], key: str) -> str:
  """A paired difference of the results with its interval, signed."""
  return with_interval(values[key], values.get(key + CI_LOW), values.get(key + CI_HIGH),
                       sign=True)


def _excludes_zero_above(values: dict[str, Any], key: str) -> bool | None:
  """Whether the interval of ``key`` lies above 0 (None: no interval)."""
  low = values.get(key + CI_LOW)
  return None if not _finite(low) else bool(low > 0)


def claims_table(comparison: dict[str, Any] | None, instruct: dict[str, Any]) -> list[str]:
  """The paper's claims as measured here: each ablation lowers lesion AUROC, zero-shot or
  retrieval R@1 with an interval excluding 0; captions beat the nearest-neighbour caption on
  CIDEr-D; VQA option ranking beats the question-only and shuffled baselines in every
  category. Each verdict is read off the paired differences; no line for what was not run."""
  rows = []
  if comparison:
    for name in dict.fromkeys(r["against"] for r in comparison["rows"]):
      measured = [r for r in comparison["rows"]
                  if r["against"] == name and r["metric"] in HEADLINE_METRICS]
      if not measured:
        continue
      lowered = [r for r in measured if _finite(r["ci_low"]) and r["ci_low"] > 0]
      # Runs are named after what they switch off ("no_region_loss": region_loss=False).
      field = name.removeprefix("no_")
      rows.append((f"the full model beats `{field}=False` on lesion AUROC, zero-shot or R@1",
                   "holds" if lowered else "does not hold",
                   "; ".join(f"{r['label']} " + with_interval(
                       r["difference"], r["ci_low"], r["ci_high"], sign=True) for r in measured)))
  key = "captioning/minus_nearest_train_caption/cider_d"
  if key in instruct:
    verdict = _excludes_zero_above(instruct, key)
    rows.append(("captions beat the nearest-neighbour caption on CIDEr-D",
                 {True: "holds", False: "does not hold", None: "no interval"}[verdict],
                 _difference(instruct, key)))
  categories = _vqa_categories(instruct)
  for baseline, name in (("question_only", "the question-only decoder"),
                         ("shuffled_visual", "shuffled visual tokens")):
    keys = {c: f"vqa/minus_{baseline}/mc/ranked_accuracy/{c}" for c in categories}
    keys = {c: k for c, k in keys.items() if k in instruct}
    if not keys:
      continue
    verdicts = [_excludes_zero_above(instruct, k) for k in keys.values()]
    rows.append((f"VQA option ranking beats {name} in every category",
                 "holds" if all(verdicts) else "does not hold",
                 "; ".join(f"{c} {_difference(instruct, k)}" for c, k in keys.items())))
  if not rows:
    return []
  return (["## The paper's claims on this cohort", "",
           "A claim holds when the paired difference's 95% interval lies above 0.", ""]
          + markdown_table(["claim", "verdict", "paired differences [95% interval]"], rows))


def render(workdir: str, examples: Sequence[dict[str, Any]],
           vqa_oracle: dict[str, dict[str, Any]] | None = None,
           title: str = "# PathFLIP quickstart report",
           comparison: dict[str, Any] | None = None,
           seeds: dict[str, dict[str, Any]] | None = None) -> str:
  """REPORT.md's text for a quickstart workdir (``vqa_oracle``: data_prep.demo_vqa_oracle's
  result on the test split, with the model's accuracy per category; ``title``: the first line,
  "" for none; ``comparison``: ``compare.compare``'s output, an ablation section;
  ``seeds``: {configuration name: ``compare.seed_summary``'s output}, a section of the spread
  of each configuration over its seeds)."""
  align = _load(os.path.join(workdir, "align", "results.json"))
  instruct = _load(os.path.join(workdir, "instruct", "results.json"))
  patch = _load(os.path.join(workdir, "patch_clip", "results.json"))
  timings = _load(os.path.join(workdir, "timings.json"))
  cohort = _load(os.path.join(workdir, "cohort", "cohort.json"))
  lines = [title, ""] if title else []
  if cohort:
    lines += [f"Demo cohort: {cohort.get('num_slides')} slides (seed {cohort.get('seed')}), "
              f"splits {cohort.get('splits')}. All metrics are on the **test** split; the "
              "baseline column is chance or the stated trivial predictor.", ""]
  if any(k.endswith(CI_LOW) for results in (patch, align, instruct) for k in results):
    lines += ["Brackets hold 95% bootstrap intervals over the evaluated slides (1000 resamples); "
              "a paired difference is the model minus a baseline on the same resamples.", ""]

  lines += claims_table(comparison, instruct)

  if patch:
    lines += ["## Patch encoder (val patches)", ""]
    lines += markdown_table(["metric", "value", "baseline"], _rows(patch, [
        ("zero-shot tissue type, balanced accuracy", "zero_shot/balanced_accuracy",
         "zero_shot/chance_balanced_accuracy"),
        ("linear probe accuracy (baseline: same probe on colour means)",
         "linear_probe/accuracy", "linear_probe/colour_mean_accuracy")]))
    lines += differences_table(patch, "linear_probe/")

  lines += ["## Zero-shot diagnosis", ""]
  lines += markdown_table(["metric", "value", "baseline"], _rows(align, [
      ("balanced accuracy (chance)", "zero_shot/balanced_accuracy",
       "zero_shot/chance_balanced_accuracy"),
      ("accuracy (majority class)", "zero_shot/accuracy", "zero_shot/majority_class_accuracy"),
      ("macro AUC", "zero_shot/macro_auc", 0.5),
      ("weighted F1", "zero_shot/weighted_f1", None),
      ("balanced accuracy, slide + regions score (chance)",
       "zero_shot/both_score_balanced_accuracy", "zero_shot/chance_balanced_accuracy"),
      ("balanced accuracy (baseline: the patch encoder's own text alignment, mean-pooled "
       "patches)", "zero_shot/balanced_accuracy", "zero_shot/reference/balanced_accuracy"),
      ("macro AUC (baseline: the patch encoder's own text alignment)", "zero_shot/macro_auc",
       "zero_shot/reference/macro_auc")]
      + ([("balanced accuracy (baseline: attention-MIL trained on the diagnosis labels)",
           "zero_shot/balanced_accuracy", "mil/balanced_accuracy"),
          ("macro AUC (baseline: attention-MIL trained on the diagnosis labels)",
           "zero_shot/macro_auc", "mil/macro_auc")] if "mil/balanced_accuracy" in align
         else [])))
  lines += differences_table(align, "zero_shot/")

  lines += ["## Slide - caption retrieval", ""]
  lines += markdown_table(["metric", "value", "chance"], _rows(align, [
      (f"{direction.replace('_', ' ')} R@{k}", f"retrieval/{direction}_r@{k}",
       f"retrieval/chance_r@{k}")
      for direction in ("slide_to_text", "text_to_slide") for k in (1, 5, 10)]))
  lines += differences_table(align, "retrieval/")

  loc = {k.split("/", 1)[1]: v for k, v in align.items() if k.startswith("localization/")}
  if loc:
    lines += ["## Text-prompted localization (patch level, per slide)", ""]
    queries = sorted({k.split("/", 1)[1] for k in loc
                      if k.startswith("auroc/") and not k.endswith((CI_LOW, CI_HIGH))})
    # Runs before the Dice threshold was chosen on val took the best level on the test slides.
    dice = ("Dice (threshold from val)" if any(k.startswith("dice_threshold/") for k in loc)
            else "best Dice")
    lines += markdown_table(["query", "AUROC", dice, "FROC", "slides"],
                    [(q.replace("_", " "), cell(loc, f"auroc/{q}"), cell(loc, f"dice/{q}"),
                      cell(loc, f"froc/{q}"), int(loc.get(f"num_slides/{q}", 0)))
                     for q in queries]
                    + [("**lesions (mean)**", cell(loc, "mean_lesion_auroc"),
                        cell(loc, "mean_lesion_dice"), cell(loc, "mean_lesion_froc"), None)]
                    + ([("lesions (mean): the patch encoder's own text alignment, trained with "
                         "patch-level supervision", cell(loc, "reference/mean_lesion_auroc"),
                         cell(loc, "reference/mean_lesion_dice"),
                         cell(loc, "reference/mean_lesion_froc"), None)]
                       if "reference/mean_lesion_auroc" in loc else [])
                    + [("chance", 0.5, None, None, None)])
    lines += differences_table(loc, "")

  probe = {k.split("/", 1)[1]: v for k, v in align.items() if k.startswith("probe/")}
  if probe:
    lines += ["## Biomarker (linear probe on frozen slide embeddings)", ""]
    lines += markdown_table(["metric", "value", "baseline"], _rows(probe, [
        ("AUC (baseline: probe on mean patch features)", "auc", "mean_patch_feature/auc"),
        ("balanced accuracy (baseline: mean patch features)", "balanced_accuracy",
         "mean_patch_feature/balanced_accuracy"),
        ("accuracy (majority class)", "accuracy", "majority_class_accuracy"),
        ("zero-shot AUROC from prompts (chance)", "zero_shot_auc", "chance_auc")]
        + [(f"{k}-shot AUC (chance)", f"few_shot/k{k}/auc", "chance_auc") for k in (1, 2, 4, 8)]))
    lines += differences_table(probe, "")

  if comparison:
    lines += ["## Ablations (paired differences across runs)", ""]
    lines += ablation_table(comparison)
  if seeds:
    lines += ["## Spread over training seeds", ""]
    for name, summary in seeds.items():
      lines += [f"### {name}", ""] + seed_table(summary)

  if instruct:
    lines += caption_tables(instruct)
    lines += vqa_tables(instruct)
    if vqa_oracle:
      lines += ["How much of each multiple-choice category the tiled patches can answer: an oracle "
                "that knows every patch's exact tissue composition and nothing else "
                "(data_prep/demo_vqa_oracle.py), beside the model and always one letter. The "
                "patch probe is a realistic pipeline on the same rules: a logistic regression "
                "on the frozen patch features, trained on every training patch's tissue label "
                "(far more supervision than the model's questions), naming each patch's main "
                "tissue. The region-token probe reads the same rules off the region tokens the "
                "decoder gets: a ridge regression from a token to its region's tissue fractions, "
                "fitted on the training slides (whether the tokens carry the answers, apart from "
                "how well the decoder learnt to read them).", ""]
      lines += vqa_ceiling_table(vqa_oracle)
    captions = os.path.join(workdir, "instruct", "eval", "captioning_test.jsonl")
    if os.path.exists(captions):
      lines += ["### Sample captions (test slides)", ""]
      with open(captions) as f:
        for line in list(f)[:3]:
          row = json.loads(line)
          lines += [f"**{row['slide_id']}**", "",
                    f"- generated: {row['generated']}", f"- reference: {row['reference']}", ""]

  if examples:
    lines += ["## Example slides: heatmaps, caption, answers", ""]
  for row in examples:
    summary = _load(os.path.join(workdir, "examples", row["slide_id"], "summary.json"))
    if not summary:
      continue
    zs = summary.get("zero_shot", {})
    lines += [f"### {row['slide_id']} (truth: {row['diagnosis']}; zero-shot: "
              f"{zs.get('prediction', '?')})", ""]
    if summary.get("caption"):
      lines += [f"Caption: {summary['caption']}", ""]
    for qa in summary.get("answers", []):
      lines += [f"- {qa['question']} **{qa['answer']}**"]
    lines += [""]
    for heat in summary.get("heatmaps", []):
      rel = os.path.relpath(heat["png"], workdir)
      lines += [f"![{heat['query']}]({rel})", ""]

  if timings.get("seconds"):
    lines += ["## Time", "", "Seconds per stage (when each ran): "
              + ", ".join(f"{k} {v:.0f}" for k, v in timings["seconds"].items())
              + f"; {timings.get('total_seconds', 0):.0f} in all.", ""]
  return "\n".join(lines)
