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
     "0.5), and it reads each region's token as it enters the slide-context Transformer"),
    ({}, "start as the run's config.json does not record"),
])
def test_joint_section_names_the_value_path_start(tmp_path, model, words):
  for name, results in (("align", {"localization/mean_lesion_auroc": 0.9,
                                   "localization/auroc/tumour": 0.9,
                                   "localization/reference/mean_lesion_auroc": 0.95}),
                        ("align_no_region_loss", {"localization/mean_lesion_auroc": 0.5})):
    os.makedirs(tmp_path / "joint" / name)
    (tmp_path / "joint" / name / "results.json").write_text(json.dumps(results))
  (tmp_path / "joint" / "align" / "config.json").write_text(
      json.dumps({"model": model, "data": {"region_patches": 1}}))
  text = "\n".join(report.joint_recipe_section(str(tmp_path), {}))
  assert words in text
  assert "regions are single patches" in text and "scores 0.950 mean lesion AUROC" in text
  assert "| **lesion AUROC (mean)** | 0.900 | 0.500 |" in text
