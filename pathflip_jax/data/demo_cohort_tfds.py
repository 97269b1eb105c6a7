"""The demo cohort's slide-level records as a TFDS dataset in the ArrayRecord format.

``make_demo_cohort`` prepares it under ``<cohort>/tfds``; afterwards

  import pathflip_jax.data.demo_cohort_tfds  # registers "demo_cohort"
  source = tfds.data_source("demo_cohort", data_dir="<cohort>/tfds")["train"]

hands grain a random-access source of {slide_id, patient_id, path, caption, diagnosis,
biomarker, tissue_types}. TFDS needs no TensorFlow for this (ArrayRecord + data_source).
"""

from __future__ import annotations

import json
import os

import tensorflow_datasets as tfds

from pathflip_jax.data import synthetic_he as he

DIAGNOSES = he.DIAGNOSES
TISSUES = tuple(he.TISSUE_NAMES[kind] for kind in sorted(he.TISSUE_NAMES))


class DemoCohort(tfds.core.GeneratorBasedBuilder):
  """Slide-level records of a generated demo cohort (one example per slide)."""

  VERSION = tfds.core.Version("1.0.0")

  def __init__(self, *, cohort_dir: str | None = None, **kwargs):
    self._cohort_dir = cohort_dir
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    # Built here rather than from a dataset package folder: this builder lives in a module.
    return tfds.core.DatasetInfo(
        builder=self,
        description="pathflip_jax demo cohort: synthetic H&E slides with captions and labels",
        features=tfds.features.FeaturesDict({
            "slide_id": tfds.features.Text(),
            "patient_id": tfds.features.Text(),
            "path": tfds.features.Text(),
            "caption": tfds.features.Text(),
            "diagnosis": tfds.features.ClassLabel(names=DIAGNOSES),
            "biomarker": tfds.features.ClassLabel(num_classes=2),
            "tissue_types": tfds.features.Sequence(tfds.features.ClassLabel(names=TISSUES)),
        }),
        supervised_keys=None)

  def _split_generators(self, dl_manager):
    if not self._cohort_dir:
      raise ValueError("DemoCohort needs cohort_dir= (a make_demo_cohort output directory) to "
                       "prepare; reading a prepared one needs only data_dir")
    manifest = os.path.join(self._cohort_dir, "manifest.jsonl")
    with open(manifest) as f:
      rows = [json.loads(line) for line in f if line.strip()]
    return {split: self._generate_examples([r for r in rows if r["split"] == split])
            for split in sorted({r["split"] for r in rows})}

  def _generate_examples(self, rows):
    for row in rows:
      yield row["slide_id"], {
          "slide_id": row["slide_id"], "patient_id": row["patient_id"],
          "path": os.path.join(self._cohort_dir, row["path"]), "caption": row["caption"],
          "diagnosis": row["diagnosis"], "biomarker": int(row["biomarker"]),
          "tissue_types": list(row["tissue_types"])}


def prepare(cohort_dir: str) -> str:
  """Writes the TFDS ArrayRecord files under ``cohort_dir/tfds``; returns that data_dir."""
  data_dir = os.path.join(cohort_dir, "tfds")
  builder = DemoCohort(cohort_dir=cohort_dir, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  return data_dir
