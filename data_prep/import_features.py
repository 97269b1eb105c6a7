r"""Imports patch features made elsewhere (TRIDENT, CLAM, SlideChat's release) as feature shards.

  python -m data_prep.import_features --format trident|clam|slidechat --input DIR|GLOB|FILE ... \
      --output_dir F --encoder NAME [--manifest M.jsonl|.csv] [--mpp X] \
      [--patch_size_level0 P] [--patches_dir D] [--patch_size S] [--slides_per_shard 16]

Every slide becomes one record of ``records.FEATURES`` (``features`` float16 [N, D], ``coords``
int64 [N, 2] level-0 top-left (x, y), ``patch_size_level0``, ``mpp``, ``encoder``, ``source`` =
the format, ``weights_hash`` "", ``mpp_source``, ``source_path``), written through
``feature_shards.FeatureWriter``: a re-run skips slides already imported, and a file that cannot be
imported is listed in ``failures.jsonl`` with the reason while every other slide is imported.
The slide id is the file name without its extension, unless a manifest maps it to a file.

Formats, as their tools write them
----------------------------------
trident  ``<job_dir>/<mag>x_<patch>px_<overlap>px_overlap/features_<encoder>/<slide>.h5``, from
         ``OpenSlideWSI.extract_patch_features`` (trident/wsi_objects/WSI.py) through
         ``trident.IO.save_h5``: dataset ``features`` [N, D] (float32 or float16) and
         dataset ``coords`` [N, 2] int64, level-0 (x, y) top-left. The patching attributes are
         copied onto ``coords`` (``coords_to_h5`` in trident/IO.py): ``patch_size`` (pixels at the
         target magnification), ``patch_size_level0`` (= patch_size * level0_magnification //
         target_magnification), ``level0_magnification``, ``target_magnification``, ``overlap``,
         ``name``, ``level0_width``/``level0_height`` in newer versions. ``features`` carries only
         ``name`` and ``savetodir``. When TRIDENT embedded CLAM coordinates, ``coords`` carries
         CLAM's attributes instead (below). ``features``/``coords`` with a leading batch axis
         ([1, N, D] / [1, N, 2]) are accepted; TRIDENT's slide-level files (``features`` [D]) are
         not patch features and fail as bad_file.
clam     ``<feat_dir>/h5_files/<slide>.h5`` from ``extract_features_fp.py``: ``features`` [N, D]
         float32 and ``coords`` [N, 2] int32, level-0 (x, y) top-left, appended batch by batch by
         ``save_hdf5`` with no attributes at all. The attributes live in the patching output
         ``<results_dir>/patches/<slide>.h5`` (``WholeSlideImage.process_contour``): on ``coords``,
         ``patch_size`` (at ``patch_level``), ``patch_level``, ``downsample`` (of that level, x/y),
         ``downsampled_level_dim``, ``level_dim``, ``name``, ``save_path``. Pass that folder as
         ``--patches_dir`` (``<slide>.h5`` or TRIDENT's ``<slide>_patches.h5`` is looked up) and the
         footprint is patch_size * downsample; otherwise give ``--patch_size_level0`` (or a
         manifest column ``patch_size_level0``). CLAM files record no magnification and no mpp.
slidechat  The released WSI features (huggingface General-Medical-AI/SlideChat; read by SlideChat's
         ``pd.read_csv(f).iloc[:, :512]``): one CSV per slide, ``<TCGA slide id>.csv``, a header
         row ``0,1,...,511,patch_name`` and one row per patch: 512 CONCH features (4 decimals) and
         ``patch_name`` = ``<col>_<row>.jpeg``. Those are DeepZoom tile addresses (DSMIL's
         ``deepzoom_tiler.py`` writes ``'%d_%d.jpeg' % (col, row)`` for non-overlapping 224-px
         tiles, which SlideChat's README points to), i.e. grid indices, not pixels (DeepZoom with
         limit_bounds counts from the slide's bounds origin, 0 for TCGA's SVS files): the level-0
         top-left is (col, row) * patch_size_level0, so ``--patch_size_level0`` (or the manifest
         column) is required, e.g. 448 for 20x tiles of a 40x (0.25 µm/px) scan, 224 for a 20x
         scan. ``--patch_names level0`` reads the names as level-0 pixel (x, y) instead.
         ``patch_size`` is recorded as 224 (``--patch_size`` overrides). A CSV without a
         ``patch_name`` column has no coordinates and is refused, unless
         ``--placeholder_coords``: then patches are laid on a row-major square grid in file order
         (x = (i mod W) * P, y = (i div W) * P, W = ceil(sqrt(N))), which keeps the features usable
         for models that ignore position but is NOT their place on the slide; such slides carry
         ``coords_source`` "placeholder_grid" in slides.jsonl (else "h5" or "patch_name").
         Feature columns are the header's integer names 0..D-1; other columns are ignored.

Slide resolution (mpp) is not stored by any of them. It comes from, in order: the manifest column
``mpp``; ``--mpp``; 10 / ``level0_magnification`` (TRIDENT attribute; a 40x scan -> 0.25 µm/px,
an estimate, recorded as mpp_source "magnification"). A slide with none of these fails naming the
flags. The patch footprint comes from the file's attributes, then ``--patches_dir``, then the
manifest column ``patch_size_level0``, then ``--patch_size_level0`` (the flag is a fallback: a
file's own attributes win).

Manifest (optional, ``.jsonl`` or ``.csv``/``.tsv``): ``slide_id`` plus optional ``features_path``
(or ``path`` when it names a file of this format; a ``path`` to the slide itself is just passed
through), ``mpp``, ``patch_size_level0``, and any label/caption columns, which go to slides.jsonl.
With a manifest only its slides are imported (rows without a file fail as "missing_file"); files
of ``--input`` not in it are counted and left alone.

Failure reasons: missing_file, bad_file (unreadable, missing dataset, wrong shape, N mismatch,
non-numeric cell...), no_patches, feature_dim_mismatch, no_patch_size, no_mpp, error (unforeseen).
``main()`` exits 1 when any slide failed.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import glob
import json
import math
import os
import re
import sys
import time
import traceback
import warnings
from typing import Any, Iterable, Sequence

import h5py
import numpy as np

from pathflip_jax import progress as progress_lib
from pathflip_jax.data import feature_shards
from pathflip_jax.data import manifest as manifest_lib

FORMATS = ("trident", "clam", "slidechat")
_EXTENSIONS = {"trident": (".h5", ".hdf5"), "clam": (".h5", ".hdf5"), "slidechat": (".csv",)}
SLIDECHAT_PATCH_SIZE = 224
_FLOAT16_MAX = float(np.finfo(np.float16).max)
_PATCH_NAME = re.compile(r"^\s*(-?\d+)_(-?\d+)(?:\.[A-Za-z0-9]+)?\s*$")
# Manifest columns this job reads itself (everything else passes through to slides.jsonl).
_MANIFEST_FILE_COLUMNS = ("features_path", "path")


def _log(message: str) -> None:
  print(f"[import_features] {message}", file=sys.stderr, flush=True)


class FileProblem(Exception):
  """One slide's file cannot be imported; ``message`` names the file and the field."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason
    self.message = message


