r"""Reads the released files of the public benchmarks PathFLIP reports on into this project's
inputs.

  python -m data_prep.benchmarks ADAPTER --input FILE [FILE ...] --output OUT \
      [--split train|val|test [...]] [--slides_dir DIR] [--slide_ext .svs] [--id_from_file] \
      [--skip_invalid] [--category narrow|broad|both] [--fold N] [--label COL[=NAME] ...]

ADAPTER               reads                                              writes
slidebench_captions   SlideBench-Caption (TCGA) CSV                      manifest
slidebench_vqa        SlideBench-VQA (TCGA) CSV                          questions CSV
bcnb_vqa              SlideBench-VQA (BCNB) CSV                          questions CSV
retrieval_split       slide / caption / split table, or PathFLIP's or    manifest
                      SlideChat's caption JSON
cptac_labels          CPTAC label table (Patho-Bench ``k=all.tsv``,      manifest (label columns for
                      PathFLIP's CPTAC CSV, a GDC/PDC clinical table)    the slide_linear_probe)

A manifest (``.jsonl``, ``.csv`` or ``.tsv``; ``pathflip_jax/data/manifest.py``) gets ``slide_id``,
``path``, ``patient_id`` (when known), ``split`` and the benchmark's columns; a questions CSV
(``.csv``) gets exactly ``instructions.COLUMNS``, every row ``multiple_choice``. Several ``--input``
files are read in turn into one output; ``--split`` gives one split for all of them or one each.
The benchmarks are test sets, so the split is "test" unless the file or ``--split`` says otherwise;
a questions CSV must name the same split as the manifest of its slides (stage instruct refuses a
question whose split differs from its slide's).

Layouts assumed (column names are matched ignoring case, spaces, "_" and "-")
--------------------------------------------------------------------------------
slidebench_captions  ``ID,Slide,Tumor,Question,Caption`` (``SlideBench-Caption-TCGA.csv`` of the
    SlideChat release, huggingface General-Medical-AI/SlideChat; the columns as in the copy PathFLIP
    ships, github cyclexfy/PathFLIP2 ``datasets/SlideBench-Caption-TCGA.csv``). Used: ``Slide``
    (required), ``Caption`` (required), ``Tumor`` (optional, the TCGA project without "TCGA-",
    kept as ``tumor``). ``Question`` (the report prompt) and ``ID`` are not used.
slidebench_vqa  ``ID,Slide,Tumor,Broad Category,Narrow Category,Question,A,B,C,D,Answer``: the
    columns SlideChat's ``xtuner/tools/test.py`` reads from ``--test_slide_csv
    SlideBench-VQA(TCGA).csv`` (SlideChat README; the tool as in forks such as github
    binhnam2907/SlideChatImprovement ``xtuner/tools/test.py``, which skips empty options), and the
    copy in cyclexfy/PathFLIP2 ``datasets/SlideBench-VQA-TCGA.csv``: ``Answer`` is the letter,
    Broad Category is Microscopy/Diagnosis/Clinical, Narrow Category one of the 13 reported
    categories. Required: ``Slide``, ``Question``, ``A``, ``B``, ``Answer``; further single-letter
    columns (``C``..``G``: PathFLIP's ``src/eval/eval_vlm.py`` reads up to G) are options too.
    ``category`` is the Narrow Category (``--category broad|both`` for Broad or "Broad / Narrow").
bcnb_vqa  ``ID,Slide,Task,Question,A,B,C,D,Answer``: the dataset card of General-Medical-AI/
    SlideChat ("SlideBench-VQA (BCNB).csv ... Slide(patient_id), Task, Question, Answer options (A,
    B, C, D), and the correct answer"; features "named by patient ID; for example, 1.csv"), column
    list as read by github OzzyChen97/TC-SSA ``vqa/tools/test_benchmark_bcnb.py`` (C and D empty
    for tasks with two classes; ``Answer`` compared with a letter). ``Slide`` is the BCNB patient
    id, one WSI per patient, released as ``<id>.jpg`` (github bupt-ai-cz/BALNMP README), so
    ``--slide_ext`` defaults to ``.jpg`` here. ``category`` is ``Task``.
retrieval_split  (a) any table (CSV/TSV/JSONL) with a slide column (``slide_id``, ``Slide``,
    ``image``, ``file_name``), a caption column (``caption``, ``report``, ``text``) and optionally a
    split column (``split``, ``set``, ``subset``, ``partition``); (b) the JSON list PathFLIP's
    ``src/eval/eval_retrieval.py`` reads (cyclexfy/PathFLIP2, default
    ``datasets/SlideBench-Caption-TCGA-plus.json`` through ``src/dataset/dataset_pathflip.py``):
    objects with ``image`` (a feature file path) and ``caption`` (and ``fine_grained_concepts``,
    dropped: lists do not pass through); (c) SlideChat's caption JSON (github winglet0996/SlideChat
    ``dataset/train_data_example.json``): ``id``, ``image`` (a one-element list) and
    ``conversations``, the caption being the first "gpt" turn. Split values train/training,
    val/valid/validation/dev, test/testing; other scalar columns pass through.
cptac_labels  (a) Patho-Bench task splits (huggingface MahmoodLab/Patho-Bench,
    ``<dataset>/<task>/k=all.tsv`` beside ``config.yaml``; read by github mahmoodlab/Patho-Bench
    ``patho_bench/SplitFactory.py`` and ``DataSplit``): tab-separated ``case_id``, ``slide_id``,
    the task's label column (config ``task_col``, integer codes of ``label_dict``) and
    ``fold_0``..``fold_K`` holding train/val/test; (b) PathFLIP's CPTAC tables
    (cyclexfy/PathFLIP2 ``datasets/CPTAC_NSCLC_{train,test}.csv``): ``slide_id,conch_feature,label``
    with label CPTAC-LUAD / CPTAC-LSCC, one file per split; (c) a clinical table keyed by case only
    (GDC/PDC ``case_submitter_id``, ``case_id``, ``patient_id``; "'--" for missing), whose cases
    are expanded to the slides under ``--slides_dir`` named ``<case>-*`` / ``<case>.*`` (TCGA
    ``TCGA-XX-XXXX-01Z-...``, CPTAC ``C3L-00001-21``). Label columns: ``--label COL[=NAME]``, by
    default every column that is not an id, ``fold_*``, ``split`` or a feature path
    (``conch_feature``, ``features_path``, ``feature_path``, ``h5_path``, ``path``). The split is
    ``--fold N`` (``fold_N``), else ``--split``, else the table's ``split`` column, else ``fold_0``,
    else "test". Empty label cells and nan/NA/N/A/None/null/--/'-- are missing ("" in the output);
    integer-valued floats ("1.0") become integers ("1").

Slide ids and paths
-------------------
The benchmark's slide field is kept as ``slide_id``, reduced to its file name without a known
slide or feature extension (``.svs``, ``.tif``, ``.ndpi``, ``.jpg``, ``.h5``, ``.pt``, ``.csv``,
...):
SlideChat's ``TCGA-05-0000-01Z-00-DX1`` stays as it is, PathFLIP's
``datasets/features/TCGA/LUAD/.../TCGA-05-0000-01Z-00-DX1.<uuid>.h5`` becomes
``TCGA-05-0000-01Z-00-DX1.<uuid>`` (the stem TRIDENT/CLAM features of that slide carry), BCNB's
``1`` (or ``1.0``) stays ``1``. ``patient_id`` is the first 12 characters of a TCGA id
(``TCGA-XX-XXXX``), the ``C3L-/C3N-nnnnn`` case of a CPTAC id, the case column of a label table,
or BCNB's patient id.

``path`` is where the slide file is expected. Without ``--slides_dir`` it is ``<slide_id><ext>``
(``--slide_ext``, default ``.svs``; ``.jpg`` for BCNB), relative, so it resolves next to the
manifest, and the file need not exist: features imported with ``data_prep/import_features.py``
from TRIDENT/CLAM are joined to a manifest given as ``config.manifest`` (stage align) by
``slide_id`` alone. With ``--slides_dir`` (searched recursively, e.g. a gdc-client download of
``<uuid>/<name>.svs`` folders) ``path`` is the absolute path of the file named ``<slide_id>.<ext>``
or, for a SlideChat barcode, ``<slide_id>.<anything>.<ext>`` (``TCGA-...-DX1.<uuid>.svs``); a slide
with several such files is skipped (ambiguous), one with none keeps the expected path and is
counted as missing. ``--id_from_file`` makes ``slide_id`` the stem of the file found (so that it
equals the slide id TRIDENT/CLAM features of that file get), keeping the benchmark's id in
``benchmark_slide``; give the same ``--slides_dir``/``--id_from_file`` to the VQA adapters so that
the questions name the same ids.

Multiple-choice questions
-------------------------
Options are the non-empty letter columns; an "A. text" / "A) text" / "(A) text" / "A: text" prefix
with the option's own letter is removed. ``Answer`` may be the letter (also "C.", "(C)"), the
option's text (case and spacing ignored) or "C. text". The project's multiple-choice format has
exactly four options: a row with more than 4, fewer than 2, or 2-3 options is skipped (reasons
too_many_options / too_few_options / not_4_options), options are never invented.

Errors and skipped rows
-----------------------
Input that cannot be read the documented way raises BenchmarkError naming the file, the line (the
item of a JSON list) and the column: a missing required column, an answer that is not one of the
row's options, an option after an empty one, an unknown split value. ``--skip_invalid`` skips such
rows instead (reason invalid). Rows that are unusable by nature are skipped with a reason and
counted: empty_slide, empty_caption, empty_question, duplicate_slide (a manifest holds a slide
once; the first row wins), too_many_options, too_few_options, not_4_options, ambiguous_file,
no_label, not_in_fold, no_slide_for_case. ``run`` prints a one-line summary, logs each skipped row
(file:line: reason) to stderr and returns the summary; an input that leaves no row is an error and
nothing is written. Outputs are written whole (a temporary file renamed into place).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import re
import sys
import tempfile
from typing import Any, Callable, Sequence

from pathflip_jax.data import instructions
from pathflip_jax.data import manifest as manifest_lib

ADAPTERS = ("slidebench_captions", "slidebench_vqa", "bcnb_vqa", "retrieval_split",
            "cptac_labels")
SPLITS = ("train", "val", "test")
DEFAULT_SPLIT = "test"
SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu",
                    ".svslide", ".isyntax", ".czi", ".dcm", ".jpg", ".jpeg", ".png")
FEATURE_EXTENSIONS = (".h5", ".hdf5", ".pt", ".npy", ".npz", ".csv")
# Slide formats first: when a slide and its features share a stem, the slide is the path.
KNOWN_EXTENSIONS = SLIDE_EXTENSIONS + FEATURE_EXTENSIONS
CATEGORY_MODES = ("narrow", "broad", "both")
MANIFEST_EXTENSIONS = (".jsonl", ".json", ".ndjson", ".csv", ".tsv")

_SPLIT_NAMES = {"train": "train", "training": "train", "trn": "train",
                "val": "val", "valid": "val", "validation": "val", "dev": "val", "tune": "val",
                "test": "test", "testing": "test", "tst": "test", "holdout": "test"}
_MISSING_LABELS = {"", "nan", "na", "n/a", "none", "null", "--", "'--"}
_TCGA_PATIENT = re.compile(r"^(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})", re.IGNORECASE)
_CPTAC_PATIENT = re.compile(r"^(C3[LN]-\d{5})", re.IGNORECASE)
# "(C)" or "C." / "C)" / "C:" (punctuation required, so that "A cat" is not the letter A).
_LETTER = r"(?:\(([A-Za-z])\)|([A-Za-z])[.):])"
_LETTER_ONLY = re.compile(rf"^(?:{_LETTER}|([A-Za-z]))$")
_LETTER_TEXT = re.compile(rf"^{_LETTER}\s*(.+)$", re.DOTALL)
_OPTION_PREFIX = re.compile(rf"^{_LETTER}\s+(.+)$", re.DOTALL)
_INTEGER_FLOAT = re.compile(r"^-?\d+\.0+$")
# Label tables: slide and case columns, most specific first (GDC's case_id is a UUID, its
# case_submitter_id the C3L-/TCGA- barcode; Patho-Bench's case_id is the barcode).
_SLIDE_COLUMNS = ("slide_id", "slide", "slide_submitter_id", "file_name")
_CASE_COLUMNS = ("case_submitter_id", "case_id", "submitter_id", "patient_id", "case", "patient")


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


# --------------------------------------------------------------------------- slide ids and files


def benchmark_slide_id(value: str) -> str:
  """A benchmark's slide field as a slide id: its file name without a known extension."""
  name = re.split(r"[\\/]", str(value).strip())[-1]
  stem, ext = os.path.splitext(name)
  return stem if stem and ext.lower() in KNOWN_EXTENSIONS else name


