"""SlideBench-VQA (BCNB): multiple-choice questions on the BCNB breast cancer slides, one per
patient, named by the patient id -> questions-CSV rows."""

from __future__ import annotations

from typing import Any

from data_prep.public_benchmarks.multiple_choice import _vqa
from data_prep.public_benchmarks.slide_files import SlideFiles, _slides, benchmark_slide_id
from data_prep.public_benchmarks.tables import DEFAULT_SPLIT, Report, _column, _INTEGER_FLOAT


def bcnb_slide_id(value: str) -> str:
  """A BCNB patient id as a slide id: ``1``, ``1.0`` (pandas), ``1.jpg`` and ``1.csv`` -> ``1``."""
  value = benchmark_slide_id(value)
  return value.split(".")[0] if _INTEGER_FLOAT.match(value) else value


def bcnb_vqa(csv_path: str, split: str = DEFAULT_SPLIT, slides: SlideFiles | None = None,
             report: Report | None = None, skip_invalid: bool = False) -> list[dict[str, Any]]:
  """Questions-CSV rows of SlideBench-VQA (BCNB); the category is the BCNB task."""

  def category_of(columns, path):
    task = _column(columns, ("Task",), path, "task", required=False)
    return lambda row: row.get(task, "") if task else ""

  return _vqa(csv_path, split=split, slides=_slides(slides),
              report=report if report is not None else Report(), skip_invalid=skip_invalid,
              slide_cols=("Slide", "slide_id", "patient_id"), clean_id=bcnb_slide_id,
              category_of=category_of, default_ext=".jpg")