@dataclasses.dataclass
class SlideInput:
  """A slide to import: its file (or why there is none) and its manifest row."""

  slide_id: str
  path: str | None
  row: dict[str, Any]
  mpp: float | None = None
  patch_size_level0: int | None = None
  missing: str | None = None


@dataclasses.dataclass
class Loaded:
  """What a file holds, before mpp and footprint are settled."""

  features: np.ndarray                       # float16 [N, D]
  coords: np.ndarray | None                  # int64 [N, 2]; None: grid indices to scale
  grid: np.ndarray | None = None             # int64 [N, 2] tile (col, row) or placeholder cells
  coords_source: str = "h5"
  patch_size_level0: float | None = None     # from the file's (or patching file's) attributes
  patch_size: float | None = None
  magnification: float | None = None         # of the patches (target magnification)
  level0_magnification: float | None = None
  patching_file: str | None = None           # the --patches_dir file consulted, if any


# --------------------------------------------------------------------------- shared checks


def _check_features(array: np.ndarray, where: str, first_line: int | None = None) -> np.ndarray:
  """[N, D] (or [1, N, D]) numbers -> float16, refusing what float16 cannot hold.

  ``first_line``: the file line of row 0 (CSV), so that a bad value is named by its line."""
  if array.ndim == 3 and array.shape[0] == 1:
    array = array[0]
  if array.ndim != 2:
    raise FileProblem("bad_file", f"{where} must be [N, D] (or [1, N, D]), got shape "
                                  f"{list(array.shape)}")
  if array.dtype.kind not in "fiu":
    raise FileProblem("bad_file", f"{where} must be numbers, got dtype {array.dtype}")
  if array.shape[0] == 0:
    raise FileProblem("no_patches", f"{where} has no rows (no patches)")
  if array.shape[1] == 0:
    raise FileProblem("bad_file", f"{where} has 0 feature columns")
  with np.errstate(over="ignore", invalid="ignore"):
    half = array.astype(np.float16)
  bad = ~np.isfinite(half)
  if bad.any():
    row = int(np.argwhere(bad)[0][0])
    at = f"line {row + first_line}" if first_line is not None else f"row {row}"
    raise FileProblem("bad_file", f"{where} has {int(bad.sum())} values that are NaN, infinite or "
                                  f"beyond float16 (|x| > {_FLOAT16_MAX:g}); the first at {at}")
  return half


