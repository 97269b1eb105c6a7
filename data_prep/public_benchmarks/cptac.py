"""CPTAC label tables (Patho-Bench task splits, PathFLIP's CPTAC CSVs, GDC/PDC clinical tables)
-> manifest rows with label columns for the slide_linear_probe."""

from __future__ import annotations

import re
from typing import Any, Sequence

from data_prep.public_benchmarks.slide_files import (SlideFiles, _manifest_row, _slides,
                                                     benchmark_slide_id)
from data_prep.public_benchmarks.tables import (DEFAULT_SPLIT, BenchmarkError, Report,
                                                _check_split, _column, _INTEGER_FLOAT, _key,
                                                _problem, _RowProblem, _split_value, read_table)

_MISSING_LABELS = {"", "nan", "na", "n/a", "none", "null", "--", "'--"}
# Label tables: slide and case columns, most specific first (GDC's case_id is a UUID, its
# case_submitter_id the C3L-/TCGA- barcode; Patho-Bench's case_id is the barcode).
_SLIDE_COLUMNS = ("slide_id", "slide", "slide_submitter_id", "file_name")
_CASE_COLUMNS = ("case_submitter_id", "case_id", "submitter_id", "patient_id", "case", "patient")


def _label_value(value: Any) -> str:
  value = value if isinstance(value, str) else ""
  if value.strip().lower() in _MISSING_LABELS:
    return ""
  if _INTEGER_FLOAT.match(value):
    return value.split(".")[0]
  return value


def _label_columns(columns: Sequence[str], requested: Sequence[str] | None, path: str,
                   not_labels: set[str]) -> list[tuple[str, str]]:
  """(input column, output name) of the label columns."""
  out = []
  if requested:
    for spec in requested:
      source, _, name = spec.partition("=")
      column = _column(columns, (source.strip(),), path, f"label {source.strip()!r}")
      out.append((column, name.strip() or column))
  else:
    out = [(c, c) for c in columns
           if c not in not_labels and not re.fullmatch(r"fold_\d+", c, re.IGNORECASE)
           and _key(c) not in ("conchfeature", "featurespath", "featurepath", "h5path", "path")]
  reserved = {"slide_id", "path", "patient_id", "split", "benchmark_slide"}
  for column, name in out:
    if name in reserved:
      raise BenchmarkError(f"{path}:1: label column {column!r} would be written as {name!r}, a "
                           f"column the manifest uses itself; rename it (--label {column}=NAME)")
  if not out:
    raise BenchmarkError(f"{path}:1: no label columns (the header has {list(columns)})")
  return out


def cptac_labels(path: str, split: str | None = None, fold: int | None = None,
                 labels: Sequence[str] | None = None, slides: SlideFiles | None = None,
                 report: Report | None = None,
                 skip_invalid: bool = False) -> list[dict[str, Any]]:
  """Manifest rows (slide_id, path, patient_id, split, label columns) of a CPTAC label table.

  Args:
    path: Patho-Bench ``k=all.tsv``, PathFLIP's ``CPTAC_*.csv`` or a clinical table.
    split: every row's split (else ``fold``, the table's split column, ``fold_0``, "test").
    fold: take the split from column ``fold_<fold>`` (rows with none there are skipped).
    labels: ``COL`` or ``COL=NAME`` label columns (default: every other column).
  """
  report = report if report is not None else Report()
  slides = _slides(slides)
  if split is not None:
    _check_split(split)
  columns, rows = read_table(path)
  slide_col = _column(columns, _SLIDE_COLUMNS, path, "slide", required=False)
  case_col = _column(columns, _CASE_COLUMNS, path, "case", required=False)
  if slide_col is None and case_col is None:
    raise BenchmarkError(f"{path}:1: no slide or case column (slide_id, case_id, "
                         f"case_submitter_id, patient_id, ...); the header has {list(columns)}")
  if slide_col is None and slides.root is None:
    raise BenchmarkError(f"{path}: the table names cases only ({case_col!r}); give --slides_dir "
                         "so that each case's slides can be found")
  folds = [c for c in columns if re.fullmatch(r"fold_\d+", c, re.IGNORECASE)]
  split_col = _column(columns, ("split",), path, "split", required=False)
  if fold is not None:
    fold_col = _column(columns, (f"fold_{fold}",), path, f"fold_{fold}")
  elif split is None and split_col is None and folds:
    fold_col = _column(columns, ("fold_0",), path, "fold_0")
  else:
    fold_col = None
  # Every id-like column (a GDC table's case_id is a UUID beside case_submitter_id) is no label.
  ids = {_key(c) for c in _SLIDE_COLUMNS + _CASE_COLUMNS}
  not_labels = {c for c in columns if _key(c) in ids} | {c for c in (split_col,) if c}
  label_cols = _label_columns(columns, labels, path, not_labels)
  out = []
  for where, row in rows:
    report.read += 1
    try:
      if fold_col is not None:
        if not row.get(fold_col):
          report.skip(where, "not_in_fold", f"column {fold_col!r} is empty")
          continue
        row_split = _split_value(row[fold_col], fold_col)
      elif split is not None:
        row_split = split
      elif split_col is not None and row.get(split_col):
        row_split = _split_value(row[split_col], split_col)
      else:
        row_split = DEFAULT_SPLIT
    except _RowProblem as e:
      _problem(where, e, report, skip_invalid)
      continue
    values = {name: _label_value(row.get(column)) for column, name in label_cols}
    if not any(values.values()):
      report.skip(where, "no_label", f"columns {[c for c, _ in label_cols]} are empty")
      continue
    case = row.get(case_col, "") if case_col else ""
    if report.skip_empty(where, row, [(slide_col or case_col, "empty_slide")]):
      continue
    if slide_col is not None:
      slide_ids = [benchmark_slide_id(row[slide_col])]
    else:
      slide_ids = slides.case_stems(case)
      if not slide_ids:
        report.skip(where, "no_slide_for_case", f"no file named {case}-* or {case}.* under "
                                                f"{slides.root}")
        continue
    for slide_id in slide_ids:
      entry = _manifest_row(slide_id, where, slides, ".svs", report, patient_id=case or None)
      if entry is None:
        continue
      entry["split"] = row_split
      entry.update(values)
      out.append(entry)
  return out
