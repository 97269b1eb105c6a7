"""REPORT.md of a quickstart workdir: every metric beside its chance baseline, sample captions
against their references, and the example slides' heatmaps, captions and answers.

Reads what the stages wrote (``results.json`` of each training run, the captioning
predictions, the examples' ``summary.json``); computes nothing itself.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from pathflip_jax import heatmaps


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


def _region_side(config: dict[str, Any]) -> str:
  side = config.get("data", {}).get("region_patches")
  if side is None:
    return "of a size its config.json does not record"
  return "single patches" if side == 1 else f"{side} x {side} patches"


def _chosen_checkpoints(recipe: dict[str, Any], ablation: dict[str, Any],
                        recipe_config: dict[str, Any]) -> str:
  """A sentence on which checkpoint each run's numbers are from, for runs whose model is the
  best checkpoint by a validation metric (``config.checkpoint.use_best``); "" otherwise."""
  checkpoint = recipe_config.get("checkpoint", {})
  metric = checkpoint.get("best_metric")
  if not (checkpoint.get("use_best") and metric and "checkpoint_step" in recipe):
    return ""
  evaluator = recipe_config.get("evals", {}).get(metric.split("/", 1)[0], {})
  split = evaluator.get("split", "another")
  steps = f"step {recipe['checkpoint_step']} of {recipe.get('step', '?')}"
  if metric in recipe:
    steps += f", {recipe[metric]:.3f} there"
  if "checkpoint_step" in ablation:
    steps += f"; the ablation's chosen the same way: step {ablation['checkpoint_step']}"
  return (f" Each run's model is the checkpoint whose heatmaps localized the lesions best on the "
          f"{split} split during training ({metric}; the recipe's: {steps}), so the test split "
          "chooses nothing.")


def joint_recipe_section(workdir: str, paper_model: dict[str, Any]) -> list[str]:
  """The ``quickstart --joint`` table: the recipe, its no-region-loss ablation and the paper's
  model (``paper_model``: W/align's results) on the same test slides; [] if it was not run."""
  recipe = _load(os.path.join(workdir, "joint", "align", "results.json"))
  ablation = _load(os.path.join(workdir, "joint", "align_no_region_loss", "results.json"))
  if not recipe:
    return []
  recipe_config = _load(os.path.join(workdir, "joint", "align", "config.json"))
  paper_config = _load(os.path.join(workdir, "align", "config.json"))
  queries = sorted(k.split("/")[-1] for k in recipe if k.startswith("localization/auroc/"))
  items = ([("**lesion AUROC (mean)**", "localization/mean_lesion_auroc", 0.5)]
           + [(f"AUROC: {q.replace('_', ' ')}", f"localization/auroc/{q}", 0.5) for q in queries]
           + [("lesion FROC (mean)", "localization/mean_lesion_froc", None),
              ("lesion best Dice (mean)", "localization/mean_lesion_dice", None),
              ("zero-shot diagnosis, balanced accuracy", "zero_shot/balanced_accuracy",
               "zero_shot/chance_balanced_accuracy"),
              ("slide to text R@1", "retrieval/slide_to_text_r@1", "retrieval/chance_r@1")])
  rows = []
  for label, key, baseline in items:
    if isinstance(baseline, str):
      baseline = recipe.get(baseline)
    rows.append((label, recipe.get(key), ablation.get(key), paper_model.get(key), baseline))
  model = recipe_config.get("model", {})
  method = heatmaps.localization_method(recipe_config)
  if model.get("region_value_gate") and model.get("region_output_zero_init"):
    values = ("start at random and at 0 respectively, beside the identity path behind a "
              "per-head gate that starts at 0 (only the region loss trains any of them"
              + (": without it the heatmap stays flat, AUROC 0.5)" if method == "contribution"
                 else ")"))
  elif model.get("region_value_gate"):
    values = ("start at random, as in the paper, beside the identity path behind a per-head "
              "gate that starts at 0 (only the region loss trains either)")
  else:
    values = {True: "start as the identity (so the untrained attention already reads the patch "
                    "encoder's alignment)",
              False: "start at random, as in the paper (only the region loss trains them)"}.get(
                  model.get("identity_region_values"),
                  "start as the run's config.json does not record")
  if model.get("local_region_attention"):
    own = ("the region's own patches, without its place"
           if model.get("local_region_positions") is False else
           "the region's own patches and place")
    values += (", and it reads each region's token as it enters the slide-context Transformer "
               f"({own}), not as it leaves it")
  frozen = set(recipe_config.get("optim", {}).get("frozen") or ())
  if model.get("region_identity_qk"):
    heads = model.get("region_heads", 8)
    # configs/pathflip_demo.py HELD_MATCH freezes the query projection among others.
    if "^region_attention/attention/(q|k)_(kernel|bias)$" in frozen:
      qk = ("are held at the identity (the attention is the match of text and region in the "
            "joint space")
      qk += (", and the heatmap reads its weights: without the region loss they read the "
             "encoder's own tokens)" if method == "attention" else ")")
    else:
      qk = ("start as the identity and only the region loss trains them (the attention starts "
            "as the match of text and region in the joint space)")
    values += (f", with {'one head' if heads == 1 else f'{heads} heads'} whose query and key "
               f"projections {qk}")
  # What config arg lock_text freezes (configs/pathflip_demo.py LOCKED_TEXT) includes these two;
  # another frozen set is not a locked text branch.
  if {"^qformer/token_embed$", "^text_proj/"} <= frozen:
    values += ("; the Q-Former's text branch stays frozen at the patch encoder's text tower "
               "(config arg lock_text)")
  encoder_config = _load(os.path.join(workdir, "joint", "patch_clip", "config.json"))
  encoder_steps = encoder_config.get("total_steps")
  default_steps = _load(os.path.join(workdir, "patch_clip", "config.json")).get("total_steps")
  longer = (f"trained {encoder_steps} steps instead of {default_steps}"
            if encoder_steps and default_steps else "trained longer")
  if encoder_config.get("tissue_negatives") is False:
    longer += (", where two sentences that describe one tissue type are no negatives for each "
               "other's patches (config arg tissue_negatives=False)")
  encoder = recipe.get("localization/reference/mean_lesion_auroc")
  encoder_text = ("" if encoder is None else
                  f" On these slides that patch encoder's own text alignment scores {encoder:.3f}"
                  " mean lesion AUROC.")
  within = float(recipe_config.get("loss", {}).get("within_slide_weight") or 0.0)
  negatives = ("a subcaption whose tissue the slide's own caption names is no negative for that "
               "slide")
  if within:
    negatives += (f" while a slide's own subcaptions that name disjoint tissues are negatives "
                  f"(weight {within:g}) for the embeddings each other's attention drew")
  chosen = _chosen_checkpoints(recipe, ablation, recipe_config)
  return (["## Joint-space recipe and its region-loss ablation (`--joint`)", "",
           "Not the paper's model: slide and region tokens start in the joint image-text space "
           f"of a patch encoder {longer} (W/joint/patch_clip), {negatives}, and regions "
           f"are {_region_side(recipe_config)} (the paper's model above: "
           f"{_region_side(paper_config)}). The text-conditioned attention's value and output "
           f"projections {values}.{encoder_text}{chosen} Same test slides and prompts as above; "
           "the last column repeats the paper's model.", ""]
          + markdown_table(["metric", "recipe", "recipe, region_loss=False",
                            "paper's model", "chance"], rows))


def render(workdir: str, examples: Sequence[dict[str, Any]],
           vqa_oracle: dict[str, dict[str, Any]] | None = None) -> str:
  """REPORT.md's text for a quickstart workdir (``vqa_oracle``: data_prep.demo_vqa_oracle's
  result on the test split, with the model's accuracy per category)."""
  align = _load(os.path.join(workdir, "align", "results.json"))
  instruct = _load(os.path.join(workdir, "instruct", "results.json"))
  patch = _load(os.path.join(workdir, "patch_clip", "results.json"))
  timings = _load(os.path.join(workdir, "timings.json"))
  cohort = _load(os.path.join(workdir, "cohort", "cohort.json"))
  lines = ["# PathFLIP quickstart report", ""]
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

  lines += joint_recipe_section(workdir, align)

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
