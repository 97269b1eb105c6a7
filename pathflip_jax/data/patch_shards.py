"""Patch shards: the tiling job's output, read by every later stage.

A tiling output directory holds

  patches-XXXXX-of-YYYYY.array_record    one record per tissue patch (schema ``records.PATCH``),
                                         slide by slide, patches of a slide contiguous
  slides.jsonl                           one row per slide: geometry, status, shard and offset
  failures.jsonl                         one row per slide that could not be tiled

Shards are written under a hidden temporary name and renamed when complete, so a file matching
``patches-*.array_record`` is always whole. Readers go through :class:`PatchShards` (random access,
a grain ``RandomAccessDataSource``) and :func:`read_slide_index`.

The directory may be a URL (``s3://``, ``gs://``): ArrayRecord reads and writes local files
only, so a shard is written in the local cache (``storage.cache()``) and uploaded whole when
complete (one PUT: the upload is the commit), and read from a local copy in the cache.
"""

from __future__ import annotations

import bisect
import fnmatch
import glob
import json
import os
import re
import shutil
from typing import Any, Iterator, Sequence

from array_record.python import array_record_module

from pathflip_jax import storage
from pathflip_jax.data import records

SHARD_PATTERN = "patches-*.array_record"
_SHARD_RE = re.compile(r"^patches-(?:g(\d{3})-)?(\d{5})-of-(\d{5})\.array_record$")
SLIDES_FILE = "slides.jsonl"
FAILURES_FILE = "failures.jsonl"
# ArrayRecord groups records into chunks; 'group_size:1' makes every record its own chunk so that
# random access reads one record, not a group (patches are read one at a time by grain). Records
# are mostly JPEG bytes, which do not compress: brotli (the default) would cost 3-4x the write
# time for nothing.
WRITER_OPTIONS = "group_size:1,uncompressed"
_RANDOM_ACCESS = "readahead_buffer_size:0"


def shard_name(index: int, count: int, generation: int = 0) -> str:
  """``patches-00003-of-00010.array_record``; later generations (runs that add slides to an
  existing output) insert ``g001-`` so that they never collide with earlier shard sets."""
  if not 0 <= index < count:
    raise ValueError(f"shard index {index} out of range for {count} shards")
  prefix = f"g{generation:03d}-" if generation else ""
  return f"patches-{prefix}{index:05d}-of-{count:05d}.array_record"


def is_shard_name(name: str) -> bool:
  return _SHARD_RE.match(name) is not None


def list_shards(directory: str) -> list[str]:
  """Complete patch shards in ``directory``, sorted by name."""
  return shard_files(directory, SHARD_PATTERN, _SHARD_RE)


def shard_files(directory: str, pattern: str, name_re: re.Pattern[str]) -> list[str]:
  """Files in ``directory`` matching the glob ``pattern`` whose names ``name_re`` accepts, sorted
  by name (the glob alone would also let through look-alikes such as other shard-name forms)."""
  if storage.is_url(directory):
    names = [n for n in storage.listdir(directory) if fnmatch.fnmatch(n, pattern)]
    return [storage.join(directory, n) for n in sorted(names) if name_re.match(n)]
  paths = sorted(glob.glob(os.path.join(directory, pattern)))
  return [p for p in paths if name_re.match(os.path.basename(p))]


def local_file(path: str) -> str:
  """A local path to read an ArrayRecord file from: the path itself, or a cached copy of a
  URL (ArrayRecord reads local files only; from ``s3://`` it reads no record at all)."""
  return storage.cache().local_copy(path) if storage.is_url(path) else path


class ShardWriter:
  """Writes one ArrayRecord file under a hidden temporary name; :meth:`commit` renames it (for a
  URL: writes it in the local cache and uploads it whole)."""

  def __init__(self, path: str):
    self.path = path
    self._remote = storage.is_url(path)
    if self._remote:
      directory, name = storage.cache().staging(path), storage.basename(path)
    else:
      directory, name = os.path.split(path)
    self.tmp_path = os.path.join(directory, f".{name}.inprogress-{os.getpid()}")
    self._writer = array_record_module.ArrayRecordWriter(self.tmp_path, WRITER_OPTIONS)
    self.count = 0

  def write(self, data: bytes) -> None:
    self._writer.write(data)
    self.count += 1

  def commit(self) -> str:
    self._writer.close()
    if self._remote:
      storage.upload(self.tmp_path, self.path)
      shutil.rmtree(os.path.dirname(self.tmp_path), ignore_errors=True)
    else:
      os.replace(self.tmp_path, self.path)
    return self.path

  def abort(self) -> None:
    try:
      self._writer.close()
    finally:
      if self._remote:
        shutil.rmtree(os.path.dirname(self.tmp_path), ignore_errors=True)
      elif os.path.exists(self.tmp_path):
        os.remove(self.tmp_path)

  def __enter__(self) -> "ShardWriter":
    return self

  def __exit__(self, exc_type, *_) -> None:
    if exc_type is None:
      self.commit()
    else:
      self.abort()