def patient_of(slide_id: str) -> str:
  """``TCGA-XX-XXXX`` (a TCGA id's first 12 characters) or ``C3L-nnnnn``; "" for other ids."""
  for pattern in (_TCGA_PATIENT, _CPTAC_PATIENT):
    m = pattern.match(slide_id)
    if m:
      return m.group(1).upper()
  return ""


@dataclasses.dataclass(frozen=True)
class Resolved:
  slide_id: str
  path: str
  found: bool
  benchmark_slide: str      # the benchmark's id when --id_from_file replaced it, else ""


class SlideFiles:
  """Where each slide's file is (``--slides_dir``), or is expected (no folder given)."""

  def __init__(self, root: str | None = None, ext: str | None = None,
               id_from_file: bool = False):
    if ext is not None and not ext.startswith("."):
      ext = "." + ext
    self.root, self.ext, self.id_from_file = root, ext, id_from_file
    self.by_stem: dict[str, list[str]] = {}
    if root is None:
      if id_from_file:
        raise BenchmarkError("--id_from_file needs --slides_dir (the files to take ids from)")
      return
    if not os.path.isdir(root):
      raise BenchmarkError(f"--slides_dir {root}: no such folder")
    for folder, subfolders, files in os.walk(root):
      subfolders.sort()
      for name in sorted(files):
        stem, e = os.path.splitext(name)
        if e.lower() in KNOWN_EXTENSIONS:
          self.by_stem.setdefault(stem, []).append(os.path.abspath(os.path.join(folder, name)))
    rank = {e: i for i, e in enumerate(KNOWN_EXTENSIONS)}
    for paths in self.by_stem.values():
      paths.sort(key=lambda p: rank[os.path.splitext(p)[1].lower()])

  def stems(self, slide_id: str) -> list[str]:
    """Stems of the files of a slide: ``<id>`` itself, else ``<id>.<anything>`` (a TCGA barcode
    whose files carry ``.<uuid>``)."""
    if slide_id in self.by_stem:
      return [slide_id]
    return sorted(s for s in self.by_stem if s.startswith(slide_id + "."))

  def case_stems(self, case_id: str) -> list[str]:
    """Stems of the slides of a case: ``<case>``, ``<case>-*`` or ``<case>.*``."""
    return sorted(s for s in self.by_stem
                  if s == case_id or s.startswith(case_id + "-") or s.startswith(case_id + "."))

  def resolve(self, slide_id: str, default_ext: str) -> Resolved:
    """The slide's file; raises _RowProblem(None, ...) when several files could be it."""
    ext = self.ext or default_ext
    if self.root is None:
      return Resolved(slide_id, slide_id + ext, False, "")
    stems = self.stems(slide_id)
    if len(stems) > 1:
      raise _RowProblem(None, f"slide {slide_id!r} matches several files under "
                              f"{self.root}: {stems[:4]}")
    if not stems:
      return Resolved(slide_id, os.path.abspath(os.path.join(self.root, slide_id + ext)), False,
                      "")
    stem = stems[0]
    path = self.by_stem[stem][0]
    if self.id_from_file and stem != slide_id:
      return Resolved(stem, path, True, slide_id)
    return Resolved(slide_id, path, True, "")


