"""Slide manifests: JSONL or CSV/TSV files listing slides, with at least ``slide_id`` and ``path``.

Relative paths are resolved against the manifest's own directory; the manifest and the slides may
be URLs (``s3://``, ``gs://``). An optional ``mpp`` column gives
a slide's µm per pixel (overriding the file's metadata). Every other column passes through to the
slide index (captions, labels, split, ...).
"""

from __future__ import annotations

import csv
import io
import json
import os
from typing import Any

from pathflip_jax import storage

REQUIRED = ("slide_id", "path")


class ManifestError(ValueError):
  """A manifest that cannot be used (the message names the file, line and column)."""


def read_manifest(path: str, reserved: tuple[str, ...] = ()) -> list[dict[str, Any]]:
  """Rows of a manifest, in file order, with ``path`` made absolute and ``mpp`` a float or None.

  Args:
    path: a ``.jsonl``/``.json`` (one JSON object per line) or ``.csv``/``.tsv`` file.
    reserved: column names the caller writes itself; a manifest that uses them is an error.
  """
  rows = read_rows(path)
  base = storage.dirname(storage.absolute(path))
  seen: dict[str, int] = {}
  out = []
  for line, row in rows:
    where = f"{path}:{line}"
    for column in REQUIRED:
      if row.get(column) in (None, ""):
        raise ManifestError(f"{where}: missing required column {column!r}")
    for column in reserved:
      if column in row:
        raise ManifestError(f"{where}: column {column!r} is written by the job itself; "
                            "rename it in the manifest")
    slide_id = str(row["slide_id"])
    if slide_id in seen:
      raise ManifestError(f"{where}: slide_id {slide_id!r} already used on line {seen[slide_id]}")
    seen[slide_id] = line
    row["slide_id"] = slide_id
    row["path"] = resolve(base, str(row["path"]))
    mpp = row.get("mpp")
    if mpp in (None, ""):
      row["mpp"] = None
    else:
      try:
        row["mpp"] = float(mpp)
      except (TypeError, ValueError):
        raise ManifestError(f"{where}: column 'mpp' must be a number, got {mpp!r}") from None
      if not row["mpp"] > 0:
        raise ManifestError(f"{where}: column 'mpp' must be > 0, got {mpp!r}")
    out.append(row)
  if not out:
    raise ManifestError(f"{path}: manifest has no rows")
  return out


def resolve(base: str, path: str) -> str:
  """A manifest's ``path`` made absolute against the manifest's folder ``base``: a URL stays as
  it is; a relative path under a URL manifest becomes a URL under it."""
  if storage.is_url(path):
    return path
  if storage.is_url(base):
    return storage.join(base, path)
  return os.path.normpath(os.path.join(base, os.path.expanduser(path)))


def read_rows(path: str) -> list[tuple[int, dict[str, Any]]]:
  """(line number, row) of every row of a ``.jsonl``/``.json`` or ``.csv``/``.tsv`` file, as
  written: no column is required or converted (callers check the columns they need)."""
  if not storage.exists(path):
    raise ManifestError(f"{path}: manifest not found")
  ext = os.path.splitext(path)[1].lower()
  if ext in (".jsonl", ".json", ".ndjson"):
    return json_lines(path)
  if ext in (".csv", ".tsv"):
    text = storage.read_bytes(path).decode("utf-8-sig")
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if ext == ".tsv" else ",")
    return [(i, dict(r)) for i, r in enumerate(reader, start=2)]
  raise ManifestError(f"{path}: unknown manifest type {ext!r}; use .jsonl or .csv")


def json_lines(path: str, text: str | None = None) -> list[tuple[int, dict[str, Any]]]:
  """(line number, object) of every non-blank line of a JSON-lines file (``text``: its contents,
  when the caller has read them). A byte-order mark, as spreadsheet tools write, is ignored."""
  if text is None:
    text = storage.read_bytes(path).decode("utf-8-sig")
  rows = []
  for line_number, line in enumerate(text.removeprefix("\ufeff").splitlines(), start=1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise ManifestError(f"{path}:{line_number}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
      raise ManifestError(f"{path}:{line_number}: expected a JSON object")
    rows.append((line_number, row))
  return rows