def _check_coords(array: np.ndarray, where: str, rows: int, features_where: str) -> np.ndarray:
  if array.ndim == 3 and array.shape[0] == 1:
    array = array[0]
  if array.ndim != 2 or array.shape[1] != 2:
    raise FileProblem("bad_file", f"{where} must be [N, 2] level-0 (x, y), got shape "
                                  f"{list(array.shape)}")
  if array.shape[0] != rows:
    raise FileProblem("bad_file", f"{features_where} has {rows} rows but {where} has "
                                  f"{array.shape[0]}: they must be one coordinate per feature row")
  if array.dtype.kind in "iu":
    return array.astype(np.int64)
  if array.dtype.kind == "f":
    if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
      raise FileProblem("bad_file", f"{where} holds non-integer pixel coordinates")
    return array.astype(np.int64)
  raise FileProblem("bad_file", f"{where} must be integers, got dtype {array.dtype}")


def _number(value: Any) -> float | None:
  """An HDF5 attribute as a float: numpy scalars, 1-element or (x, y) arrays (x is taken),
  numeric strings; None for TRIDENT's serialised 'None' and anything not a number."""
  if isinstance(value, bytes):
    value = value.decode(errors="replace")
  if isinstance(value, str):
    try:
      value = float(value)
    except ValueError:
      return None
  array = np.asarray(value)
  if array.dtype.kind not in "fiu" or array.size == 0:
    return None
  number = float(array.reshape(-1)[0])
  return number if math.isfinite(number) else None


def _geometry(attrs: Sequence[Any]) -> dict[str, float | None]:
  """Patch geometry from attribute sets (first that has a key wins): TRIDENT's names, then
  CLAM's (patch_size at patch_level times that level's downsample)."""

  def get(name: str) -> float | None:
    for a in attrs:
      if name in a:
        value = _number(a[name])
        if value is not None:
          return value
    return None

  size = get("patch_size")
  level0 = get("patch_size_level0")
  target_mag, level0_mag = get("target_magnification"), get("level0_magnification")
  if level0 is None and size and target_mag and level0_mag:
    level0 = size * level0_mag / target_mag
  if level0 is None and size:
    downsample = get("downsample")
    custom = get("custom_downsample") or 1.0
    if downsample:
      level0 = size * downsample * custom
    elif get("patch_level") == 0:
      level0 = size * custom
  return {"patch_size_level0": level0, "patch_size": size, "magnification": target_mag,
          "level0_magnification": level0_mag}


# --------------------------------------------------------------------------- HDF5 (TRIDENT, CLAM)


def _dataset(f: h5py.File, name: str, path: str) -> h5py.Dataset:
  node = f.get(name)
  if not isinstance(node, h5py.Dataset):
    found = sorted(f.keys())
    hint = ""
    if name == "features" and "coords" in found:
      hint = " (a patching/coordinates file, not a features file?)"
    raise FileProblem("bad_file", f"{path}: no dataset {name!r}{hint}; it holds {found}")
  return node


def _patching_file(patches_dir: str, slide_id: str) -> str | None:
  for name in (f"{slide_id}.h5", f"{slide_id}_patches.h5"):
    candidate = os.path.join(patches_dir, name)
    if os.path.isfile(candidate):
      return candidate
  return None