def _slides(slides: SlideFiles | None) -> SlideFiles:
  return slides if slides is not None else SlideFiles()


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


def _manifest_row(slide_id: str, where: str, slides: SlideFiles, default_ext: str,
                  report: Report, patient_id: str | None = None) -> dict[str, Any] | None:
  """slide_id, path, patient_id (+ benchmark_slide) of a manifest row, or None when skipped."""
  try:
    resolved = slides.resolve(slide_id, default_ext)
  except _RowProblem as e:
    report.skip(where, "ambiguous_file", e.message)
    return None
  if resolved.slide_id in report.seen:
    report.skip(where, "duplicate_slide", f"slide {resolved.slide_id!r} already on "
                                          f"{report.seen[resolved.slide_id]}")
    return None
  report.seen[resolved.slide_id] = where
  if slides.root is not None and not resolved.found:
    report.missing_files.append(resolved.slide_id)
  row: dict[str, Any] = {"slide_id": resolved.slide_id, "path": resolved.path}
  patient = patient_id if patient_id is not None else patient_of(resolved.slide_id)
  if patient:
    row["patient_id"] = patient
  if resolved.benchmark_slide:
    row["benchmark_slide"] = resolved.benchmark_slide
  return row


# --------------------------------------------------------------------------- captions


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
  for where, row in rows:
    report.read += 1
    if report.skip_empty(where, row, [(slide_col, "empty_slide"),
                                      (caption_col, "empty_caption")]):
      continue
    caption = row[caption_col]
    entry = _manifest_row(benchmark_slide_id(row[slide_col]), where, slides, ".svs", report)
    if entry is None:
      continue
    entry.update(split=split, caption=caption)
    if tumor_col and row.get(tumor_col):
      entry["tumor"] = row[tumor_col]
    out.append(entry)
  return out


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


