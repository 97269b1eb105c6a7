"""REPORT.md of a quickstart workdir: every metric beside its chance baseline, sample captions
against their references, and the example slides' heatmaps, captions and answers.

Reads what the stages wrote (``results.json`` of each training run, the captioning
predictions, the examples' ``summary.json``); computes nothing itself.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence


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


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3
                   ) -> list[str]:
  """Lines of a Markdown table (floats to ``digits`` places, None as a dash), then a blank."""
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(_fmt(v, digits) for v in row) + " |" for row in rows]
  return lines + [""]


def _rows(results: dict[str, Any], items: Sequence[tuple[str, str, str | float | None]]):
  """(label, metric key, baseline key or value) -> table rows, metrics that exist only."""
  out = []
  for label, key, baseline in items:
    if key not in results:
      continue
    base = results.get(baseline) if isinstance(baseline, str) else baseline
    out.append((label, results[key], base))
  return out


def vqa_ceiling_table(result: dict[str, dict[str, Any]]) -> list[str]:
  """Lines of the table of data_prep.demo_vqa_oracle's result: per multiple-choice category
  (then "all") the questions, the model (a dash without predictions), the best single letter,
  the patch probe (when it ran) and the oracle."""
  order = sorted(k for k in result if k != "all") + ["all"]
  probe = "patch_probe" in result["all"]
  header = ["category", "questions", "model", "best single letter"]
  header += ["patch probe"] * probe + ["oracle"]
  return markdown_table(
      header, [(k, result[k]["questions"], result[k].get("model"), result[k]["best_single_letter"])
               + (result[k].get("patch_probe"),) * probe + (result[k]["oracle"],)
               for k in order])


def render(workdir: str, examples: Sequence[dict[str, Any]],
           vqa_oracle: dict[str, dict[str, Any]] | None = None,
           title: str = "# PathFLIP quickstart report") -> str:
  """REPORT.md's text for a quickstart workdir (``vqa_oracle``: data_prep.demo_vqa_oracle's
  result on the test split, with the model's accuracy per category; ``title``: the first line,
  "" for none)."""
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

  if patch:
    lines += ["## Patch encoder (val patches)", ""]
    lines += markdown_table(["metric", "value", "baseline"], _rows(patch, [
        ("zero-shot tissue type, balanced accuracy", "zero_shot/balanced_accuracy",
         "zero_shot/chance_balanced_accuracy"),
        ("linear probe accuracy (baseline: same probe on colour means)",
         "linear_probe/accuracy", "linear_probe/colour_mean_accuracy")]))

  lines += ["## Zero-shot diagnosis", ""]
  lines += markdown_table(["metric", "value", "baseline"], _rows(align, [
      ("balanced accuracy (chance)", "zero_shot/balanced_accuracy",
       "zero_shot/chance_balanced_accuracy"),
      ("accuracy (majority class)", "zero_shot/accuracy", "zero_shot/majority_class_accuracy"),
      ("macro AUC", "zero_shot/macro_auc", 0.5),
      ("weighted F1", "zero_shot/weighted_f1", None)]))

  lines += ["## Slide - caption retrieval", ""]
  lines += markdown_table(["metric", "value", "chance"], _rows(align, [
      (f"{direction.replace('_', ' ')} R@{k}", f"retrieval/{direction}_r@{k}",
       f"retrieval/chance_r@{k}")
      for direction in ("slide_to_text", "text_to_slide") for k in (1, 5, 10)]))

  loc = {k.split("/", 1)[1]: v for k, v in align.items() if k.startswith("localization/")}
  if loc:
    lines += ["## Text-prompted localization (patch level, per slide)", ""]
    queries = sorted({k.split("/", 1)[1] for k in loc if k.startswith("auroc/")})
    lines += markdown_table(["query", "AUROC", "best Dice", "FROC", "slides"],
                    [(q.replace("_", " "), loc.get(f"auroc/{q}"), loc.get(f"dice/{q}"),
                      loc.get(f"froc/{q}"), int(loc.get(f"num_slides/{q}", 0)))
                     for q in queries]
                    + [("**lesions (mean)**", loc.get("mean_lesion_auroc"),
                        loc.get("mean_lesion_dice"), loc.get("mean_lesion_froc"), None)]
                    + ([("lesions (mean): the patch encoder's own text alignment, trained with "
                         "patch-level supervision", loc["reference/mean_lesion_auroc"],
                         loc.get("reference/mean_lesion_dice"),
                         loc.get("reference/mean_lesion_froc"), None)]
                       if "reference/mean_lesion_auroc" in loc else [])
                    + [("chance", 0.5, None, None, None)])

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

  if instruct:
    lines += ["## Captioning", ""]
    lines += markdown_table(["metric", "value", "baseline: a random training caption"], _rows(
        instruct, [(name, f"captioning/{key}", f"captioning/random_train_caption/{key}")
                   for name, key in (("BLEU-1", "bleu_1"), ("BLEU-4", "bleu_4"),
                                     ("ROUGE-L", "rouge_l"), ("CIDEr-D", "cider_d"))]))
    lines += ["## Visual question answering", ""]
    categories = sorted({k.rsplit("/", 1)[1] for k in instruct
                         if k.startswith("vqa/mc/accuracy/")})
    lines += markdown_table(["metric", "value", "baseline"], _rows(instruct, [
        ("multiple choice, generated answer (best single letter)", "vqa/mc/accuracy",
         "vqa/mc/best_single_letter_accuracy"),
        ("multiple choice, most likely option (best single letter)", "vqa/mc/ranked_accuracy",
         "vqa/mc/best_single_letter_accuracy")]
        + [(f"multiple choice: {c} (chance)", f"vqa/mc/accuracy/{c}", 0.25) for c in categories]
        + [("open: exact match", "vqa/open/exact_match", None),
           ("open: token F1", "vqa/open/f1", None)]))
    if vqa_oracle:
      lines += ["How much of each multiple-choice category the tiled patches can answer: an oracle "
                "that knows every patch's exact tissue composition and nothing else "
                "(data_prep/demo_vqa_oracle.py), beside the model and always one letter. The "
                "patch probe is a realistic pipeline on the same rules: a logistic regression "
                "on the frozen patch features, trained on every training patch's tissue label "
                "(far more supervision than the model's questions), naming each patch's main "
                "tissue.", ""]
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