def read_h5(path: str, patches_dir: str | None = None, slide_id: str | None = None) -> Loaded:
  """A TRIDENT or CLAM patch-feature file (both: datasets ``features`` and ``coords``)."""
  try:
    f = h5py.File(path, "r")
  except OSError as e:
    raise FileProblem("bad_file", f"{path}: not a readable HDF5 file ({e})") from None
  with f:
    features_ds, coords_ds = _dataset(f, "features", path), _dataset(f, "coords", path)
    features = _check_features(features_ds[()], f"{path}: dataset 'features'")
    coords = _check_coords(coords_ds[()], f"{path}: dataset 'coords'", features.shape[0],
                           f"{path}: dataset 'features'")
    geometry = _geometry([coords_ds.attrs, features_ds.attrs, f.attrs])
  patching = None
  if geometry["patch_size_level0"] is None and patches_dir:
    patching = _patching_file(patches_dir, slide_id or os.path.splitext(os.path.basename(path))[0])
    if patching:
      try:
        with h5py.File(patching, "r") as p:
          node = _dataset(p, "coords", patching)
          count = node.shape[0] if node.ndim else 0
          if count != features.shape[0]:
            raise FileProblem("bad_file", f"{patching}: dataset 'coords' has {count} patches but "
                                          f"{path} has {features.shape[0]}: not the patching run "
                                          "these features came from")
          found = _geometry([node.attrs])
      except OSError as e:
        raise FileProblem("bad_file", f"{patching}: not a readable HDF5 file ({e})") from None
      geometry = {k: v if v is not None else found[k] for k, v in geometry.items()}
  return Loaded(features=features, coords=coords, coords_source="h5", patching_file=patching,
                **geometry)


def peek_h5(path: str) -> int:
  with h5py.File(path, "r") as f:
    shape = _dataset(f, "features", path).shape
  return int(shape[-1]) if len(shape) in (2, 3) else 0


# --------------------------------------------------------------------------- SlideChat CSV


def _csv_header(path: str) -> tuple[list[str], list[int], int | None]:
  """(header, positions of feature columns 0..D-1, position of patch_name or None)."""
  try:
    with open(path, newline="", encoding="utf-8-sig") as f:
      header = next(csv.reader(f), None)
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise FileProblem("bad_file", f"{path}: not a readable CSV file ({e})") from None
  if not header:
    raise FileProblem("bad_file", f"{path}: empty file, expected a header row "
                                  "0,1,...,D-1,patch_name")
  header = [h.strip() for h in header]
  numbered = [(i, int(h)) for i, h in enumerate(header) if re.fullmatch(r"\d+", h)]
  if not numbered:
    raise FileProblem("bad_file", f"{path}:1: no feature columns: expected a header row "
                                  f"0,1,...,D-1,patch_name, got {header[:4]}...")
  names = [n for _, n in numbered]
  if names != list(range(len(names))):
    first_wrong = next(n for k, n in enumerate(names) if n != k)
    raise FileProblem("bad_file", f"{path}:1: feature columns must be named 0,1,...,D-1 in "
                                  f"order; column {first_wrong!r} is out of place (is the first "
                                  "row a header?)")
  name_col = header.index("patch_name") if "patch_name" in header else None
  return header, [i for i, _ in numbered], name_col


def peek_csv(path: str) -> int:
  return len(_csv_header(path)[1])


def _locate_csv_problem(path: str, header: list[str], positions: list[int],
                        name_col: int | None) -> str | None:
  """Slow path, run only when the fast parse failed: the first bad line and column."""
  with open(path, newline="", encoding="utf-8-sig") as f:
    reader = csv.reader(f)
    next(reader, None)
    for row in reader:
      if not row:
        continue
      line = reader.line_num
      if len(row) != len(header):
        return (f"{path}:{line}: {len(row)} columns, the header has {len(header)}")
      for i in positions:
        try:
          float(row[i])
        except ValueError:
          return f"{path}:{line}: column {header[i]!r} is not a number: {row[i]!r}"
      if name_col is not None and not _PATCH_NAME.match(row[name_col]):
        return (f"{path}:{line}: column 'patch_name' must be '<col>_<row>.jpeg', got "
                f"{row[name_col]!r}")
  return None