# --------------------------------------------------------------------------- labels


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


# --------------------------------------------------------------------------- questions


def _norm(text: str) -> str:
  return re.sub(r"\s+", " ", text).strip().rstrip(".").strip().casefold()


def _strip_prefix(letter: str, text: str) -> str:
  """``text`` without an "A. " / "A) " / "(A) " / "A: " prefix naming its own letter."""
  m = _OPTION_PREFIX.match(text)
  if m and (m.group(1) or m.group(2)).upper() == letter:
    return m.group(3).strip()
  return text


def answer_letter(answer: str, options: dict[str, str], column: str = "Answer") -> str:
  """The letter of ``answer`` among ``options`` ({letter: text}); _RowProblem when none."""
  answer = answer.strip()
  if not answer or answer.lower() == "nan":
    raise _RowProblem(column, "empty answer")
  m = _LETTER_ONLY.match(answer)
  if m:
    letter = next(g for g in m.groups() if g).upper()
    if letter in options:
      return letter
    raise _RowProblem(column, f"answer {answer!r} names option {letter}, which this row does not "
                              f"have (options {sorted(options)})")
  matches = [k for k, v in options.items() if _norm(v) == _norm(answer)]
  if len(matches) == 1:
    return matches[0]
  if len(matches) > 1:
    raise _RowProblem(column, f"answer {answer!r} is the text of options {matches}")
  m = _LETTER_TEXT.match(answer)
  if m:
    letter = (m.group(1) or m.group(2)).upper()
    if letter in options and _norm(m.group(3)) == _norm(options[letter]):
      return letter
  raise _RowProblem(column, f"answer {answer!r} is not one of the options {options}")


