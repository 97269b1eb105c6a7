"""pathflip_jax.report: the --joint section says how the run's value path started."""

import json
import os

import pytest

from pathflip_jax import report


@pytest.mark.parametrize("model, words", [
    ({"identity_region_values": True}, "projections start as the identity"),
    ({"identity_region_values": False}, "start at random, as in the paper (only the region"),
    ({"identity_region_values": False, "region_value_gate": True},
     "beside the identity path behind a per-head gate that starts at 0"),
    ({"region_value_gate": True, "region_output_zero_init": True},
     "start at random and at 0 respectively, beside the identity path"),
    ({"region_value_gate": True, "region_output_zero_init": True,
      "local_region_attention": True},
     "at 0 (only the region loss trains any of them: without it the heatmap stays flat, AUROC "
     "0.5), and it reads each region's token as it enters the slide-context Transformer "
     "(the region's own patches and place)"),
    ({}, "start as the run's config.json does not record"),
    # The heatmap reads the held attention's weights: the ablation is not flat.
    ({"region_value_gate": True, "region_output_zero_init": True,
      "local_region_attention": True, "local_region_positions": False,
      "region_identity_qk": True, "region_heads": 1},
     "at 0 (only the region loss trains any of them), and it reads each region's token as it "
     "enters the slide-context Transformer (the region's own patches, without its place), not "
     "as it leaves it, with one head whose query and key projections are held at the identity "
     "(the attention is the match of text and region in the joint space, and the heatmap reads "
     "its weights: without the region loss they read the encoder's own tokens)"),
    ({"region_identity_qk": True, "region_heads": 8},
     "with 8 heads whose query and key projections start as the identity"),
])
def test_joint_section_names_the_value_path_start(tmp_path, model, words):
  for name, results in (("align", {"localization/mean_lesion_auroc": 0.9,
                                   "localization/auroc/tumour": 0.9,
                                   "localization/reference/mean_lesion_auroc": 0.95}),
                        ("align_no_region_loss", {"localization/mean_lesion_auroc": 0.5})):
    os.makedirs(tmp_path / "joint" / name)
    (tmp_path / "joint" / name / "results.json").write_text(json.dumps(results))
  held = model.get("region_heads") == 1
  method = "attention" if held else "contribution"
  (tmp_path / "joint" / "align" / "config.json").write_text(json.dumps({
      "model": model, "data": {"region_patches": 1},
      "evals": {"localization": {"type": "localization", "method": method}},
      "optim": {"frozen": ["^region_attention/attention/(q|k)_(kernel|bias)$"] if held else []}}))
  text = "\n".join(report.joint_recipe_section(str(tmp_path), {}))
  assert words in text
  assert "regions are single patches" in text and "scores 0.950 mean lesion AUROC" in text
  assert "| **lesion AUROC (mean)** | 0.900 | 0.500 |" in text


@pytest.mark.parametrize("steps, words", [
    ((240, 1920), "a patch encoder trained 1920 steps instead of 240 (W/joint/patch_clip)"),
    (None, "a patch encoder trained longer (W/joint/patch_clip)"),
])
def test_joint_section_names_the_encoders_steps(tmp_path, steps, words):
  os.makedirs(tmp_path / "joint" / "align")
  (tmp_path / "joint" / "align" / "results.json").write_text(
      json.dumps({"localization/mean_lesion_auroc": 0.9}))
  if steps is not None:
    for name, total_steps in zip(("patch_clip", os.path.join("joint", "patch_clip")), steps):
      os.makedirs(tmp_path / name)
      (tmp_path / name / "config.json").write_text(json.dumps({"total_steps": total_steps}))
  assert words in "\n".join(report.joint_recipe_section(str(tmp_path), {}))


@pytest.mark.parametrize("loss, words", [
    ({"within_slide_weight": 1.0}, "no negative for that slide while a slide's own subcaptions "
     "that name disjoint tissues are negatives (weight 1) for the embeddings each other's "
     "attention drew, and regions"),
    ({"within_slide_weight": 0.0}, "no negative for that slide, and regions"),
    ({}, "no negative for that slide, and regions"),
])
def test_joint_section_names_within_slide_negatives(tmp_path, loss, words):
  os.makedirs(tmp_path / "joint" / "align")
  (tmp_path / "joint" / "align" / "results.json").write_text(
      json.dumps({"localization/mean_lesion_auroc": 0.9}))
  (tmp_path / "joint" / "align" / "config.json").write_text(json.dumps({"loss": loss}))
  assert words in "\n".join(report.joint_recipe_section(str(tmp_path), {}))


def test_joint_section_names_the_chosen_checkpoints(tmp_path):
  metric = "val_localization/mean_lesion_auroc"
  for name, results in (("align", {"localization/mean_lesion_auroc": 0.9, "step": 600,
                                   "checkpoint_step": 150, metric: 0.93}),
                        ("align_no_region_loss", {"localization/mean_lesion_auroc": 0.5,
                                                  "step": 600, "checkpoint_step": 50})):
    os.makedirs(tmp_path / "joint" / name)
    (tmp_path / "joint" / name / "results.json").write_text(json.dumps(results))
  config = {"checkpoint": {"use_best": True, "best_metric": metric},
            "evals": {"val_localization": {"type": "localization", "split": "val"}}}
  (tmp_path / "joint" / "align" / "config.json").write_text(json.dumps(config))
  text = "\n".join(report.joint_recipe_section(str(tmp_path), {}))
  assert ("the lesions best on the val split during training (val_localization/mean_lesion_auroc;"
          " the recipe's: step 150 of 600, 0.930 there; the ablation's chosen the same way: "
          "step 50), so the test split chooses nothing.") in text
  config["checkpoint"]["use_best"] = False
  (tmp_path / "joint" / "align" / "config.json").write_text(json.dumps(config))
  assert "chooses nothing" not in "\n".join(report.joint_recipe_section(str(tmp_path), {}))
