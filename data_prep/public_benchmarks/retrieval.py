"""A slide-level retrieval set (a slide / caption / split table, PathFLIP's or SlideChat's caption
JSON) -> manifest rows with captions."""

from __future__ import annotations

from typing import Any

from data_prep.public_benchmarks.slide_files import (SlideFiles, _manifest_row, _slides,
                                                     benchmark_slide_id)
from data_prep.public_benchmarks.tables import (DEFAULT_SPLIT, Report, _cell, _check_split,
                                                _column, _problem, _RowProblem, _split_value,
                                                read_table)


def _conversation_caption(turns: Any) -> str:
  """The first answer ("gpt"/"assistant" turn) of a SlideChat conversation."""
  if not isinstance(turns, list):
    raise _RowProblem("conversations", "expected a list of {from, value} turns")
  for turn in turns:
    if isinstance(turn, dict) and str(turn.get("from", "")).lower() in ("gpt", "assistant"):
      return str(turn.get("value") or "").strip()
  return ""


def retrieval_split(path: str, split: str | None = None, slides: SlideFiles | None = None,
                    report: Report | None = None,
                    skip_invalid: bool = False) -> list[dict[str, Any]]:
  """Manifest rows (slide_id, path, patient_id, split, caption, other columns) of a slide-level
  retrieval set; ``split`` overrides the file's split column (default: that column, else test)."""
  report = report if report is not None else Report()
  slides = _slides(slides)
  if split is not None:
    _check_split(split)
  columns, rows = read_table(path)
  slide_col = _column(columns, ("slide_id", "Slide", "slide", "image", "wsi", "file_name"),
                      path, "slide")
  caption_col = _column(columns, ("caption", "Caption", "report", "text", "description"), path,
                        "caption", required=False)
  if caption_col is None and "conversations" not in columns:
    _column(columns, ("caption", "report", "text"), path, "caption (or SlideChat conversations)")
  split_col = _column(columns, ("split", "set", "subset", "partition"), path, "split",
                      required=False)
  written = {"slide_id", "path", "patient_id", "split", "caption", "benchmark_slide"}
  consumed = {slide_col, caption_col, split_col, "conversations"}
  out = []
  for where, row in rows:
    report.read += 1
    try:
      raw = row.get(slide_col, "")
      if isinstance(raw, list):
        if len(raw) > 1:
          raise _RowProblem(slide_col, f"{len(raw)} images; one slide per row is expected")
        raw = _cell(raw[0]) if raw else ""
      if not isinstance(raw, str):
        raise _RowProblem(slide_col, f"expected a file name or id, got {type(raw).__name__}")
      if caption_col is not None:
        caption = row.get(caption_col, "")
        if not isinstance(caption, str):
          raise _RowProblem(caption_col, f"expected text, got {type(caption).__name__}")
      else:
        caption = _conversation_caption(row.get("conversations"))
      row_split = split
      if row_split is None:
        row_split = _split_value(row[split_col], split_col) if split_col and row.get(
            split_col) else DEFAULT_SPLIT
    except _RowProblem as e:
      _problem(where, e, report, skip_invalid)
      continue
    if not raw:
      report.skip(where, "empty_slide", f"column {slide_col!r} is empty")
      continue
    if not caption:
      report.skip(where, "empty_caption", "no caption")
      continue
    entry = _manifest_row(benchmark_slide_id(raw), where, slides, ".svs", report)
    if entry is None:
      continue
    patient = row.get("patient_id")
    if isinstance(patient, str) and patient:
      entry["patient_id"] = patient
    entry.update(split=row_split, caption=caption)
    for k, v in row.items():
      # Other scalar columns pass through (lists such as fine_grained_concepts do not).
      if k not in consumed and k not in written and isinstance(v, str):
        entry[k] = v
    out.append(entry)
  return out