def _option_columns(columns: Sequence[str], path: str) -> list[tuple[str, str]]:
  """(letter, column) of the single-letter option columns, A first."""
  letters = sorted((c.strip().upper(), c) for c in columns
                   if len(c.strip()) == 1 and c.strip().isalpha())
  found = [letter for letter, _ in letters]
  for needed in "AB":
    if needed not in found:
      raise BenchmarkError(f"{path}:1: missing required option column {needed!r}; the header "
                           f"has {list(columns)}")
  return letters


def _vqa(path: str, *, split: str, slides: SlideFiles, report: Report, skip_invalid: bool,
         slide_cols: Sequence[str], clean_id: Callable[[str], str],
         category_of: Callable[[list[str], str], Callable[[dict], str]],
         default_ext: str) -> list[dict[str, Any]]:
  """Questions-CSV rows of a SlideChat-style multiple-choice file."""
  _check_split(split)
  columns, rows = read_table(path)
  slide_col = _column(columns, slide_cols, path, "slide")
  question_col = _column(columns, ("Question",), path, "question")
  answer_col = _column(columns, ("Answer",), path, "answer")
  option_cols = _option_columns(columns, path)
  category = category_of(columns, path)
  out = []
  for where, row in rows:
    report.read += 1
    if report.skip_empty(where, row, [(slide_col, "empty_slide"),
                                      (question_col, "empty_question")]):
      continue
    question = row[question_col]
    try:
      options: dict[str, str] = {}
      empty = None
      for letter, column in option_cols:
        text = row.get(column, "")
        if not text or text.lower() == "nan":
          empty = empty or column
          continue
        if empty:
          raise _RowProblem(column, f"option {letter} is given but option {empty} before it is "
                                    "empty")
        options[letter] = _strip_prefix(letter, text)
      n = len(options)
      if n != len(instructions.LETTERS):
        reason = ("too_many_options" if n > 4 else "too_few_options" if n < 2
                  else "not_4_options")
        report.skip(where, reason, f"{n} option{'s' if n != 1 else ''} (the multiple-choice "
                                   "format holds exactly 4)")
        continue
      letter = answer_letter(row.get(answer_col, ""), options, answer_col)
      resolved = slides.resolve(clean_id(row[slide_col]), default_ext) if (
          slides.id_from_file) else None
    except _RowProblem as e:
      if e.column is None:  # several files could be the slide
        report.skip(where, "ambiguous_file", e.message)
      else:
        _problem(where, e, report, skip_invalid)
      continue
    slide_id = resolved.slide_id if resolved else clean_id(row[slide_col])
    texts = [options[k] for k in instructions.LETTERS]
    out.append({"slide_id": slide_id, "split": split, "category": category(row),
                "question": question, **dict(zip(instructions.LETTERS, texts)),
                "answer": letter, "answer_text": options[letter],
                "type": instructions.MULTIPLE_CHOICE})
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