def read_records(path: str) -> Iterator[bytes]:
  """All records of one ArrayRecord file, in order."""
  reader = array_record_module.ArrayRecordReader(local_file(path))
  try:
    count = reader.num_records()
    step = 1024
    for start in range(0, count, step):
      yield from reader.read(range(start, min(count, start + step)))
  finally:
    reader.close()


def read_jsonl(path: str) -> list[dict[str, Any]]:
  rows = []
  for line_number, line in enumerate(storage.read_text(path).splitlines(), start=1):
    if line.strip():
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_number}: not valid JSON ({e})") from None
  return rows


def write_jsonl(path: str, rows: Sequence[dict[str, Any]]) -> None:
  """Writes rows atomically (temporary name, then rename; on an object store one upload)."""
  storage.write_text(path, "".join(json.dumps(row, sort_keys=False) + "\n" for row in rows))


def read_slide_index(directory: str, include_failed: bool = False) -> list[dict[str, Any]]:
  """Rows of ``slides.jsonl``: tiled slides (status "ok"), and failed ones if asked."""
  path = storage.join(directory, SLIDES_FILE)
  if not storage.exists(path):
    raise FileNotFoundError(f"{path}: no slide index; is {directory} a tiling output directory "
                            "(python -m data_prep.tile_slides)?")
  rows = read_jsonl(path)
  return rows if include_failed else [r for r in rows if r.get("status") == "ok"]


class PatchShards:
  """Random access to every patch of a tiling output directory (a grain data source).

  ``source[i]`` is the i-th patch record as a dict (``jpeg`` still encoded; see
  ``pathflip_jax.data.tiling.decode_jpeg``). Patches are ordered shard by shard, and within a
  shard slide by slide, so the patches of one slide are a contiguous index range:
  :meth:`slide_range`.
  """

  def __init__(self, directory: str):
    self.directory = directory
    self._paths = list_shards(directory)
    if not self._paths:
      raise FileNotFoundError(f"{directory}: no {SHARD_PATTERN} files")
    self._readers: list | None = None
    self._starts = [0]
    for path in self._paths:
      reader = array_record_module.ArrayRecordReader(local_file(path))
      self._starts.append(self._starts[-1] + reader.num_records())
      reader.close()
    self._slide_ranges: dict[str, tuple[int, int]] | None = None

  def __len__(self) -> int:
    return self._starts[-1]

  def __repr__(self) -> str:
    return f"PatchShards({self.directory!r}, shards={len(self._paths)}, patches={len(self)})"

  def _open(self) -> list:
    # Readers are opened lazily, per process: grain pickles the source into its workers.
    if self._readers is None:
      self._readers = [array_record_module.ArrayRecordReader(local_file(p), _RANDOM_ACCESS)
                       for p in self._paths]
    return self._readers

  def read_bytes(self, index: int) -> bytes:
    if not 0 <= index < len(self):
      raise IndexError(f"patch index {index} out of range [0, {len(self)})")
    shard = bisect.bisect_right(self._starts, index) - 1
    return self._open()[shard].read([index - self._starts[shard]])[0]

  def __getitem__(self, index: int) -> dict[str, Any]:
    shard = bisect.bisect_right(self._starts, index) - 1
    where = f"{self._paths[shard] if 0 <= shard < len(self._paths) else self.directory}[{index}]"
    return records.decode(self.read_bytes(int(index)), records.PATCH, where)

  def slide_range(self, slide_id: str) -> tuple[int, int]:
    """[start, stop) indices of one slide's patches (from slides.jsonl)."""
    if self._slide_ranges is None:
      offsets = {storage.basename(p): s for p, s in zip(self._paths, self._starts)}
      ranges = {}
      for row in read_slide_index(self.directory):
        if row["shard"] in offsets:
          start = offsets[row["shard"]] + row["shard_offset"]
          ranges[row["slide_id"]] = (start, start + row["num_patches"])
      self._slide_ranges = ranges
    if slide_id not in self._slide_ranges:
      raise KeyError(f"{self.directory}: slide {slide_id!r} has no patches in slides.jsonl")
    return self._slide_ranges[slide_id]

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_readers"] = None
    return state

  def close(self) -> None:
    for reader in self._readers or []:
      reader.close()
    self._readers = None
