"""SlideBench (the SlideChat release): SlideBench-Caption (TCGA) -> manifest rows with captions,
SlideBench-VQA (TCGA) -> questions-CSV rows."""

from __future__ import annotations

from typing import Any

from data_prep.public_benchmarks.multiple_choice import _vqa
from data_prep.public_benchmarks.slide_files import (SlideFiles, _manifest_row, _slides,
                                                     benchmark_slide_id)
from data_prep.public_benchmarks.tables import (DEFAULT_SPLIT, BenchmarkError, Report,
                                                _check_split, _column, read_table)

CATEGORY_MODES = ("narrow", "broad", "both")


def slidebench_captions(csv_path: str, split: str = DEFAULT_SPLIT,
                        slides: SlideFiles | None = None, report: Report | None = None,
                        skip_invalid: bool = False) -> list[dict[str, Any]]:
  """Manifest rows (slide_id, path, patient_id, split, caption, tumor) of SlideBench-Caption."""
  del skip_invalid  # no row-level errors here: every problem is a skip
  report = report if report is not None else Report()
  slides = _slides(slides)
  _check_split(split)
  columns, rows = read_table(csv_path)
  slide_col = _column(columns, ("Slide", "slide_id"), csv_path, "slide")
  caption_col = _column(columns, ("Caption", "caption", "report"), csv_path, "caption")
  tumor_col = _column(columns, ("Tumor",), csv_path, "tumor", required=False)
  out = []
  for where, row in report.filled(rows, [(slide_col, "empty_slide"),
                                         (caption_col, "empty_caption")]):
    caption = row[caption_col]
    entry = _manifest_row(benchmark_slide_id(row[slide_col]), where, slides, ".svs", report)
    if entry is None:
      continue
    entry.update(split=split, caption=caption)
    if tumor_col and row.get(tumor_col):
      entry["tumor"] = row[tumor_col]
    out.append(entry)
  return out


def slidebench_vqa(csv_path: str, split: str = DEFAULT_SPLIT, category: str = "narrow",
                   slides: SlideFiles | None = None, report: Report | None = None,
                   skip_invalid: bool = False) -> list[dict[str, Any]]:
  """Questions-CSV rows of SlideBench-VQA (TCGA); ``category`` narrow, broad or both."""
  if category not in CATEGORY_MODES:
    raise BenchmarkError(f"category={category!r}; expected one of {CATEGORY_MODES}")

  def category_of(columns, path):
    broad = _column(columns, ("Broad Category",), path, "broad category", required=False)
    narrow = _column(columns, ("Narrow Category",), path, "narrow category", required=False)

    def get(row):
      b, n = row.get(broad, "") if broad else "", row.get(narrow, "") if narrow else ""
      if category == "broad":
        return b or n
      if category == "both":
        return " / ".join(x for x in (b, n) if x)
      return n or b
    return get

  return _vqa(csv_path, split=split, slides=_slides(slides),
              report=report if report is not None else Report(), skip_invalid=skip_invalid,
              slide_cols=("Slide", "slide_id"), clean_id=benchmark_slide_id,
              category_of=category_of, default_ext=".svs")