def read_slidechat_csv(path: str, placeholder_coords: bool = False) -> Loaded:
  header, positions, name_col = _csv_header(path)
  if name_col is None and not placeholder_coords:
    raise FileProblem("bad_file", f"{path}: no 'patch_name' column, so no patch coordinates; "
                                  "pass --placeholder_coords to import it on a placeholder grid "
                                  "(not the patches' real places)")

  def fail(error: Exception) -> FileProblem:
    where = _locate_csv_problem(path, header, positions, name_col)
    return FileProblem("bad_file", where or f"{path}: {error}")

  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", UserWarning)  # "input contained no data": no_patches below
      values = np.loadtxt(path, delimiter=",", skiprows=1, usecols=positions, dtype=np.float32,
                          ndmin=2, comments=None)
      names = None
      if name_col is not None:
        names = np.loadtxt(path, delimiter=",", skiprows=1, usecols=[name_col], dtype=str,
                           ndmin=1, comments=None)
  except ValueError as e:
    raise fail(e) from None
  except (OSError, UnicodeDecodeError) as e:
    raise FileProblem("bad_file", f"{path}: not a readable CSV file ({e})") from None
  features = _check_features(values, f"{path}: feature columns", first_line=2)
  if names is None:
    n = features.shape[0]
    width = math.ceil(math.sqrt(n))
    cells = np.arange(n)
    grid = np.stack([cells % width, cells // width], axis=1).astype(np.int64)
    return Loaded(features=features, coords=None, grid=grid, coords_source="placeholder_grid",
                  patch_size=SLIDECHAT_PATCH_SIZE)
  grid = np.zeros((len(names), 2), np.int64)
  for k, name in enumerate(names):
    match = _PATCH_NAME.match(name)
    if not match:
      raise fail(ValueError(f"row {k + 2}: bad patch_name {name!r}"))
    grid[k] = int(match.group(1)), int(match.group(2))
  if len(grid) != features.shape[0]:
    raise fail(ValueError(f"{len(grid)} patch names for {features.shape[0]} feature rows"))
  return Loaded(features=features, coords=None, grid=grid, coords_source="patch_name",
                patch_size=SLIDECHAT_PATCH_SIZE)


# --------------------------------------------------------------------------- one slide


def load(fmt: str, slide: SlideInput, args: argparse.Namespace) -> Loaded:
  if fmt == "slidechat":
    return read_slidechat_csv(slide.path, args.placeholder_coords)
  return read_h5(slide.path, args.patches_dir, slide.slide_id)


def build_record(fmt: str, slide: SlideInput, loaded: Loaded, args: argparse.Namespace,
                 feature_dim: int) -> tuple[dict[str, Any], dict[str, Any]]:
  """The FEATURES record (without schema_version) and the extra slides.jsonl columns."""
  path = slide.path
  dim = loaded.features.shape[1]
  if dim != feature_dim:
    raise FileProblem("feature_dim_mismatch",
                      f"{path}: features are {dim}-d, the other slides of this import (and "
                      f"{args.output_dir}) are {feature_dim}-d: another encoder?")
  # Patch footprint: the file's own attributes, then the manifest, then the flag.
  footprint = loaded.patch_size_level0
  footprint_source = "patches_dir" if loaded.patching_file else "file"
  if footprint is None and slide.patch_size_level0 is not None:
    footprint, footprint_source = slide.patch_size_level0, "manifest"
  if footprint is None and args.patch_size_level0 is not None:
    footprint, footprint_source = args.patch_size_level0, "flag"
  if footprint is None:
    if fmt == "slidechat":
      looked = ("patch_name holds grid indices (col_row), so the patch footprint in level-0 "
                "pixels must be given")
    else:
      looked = ("no attribute 'patch_size_level0', nor 'patch_size' with "
                "'target_magnification'+'level0_magnification' or 'downsample'/'patch_level', on "
                "'coords', 'features' or the file (CLAM's h5_files carry none)")
      if loaded.patching_file:
        looked += f"; nor on 'coords' of {loaded.patching_file}"
      elif args.patches_dir:
        looked += f"; no {slide.slide_id}.h5 in --patches_dir {args.patches_dir}"
      elif fmt == "clam":
        looked += "; --patches_dir (CLAM's patching output) not given"
    raise FileProblem("no_patch_size", f"{path}: cannot tell patch_size_level0: {looked}; pass "
                                       "--patch_size_level0 P or a manifest column "
                                       "'patch_size_level0'")
  footprint = int(round(footprint))
  if footprint < 1:
    raise FileProblem("bad_file", f"{path}: patch_size_level0 {footprint} (from the "
                                  f"{footprint_source}) must be >= 1")
  # Slide mpp: manifest, flag, then an estimate from the scan's magnification.
  magnification = loaded.magnification
  if slide.mpp is not None:
    mpp, mpp_source = slide.mpp, "manifest"
  elif args.mpp is not None:
    mpp, mpp_source = args.mpp, "flag"
  elif loaded.level0_magnification:
    mpp, mpp_source = 10.0 / loaded.level0_magnification, "magnification"
  else:
    recorded = ("SlideChat CSVs record none" if fmt == "slidechat" else
                "the file has no 'level0_magnification' attribute to estimate it from")
    raise FileProblem("no_mpp", f"{path}: no mpp (level-0 µm per pixel) for slide "
                                f"{slide.slide_id!r}: {recorded}; pass --mpp X or a manifest "
                                "column 'mpp'")
  if loaded.coords is not None:
    coords = loaded.coords
  elif fmt == "slidechat" and args.patch_names == "level0" and loaded.coords_source == "patch_name":
    coords = loaded.grid
  else:
    coords = loaded.grid * footprint
  patch_size = args.patch_size if args.patch_size is not None else loaded.patch_size
  record: dict[str, Any] = {
      "slide_id": slide.slide_id, "features": loaded.features,
      "coords": np.ascontiguousarray(coords, dtype=np.int64),
      "patch_size_level0": footprint, "mpp": float(mpp), "encoder": args.encoder,
      "weights_hash": "", "source": fmt, "mpp_source": mpp_source,
      "source_path": os.path.abspath(path), "coords_source": loaded.coords_source,
  }
  if patch_size:
    record["patch_size"] = int(round(patch_size))
    record["patch_mpp"] = float(mpp) * footprint / record["patch_size"]
  if magnification:
    record["magnification"] = float(magnification)
  row = {**slide.row, "source": fmt, "source_path": record["source_path"],
         "coords_source": loaded.coords_source, "mpp_source": mpp_source,
         "patch_size_level0_source": footprint_source}
  return record, row


# --------------------------------------------------------------------------- inputs


def discover(inputs: Iterable[str], fmt: str) -> list[str]:
  """Files of ``fmt`` named by --input: folders (their files), globs, or files."""
  exts = _EXTENSIONS[fmt]
  out: dict[str, None] = {}
  for spec in inputs:
    if os.path.isdir(spec):
      folder = spec
      if fmt == "clam" and os.path.isdir(os.path.join(spec, "h5_files")):
        folder = os.path.join(spec, "h5_files")
      found = sorted(p for p in glob.glob(os.path.join(folder, "*"))
                     if p.lower().endswith(exts) and os.path.isfile(p))
      if not found:
        subdirs = sorted(d for d in os.listdir(folder)
                         if os.path.isdir(os.path.join(folder, d)))
        hint = f"; it has folders {subdirs[:8]}: point --input at one" if subdirs else ""
        raise SystemExit(f"--input {spec}: no {'/'.join(exts)} files in {folder}{hint}")
    elif glob.has_magic(spec):
      found = sorted(p for p in glob.glob(spec, recursive=True)
                     if p.lower().endswith(exts) and os.path.isfile(p))
      if not found:
        raise SystemExit(f"--input {spec}: no {'/'.join(exts)} files match")
    elif os.path.isfile(spec):
      found = [spec]
    else:
      raise SystemExit(f"--input {spec}: no such file or folder")
    for path in found:
      out[os.path.abspath(path)] = None
  return list(out)


def _stem(path: str) -> str:
  name = os.path.basename(path)
  for ext in (".hdf5", ".h5", ".csv"):
    if name.lower().endswith(ext):
      return name[:-len(ext)]
  return os.path.splitext(name)[0]


def read_import_manifest(path: str) -> list[dict[str, Any]]:
  """Rows with ``slide_id`` (required) and whatever else, in file order."""
  rows = manifest_lib.read_rows(path)
  seen: dict[str, int] = {}
  out = []
  for line, row in rows:
    where = f"{path}:{line}"
    if row.get("slide_id") in (None, ""):
      raise manifest_lib.ManifestError(f"{where}: missing required column 'slide_id'")
    slide_id = str(row["slide_id"])
    if slide_id in seen:
      raise manifest_lib.ManifestError(
          f"{where}: slide_id {slide_id!r} already used on line {seen[slide_id]}")
    seen[slide_id] = line
    row["slide_id"] = slide_id
    for column, kind in (("mpp", float), ("patch_size_level0", float)):
      value = row.get(column)
      if value in (None, ""):
        row[column] = None
        continue
      try:
        number = kind(value)
      except (TypeError, ValueError):
        raise manifest_lib.ManifestError(
            f"{where}: column {column!r} must be a number, got {value!r}") from None
      if not number > 0:
        raise manifest_lib.ManifestError(f"{where}: column {column!r} must be > 0, got {value!r}")
      row[column] = number
    out.append((line, row))
  if not out:
    raise manifest_lib.ManifestError(f"{path}: manifest has no rows")
  return [r for _, r in out]


def plan_slides(args: argparse.Namespace) -> tuple[list[SlideInput], int]:
  """The slides this import is about, and how many --input files no manifest row asked for."""
  files = discover(args.input, args.format) if args.input else []
  by_id: dict[str, str] = {}
  for path in files:
    slide_id = _stem(path)
    if slide_id in by_id:
      raise SystemExit(f"two files for slide {slide_id!r}: {by_id[slide_id]} and {path}; "
                       "import them separately or map them with a manifest (features_path)")
    by_id[slide_id] = path
  if not args.manifest:
    return [SlideInput(s, p, {"slide_id": s}) for s, p in by_id.items()], 0
  try:
    manifest_rows = read_import_manifest(args.manifest)
  except manifest_lib.ManifestError as e:
    raise SystemExit(f"manifest error: {e}") from None
  base = os.path.dirname(os.path.abspath(args.manifest))
  exts = _EXTENSIONS[args.format]
  slides, used = [], set()
  for row in manifest_rows:
    slide_id = row["slide_id"]
    given = None
    for column in _MANIFEST_FILE_COLUMNS:
      value = row.get(column)
      if value not in (None, "") and (column == "features_path"
                                      or str(value).lower().endswith(exts)):
        given = os.path.normpath(os.path.join(base, os.path.expanduser(str(value))))
        break
    passthrough = {k: v for k, v in row.items() if v is not None}
    slide = SlideInput(slide_id, None, passthrough, mpp=row.get("mpp"),
                       patch_size_level0=row.get("patch_size_level0"))
    if given is not None:
      slide.path = given
      if not os.path.isfile(given):
        slide.missing = f"{args.manifest}: slide {slide_id!r}: {given} does not exist"
    elif slide_id in by_id:
      slide.path = by_id[slide_id]
      used.add(slide_id)
    else:
      where = f"under --input {' '.join(args.input)}" if args.input else "(no --input given)"
      slide.missing = (f"{args.manifest}: slide {slide_id!r}: no file {slide_id}{exts[0]} {where} "
                       "and no 'features_path' column")
    slides.append(slide)
  return slides, len(set(by_id) - used - {s.slide_id for s in slides})


def _feature_dim(output_dir: str, pending: list[SlideInput], fmt: str) -> int | None:
  """The directory's feature_dim if it has one, else the commonest among the pending files
  (only shapes and headers are read), so that one stray file does not decide it."""
  config = os.path.join(output_dir, feature_shards.CONFIG_FILE)
  if os.path.exists(config):
    with open(config) as f:
      dim = json.load(f).get("feature_dim")
    if isinstance(dim, int):
      return dim
  counts: dict[int, int] = {}
  for slide in pending:
    if slide.missing or not slide.path:
      continue
    try:
      dim = peek_csv(slide.path) if fmt == "slidechat" else peek_h5(slide.path)
    except (FileProblem, OSError, ValueError):
      continue  # reported when the slide is read
    if dim > 0:
      counts[dim] = counts.get(dim, 0) + 1
  if not counts:
    return None
  dim = max(counts, key=counts.get)  # ties: the first file's
  if len(counts) > 1:
    _log(f"feature dims in the input: {counts}; importing the {dim}-d ones, the others fail")
  return dim


# --------------------------------------------------------------------------- entry point


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m data_prep.import_features", description=__doc__.split("\n\n")[0],
      epilog="The module docstring describes each format as its tool writes it.")
  parser.add_argument("--format", required=True, choices=FORMATS)
  parser.add_argument("--input", nargs="+", default=[],
                      help="folders, globs or files of per-slide feature files (.h5, or .csv for "
                           "slidechat); for clam a feat_dir with h5_files/ is accepted")
  parser.add_argument("--manifest", help="JSONL/CSV: slide_id [, features_path, mpp, "
                                         "patch_size_level0, labels...]; only its slides")
  parser.add_argument("--output_dir", required=True, help="feature directory to write")
  parser.add_argument("--encoder", required=True,
                      help="name of the patch encoder the features came from (e.g. uni_v1, "
                           "conch_v1)")
  parser.add_argument("--mpp", type=float, help="level-0 µm/px for slides the manifest gives none")
  parser.add_argument("--patch_size_level0", type=int,
                      help="patch footprint in level-0 pixels where the file does not record it")
  parser.add_argument("--patches_dir",
                      help="CLAM patching output (<slide>.h5 with coords attributes) to take the "
                           "patch footprint from")
  parser.add_argument("--patch_size", type=int,
                      help="pixels of the patch images the encoder saw (recorded; slidechat: 224)")
  parser.add_argument("--patch_names", choices=("grid", "level0"), default="grid",
                      help="slidechat: patch_name <a>_<b> is a tile (col, row) [grid] or level-0 "
                           "pixels (x, y) [level0]")
  parser.add_argument("--placeholder_coords", action="store_true",
                      help="slidechat: import CSVs without patch_name on a placeholder grid")
  parser.add_argument("--slides_per_shard", type=int, default=16)
  parser.add_argument("--progress_interval", type=float, default=5.0,
                      help="seconds between progress lines (0: none)")
  args = parser.parse_args(argv)
  if not args.input and not args.manifest:
    parser.error("give --input, --manifest (with a features_path column), or both")
  if args.mpp is not None and not args.mpp > 0:
    parser.error(f"--mpp must be > 0, got {args.mpp}")
  for flag in ("patch_size_level0", "patch_size", "slides_per_shard"):
    value = getattr(args, flag)
    if value is not None and value < 1:
      parser.error(f"--{flag} must be >= 1, got {value}")
  if args.patches_dir and not os.path.isdir(args.patches_dir):
    parser.error(f"--patches_dir {args.patches_dir}: no such folder")
  return args


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Imports the slides; returns a summary (slides written / skipped / failed, failures...)."""
  args = _parse_args(sys.argv[1:] if argv is None else argv)
  started = time.perf_counter()
  output_dir = os.path.abspath(args.output_dir)
  slides, not_in_manifest = plan_slides(args)
  done = set(feature_shards.committed_rows(output_dir)) if os.path.isdir(output_dir) else set()
  pending = [s for s in slides if s.slide_id not in done]
  _log(f"{len(slides)} {args.format} slides, {len(slides) - len(pending)} already imported, "
       f"{len(pending)} to do -> {output_dir}")
  if not_in_manifest:
    _log(f"{not_in_manifest} --input files are not in the manifest: left alone")

  feature_dim = _feature_dim(output_dir, pending, args.format)
  writer = None
  if feature_dim is not None:
    identity = {"source": args.format, "encoder": args.encoder, "feature_dim": feature_dim}
    writer = feature_shards.FeatureWriter(output_dir, identity,
                                          slides_per_shard=args.slides_per_shard)
  failures: dict[str, dict[str, Any]] = {}
  written: list[str] = []
  progress = progress_lib.Progress(len(pending), "slides", "import_features",
                                   args.progress_interval or None)
  patches_done = 0
  for slide in pending:
    patches = 0
    try:
      if slide.missing:
        raise FileProblem("missing_file", slide.missing)
      loaded = load(args.format, slide, args)
      if writer is None:  # unreachable: a readable file gives the dim
        raise FileProblem("bad_file", f"{slide.path}: no feature dim")
      record, row = build_record(args.format, slide, loaded, args, feature_dim)
      writer.add(record, row=row)
      written.append(slide.slide_id)
      patches = record["features"].shape[0]
    except FileProblem as e:
      failures[slide.slide_id] = {"slide_id": slide.slide_id, "reason": e.reason,
                                  "error": e.message, "path": slide.path}
    except Exception as e:  # noqa: BLE001 - one slide's surprise must not stop the import
      trace = "".join(traceback.format_exception_only(type(e), e)).strip()
      failures[slide.slide_id] = {"slide_id": slide.slide_id, "reason": "error",
                                  "error": f"{slide.path}: {trace}", "path": slide.path}
    if slide.slide_id in failures and writer is not None:
      failure = failures[slide.slide_id]
      writer.fail(slide.slide_id, failure["reason"], failure["error"], path=slide.path)
    patches_done += patches
    progress.update(progress.done + 1, patches=patches_done)

  shards: list[str] = []
  if writer is not None:
    writer.close([s.row for s in slides])
    shards = writer.written
  elif pending:
    _log(f"no readable {args.format} file among {len(pending)}: nothing written to {output_dir}")
  elapsed = time.perf_counter() - started
  failure_rows = list(failures.values())
  summary = {
      "output_dir": output_dir, "format": args.format, "encoder": args.encoder,
      "feature_dim": feature_dim, "slides_total": len(slides), "slides_written": len(written),
      "slides_skipped": len(slides) - len(pending), "slides_failed": len(failure_rows),
      "not_in_manifest": not_in_manifest, "patches": patches_done, "shards": shards,
      "seconds": round(elapsed, 2), "failures": failure_rows,
  }
  _log(f"done in {elapsed:.1f}s: {len(written)} slides imported ({patches_done:,} patches, "
       f"{len(shards)} shards), {summary['slides_skipped']} already there, "
       f"{len(failure_rows)} failed -> {output_dir}")
  for failure in failure_rows:
    _log(f"  failed {failure['slide_id']}: {failure['reason']}: {failure['error']}")
  return summary


def main() -> None:
  summary = run()
  sys.exit(1 if summary["slides_failed"] else 0)


if __name__ == "__main__":
  main()
