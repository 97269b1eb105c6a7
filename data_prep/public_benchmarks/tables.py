"""What every adapter shares: reading a benchmark's table (CSV/TSV/JSON), the Report of rows read
and skipped, the errors, split names, and writing a manifest or questions CSV whole."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import sys
import tempfile
from typing import Any, Callable, Iterable, Iterator, Sequence

from pathflip_jax.data import instructions
from pathflip_jax.data import manifest as manifest_lib

SPLITS = ("train", "val", "test")
DEFAULT_SPLIT = "test"
MANIFEST_EXTENSIONS = (".jsonl", ".json", ".ndjson", ".csv", ".tsv")

_SPLIT_NAMES = {"train": "train", "training": "train", "trn": "train",
                "val": "val", "valid": "val", "validation": "val", "dev": "val", "tune": "val",
                "test": "test", "testing": "test", "tst": "test", "holdout": "test"}
_INTEGER_FLOAT = re.compile(r"^-?\d+\.0+$")


class BenchmarkError(ValueError):
  """A benchmark file that cannot be read as documented (the message names file, line, column)."""


class _RowProblem(Exception):
  """A row-level error, raised or (``--skip_invalid``) turned into a skip by the caller."""

  def __init__(self, column: str | None, message: str):
    super().__init__(message)
    self.column = column
    self.message = message


def _log(message: str) -> None:
  print(f"[benchmarks] {message}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class Report:
  """What an adapter saw: rows read, rows skipped (where, reason, detail), slides without a file.

  One Report shared by several inputs also keeps a manifest's slide ids unique across them.
  """

  read: int = 0
  skipped: list[dict[str, str]] = dataclasses.field(default_factory=list)
  missing_files: list[str] = dataclasses.field(default_factory=list)
  seen: dict[str, str] = dataclasses.field(default_factory=dict)   # slide_id -> where first

  def skip(self, where: str, reason: str, detail: str = "") -> None:
    self.skipped.append({"where": where, "reason": reason, "detail": detail})

  def skip_empty(self, where: str, row: dict[str, Any],
                 required: Sequence[tuple[str, str]]) -> bool:
    """Skips a row (and says True) whose first empty cell among ``required`` (column, reason)
    decides the reason."""
    for column, reason in required:
      if not row.get(column):
        self.skip(where, reason, f"column {column!r} is empty")
        return True
    return False

  def filled(self, rows: Iterable[tuple[str, dict[str, Any]]],
             required: Sequence[tuple[str, str]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """The (where, row) pairs of ``rows`` whose ``required`` cells are all filled; every row
    counts as read, the others are skipped as in :meth:`skip_empty`."""
    for where, row in rows:
      self.read += 1
      if not self.skip_empty(where, row, required):
        yield where, row

  def reasons(self) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in self.skipped:
      counts[s["reason"]] = counts.get(s["reason"], 0) + 1
    return counts


# --------------------------------------------------------------------------- reading tables


def _key(name: str) -> str:
  return re.sub(r"[\s_\-]+", "", name).lower()


def _cell(value: Any) -> Any:
  """A JSON value as a table cell: scalars as stripped strings, lists/objects as they are."""
  if value is None:
    return ""
  if isinstance(value, bool):
    return str(value).lower()
  if isinstance(value, (int, float, str)):
    return str(value).strip()
  return value


def _read_delimited(path: str, delimiter: str) -> tuple[list[str], list[tuple[str, dict]]]:
  with open(path, newline="", encoding="utf-8-sig") as f:
    reader = csv.reader(f, delimiter=delimiter)
    try:
      header = next(reader, None)
      if header is None:
        raise BenchmarkError(f"{path}: empty file (no header row)")
      # pandas writes its index as an unnamed first column: ignore unnamed columns.
      names = ["" if not h.strip() or h.strip().startswith("Unnamed:") else h.strip()
               for h in header]
      seen: set[str] = set()
      for name in names:
        if name and name in seen:
          raise BenchmarkError(f"{path}:1: column {name!r} appears twice in the header")
        seen.add(name)
      rows = []
      start = reader.line_num + 1
      for record in reader:
        # A quoted caption may span lines: a row is named by the line it starts on.
        line, start = start, reader.line_num + 1
        if not any(cell.strip() for cell in record):
          continue
        if len(record) > len(names) and any(c.strip() for c in record[len(names):]):
          raise BenchmarkError(f"{path}:{line}: {len(record)} fields but the header has "
                               f"{len(names)} (an unquoted {delimiter!r} in a value?)")
        row = {name: (record[i].strip() if i < len(record) else "")
               for i, name in enumerate(names) if name}
        rows.append((f"{path}:{line}", row))
    except csv.Error as e:
      raise BenchmarkError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None
  return [n for n in names if n], rows


def _read_json(path: str) -> list[tuple[str, dict]]:
  with open(path, encoding="utf-8-sig") as f:
    text = f.read()
  if path.lower().endswith(".json"):
    try:
      data = json.loads(text)
    except json.JSONDecodeError:
      data = None  # not one document: read it as JSON lines below
    if isinstance(data, dict):
      raise BenchmarkError(f"{path}: expected a JSON list of objects (or JSON lines), got an "
                           f"object with keys {sorted(data)[:8]}")
    if isinstance(data, list):
      out = []
      for i, item in enumerate(data):
        if not isinstance(item, dict):
          raise BenchmarkError(f"{path}: item {i}: expected a JSON object, got "
                               f"{type(item).__name__}")
        out.append((f"{path}: item {i}", {str(k): _cell(v) for k, v in item.items()}))
      return out
  try:
    lines = manifest_lib.json_lines(path, text)
  except manifest_lib.ManifestError as e:
    raise BenchmarkError(str(e)) from None
  return [(f"{path}:{number}", {str(k): _cell(v) for k, v in item.items()})
          for number, item in lines]


def read_table(path: str) -> tuple[list[str], list[tuple[str, dict[str, Any]]]]:
  """(columns, [(where, row)]) of a ``.csv``/``.tsv``/``.txt`` or ``.jsonl``/``.json`` file.

  ``where`` is ``file:line`` (the line a CSV record starts on) or ``file: item i`` for a JSON
  list. Cells are stripped strings ("" when empty); JSON lists and objects are kept as they are.
  """
  if not os.path.isfile(path):
    raise BenchmarkError(f"{path}: input file not found")
  ext = os.path.splitext(path)[1].lower()
  if ext in (".jsonl", ".json", ".ndjson"):
    rows = _read_json(path)
    columns: list[str] = []
    for _, row in rows:
      columns.extend(k for k in row if k not in columns)
    return columns, rows
  if ext == ".tsv":
    delimiter = "\t"
  elif ext == ".csv":
    delimiter = ","
  else:
    with open(path, encoding="utf-8-sig") as f:
      first = f.readline()
    delimiter = "\t" if "\t" in first and "," not in first else ","
  return _read_delimited(path, delimiter)


def _column(columns: Sequence[str], candidates: Sequence[str], path: str, what: str,
            required: bool = True) -> str | None:
  """The first column matching a candidate (ignoring case, spaces, "_", "-")."""
  by_key = {}
  for c in columns:
    by_key.setdefault(_key(c), c)
  for candidate in candidates:
    if _key(candidate) in by_key:
      return by_key[_key(candidate)]
  if required:
    raise BenchmarkError(f"{path}:1: missing required {what} column (one of "
                         f"{list(candidates)}); the header has {list(columns)}")
  return None


# --------------------------------------------------------------------------- splits and row errors


def _check_split(split: str) -> str:
  if split not in SPLITS:
    raise BenchmarkError(f"split {split!r}; expected one of {SPLITS}")
  return split


def _split_value(value: Any, column: str) -> str:
  name = _SPLIT_NAMES.get(value.strip().lower()) if isinstance(value, str) else None
  if name is None:
    raise _RowProblem(column, f"split {value!r} is not one of train/val/test (or training, "
                              "validation, valid, dev, testing)")
  return name


def _problem(where: str, problem: _RowProblem, report: Report, skip_invalid: bool) -> None:
  """A row-level error: raised as BenchmarkError, or a skip with ``--skip_invalid``."""
  column = f"column {problem.column!r}: " if problem.column else ""
  if not skip_invalid:
    raise BenchmarkError(f"{where}: {column}{problem.message}") from None
  report.skip(where, "invalid", column + problem.message)


# --------------------------------------------------------------------------- writers


def _write_atomically(path: str, write: Callable[[Any], None]) -> None:
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".benchmarks-", suffix=".tmp", dir=folder)
  try:
    with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_manifest(rows: Sequence[dict[str, Any]], path: str) -> None:
  """Writes a manifest: JSON lines (``.jsonl``/``.json``/``.ndjson``) or ``.csv``/``.tsv``."""
  ext = os.path.splitext(path)[1].lower()
  if ext not in MANIFEST_EXTENSIONS:
    raise BenchmarkError(f"{path}: a manifest is .jsonl or .csv/.tsv, not {ext or 'no suffix'}")
  if ext in (".csv", ".tsv"):
    columns: list[str] = []
    for row in rows:
      columns.extend(k for k in row if k not in columns)

    def write(f):
      writer = csv.DictWriter(f, fieldnames=columns, delimiter="\t" if ext == ".tsv" else ",",
                              lineterminator="\n")
      writer.writeheader()
      writer.writerows(rows)
  else:
    def write(f):
      for row in rows:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
  _write_atomically(path, write)


def write_questions(rows: Sequence[dict[str, Any]], path: str) -> None:
  """Writes a questions CSV with exactly ``instructions.COLUMNS``."""
  if os.path.splitext(path)[1].lower() != ".csv":
    raise BenchmarkError(f"{path}: a questions file is a .csv (instructions.read_questions)")

  def write(f):
    writer = csv.DictWriter(f, fieldnames=list(instructions.COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
  _write_atomically(path, write)