# --------------------------------------------------------------------------- command line


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--input", nargs="+", required=True,
                      help="the benchmark's file(s), read in turn into one output")
  common.add_argument("--output", required=True,
                      help="manifest .jsonl/.csv/.tsv, or questions .csv for the VQA adapters")
  common.add_argument("--split", nargs="+", choices=SPLITS,
                      help="split of every row: one for all inputs or one per input (default: "
                           "the file's own, else test)")
  common.add_argument("--slides_dir",
                      help="folder of the slide (or feature) files, searched recursively")
  common.add_argument("--slide_ext",
                      help="extension of an expected slide file (default .svs; .jpg for BCNB)")
  common.add_argument("--id_from_file", action="store_true",
                      help="slide_id = stem of the file found under --slides_dir (the benchmark's "
                           "id kept as benchmark_slide)")
  common.add_argument("--skip_invalid", action="store_true",
                      help="skip rows with errors (answer not an option, bad split...) instead "
                           "of stopping")
  parser = argparse.ArgumentParser(
      prog="python -m data_prep.benchmarks", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="adapter", required=True, metavar="ADAPTER")
  sub.add_parser("slidebench_captions", parents=[common],
                 help="SlideBench-Caption (TCGA) CSV -> manifest")
  vqa = sub.add_parser("slidebench_vqa", parents=[common],
                       help="SlideBench-VQA (TCGA) CSV -> questions CSV")
  vqa.add_argument("--category", choices=CATEGORY_MODES, default="narrow",
                   help="category column: Narrow Category, Broad Category or 'Broad / Narrow'")
  sub.add_parser("bcnb_vqa", parents=[common], help="SlideBench-VQA (BCNB) CSV -> questions CSV")
  sub.add_parser("retrieval_split", parents=[common],
                 help="slide/caption/split table or caption JSON -> manifest")
  cptac = sub.add_parser("cptac_labels", parents=[common],
                         help="CPTAC label table (Patho-Bench k=all.tsv, ...) -> manifest")
  cptac.add_argument("--fold", type=int, help="split from column fold_N (Patho-Bench)")
  cptac.add_argument("--label", nargs="+", metavar="COL[=NAME]",
                     help="label columns to keep, optionally renamed (default: all others)")
  args = parser.parse_args(argv)
  if args.split and len(args.split) not in (1, len(args.input)):
    parser.error(f"--split: give one split or one per --input ({len(args.input)}), got "
                 f"{len(args.split)}")
  if args.id_from_file and not args.slides_dir:
    parser.error("--id_from_file needs --slides_dir")
  if getattr(args, "fold", None) is not None and args.fold < 0:
    parser.error("--fold must be >= 0")
  return args


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Converts the inputs, writes the output, returns the summary (BenchmarkError on bad input)."""
  args = _parse_args(argv)
  slides = SlideFiles(args.slides_dir, args.slide_ext, args.id_from_file)
  report = Report()
  questions = args.adapter in ("slidebench_vqa", "bcnb_vqa")
  rows: list[dict[str, Any]] = []
  for i, path in enumerate(args.input):
    split = (args.split[i] if len(args.split) > 1 else args.split[0]) if args.split else None
    kw = {"slides": slides, "report": report, "skip_invalid": args.skip_invalid}
    if args.adapter == "slidebench_captions":
      rows += slidebench_captions(path, split or DEFAULT_SPLIT, **kw)
    elif args.adapter == "slidebench_vqa":
      rows += slidebench_vqa(path, split or DEFAULT_SPLIT, args.category, **kw)
    elif args.adapter == "bcnb_vqa":
      rows += bcnb_vqa(path, split or DEFAULT_SPLIT, **kw)
    elif args.adapter == "retrieval_split":
      rows += retrieval_split(path, split, **kw)
    else:
      rows += cptac_labels(path, split, args.fold, args.label, **kw)
  for s in report.skipped:
    _log(f"{s['where']}: skipped ({s['reason']}): {s['detail']}")
  reasons = report.reasons()
  skipped = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()))
  if not rows:
    raise BenchmarkError(f"{', '.join(args.input)}: no usable rows among {report.read} "
                         f"(skipped: {skipped or 'none'}); nothing written")
  if questions:
    write_questions(rows, args.output)
  else:
    write_manifest(rows, args.output)
  splits: dict[str, int] = {}
  for row in rows:
    splits[row["split"]] = splits.get(row["split"], 0) + 1
  summary = {
      "adapter": args.adapter, "inputs": [os.path.abspath(p) for p in args.input],
      "output": os.path.abspath(args.output), "read": report.read, "written": len(rows),
      "skipped": len(report.skipped), "skipped_by_reason": reasons, "splits": splits,
      "missing_files": len(report.missing_files), "skips": report.skipped,
  }
  kind = "questions" if questions else "slides"
  line = (f"{args.adapter}: read {report.read} rows, wrote {len(rows)} {kind} to {args.output}, "
          f"skipped {len(report.skipped)}" + (f" ({skipped})" if skipped else ""))
  if args.slides_dir and not questions:
    line += f"; {len(report.missing_files)} slides without a file under {args.slides_dir}"
  print(line, flush=True)
  return summary


def main(argv: Sequence[str] | None = None) -> None:
  """Runs the job; exit status 2 for unusable input."""
  try:
    run(argv)
  except (BenchmarkError, manifest_lib.ManifestError) as e:
    _log(str(e))
    raise SystemExit(2) from None


if __name__ == "__main__":
  from data_prep import benchmarks
  benchmarks.main()
