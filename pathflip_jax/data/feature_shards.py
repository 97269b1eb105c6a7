"""Feature shards: one record per slide of frozen patch features (schema ``records.FEATURES``).

A feature directory holds

  features-gNNN-XXXXX.array_record     slide records of run generation NNN, shard XXXXX
  slides.jsonl                         one row per slide: status, shard, offset, N, D, labels...
  failures.jsonl                       slides the latest run could not write, with the reason
  features.json                        the encoder this directory holds features of
  _state/shards/<shard>.jsonl          slide rows of a committed shard (written before it)

Both writers (``data_prep/extract_features.py`` and ``data_prep/import_features.py``) go through
:class:`FeatureWriter`: shards are written under a hidden temporary name and renamed when closed,
and that rename is the commit, so a killed job loses at most the open shard and a re-run skips
every slide in a committed one. Each run opens a new generation of shard names, so runs never
overwrite each other; several processes writing one directory at once (``extract_features
--num_shards``) each name their shards with their part (``features-gNNN-pKKK-XXXXX``) and keep
their failures in ``_state/failures/<part>.jsonl``, and ``slides.jsonl`` is rebuilt from every
committed shard and every part's failures, so re-runs merge without duplicates. Read with
:class:`FeatureShards` (random access by index or slide id). The directory may be a URL (shards
staged in the local cache and uploaded whole, as ``patch_shards``).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from typing import Any, Iterable, Mapping

import numpy as np
from array_record.python import array_record_module

from pathflip_jax import storage
from pathflip_jax.data import records
# The slide index and failure list have the names a tiling output gives them.
from pathflip_jax.data.patch_shards import (FAILURES_FILE, SLIDES_FILE, ShardWriter, local_file,
                                            read_jsonl, shard_files, write_jsonl)

SHARD_PATTERN = "features-*.array_record"
_SHARD_RE = re.compile(r"^features-g(\d{3})-(?:p(\d{3})-)?(\d{5})\.array_record$")
CONFIG_FILE = "features.json"
STATE_DIR = "_state"
# Columns of a patch-index row that describe the tiling output, not the slide; they are not
# copied into the feature index (which has its own shard/offset).
_POSITION_KEYS = ("status", "shard", "shard_offset", "num_patches", "reason", "error")


def shard_name(generation: int, index: int, part: int | None = None) -> str:
  """``features-g001-00003.array_record``; a writer of one part of a split job (``part``) puts
  ``p002-`` before the index, so parts written at once never collide."""
  tag = "" if part is None else f"p{part:03d}-"
  return f"features-g{generation:03d}-{tag}{index:05d}.array_record"


def list_shards(directory: str) -> list[str]:
  return shard_files(directory, SHARD_PATTERN, _SHARD_RE)


def _sidecar(directory: str, shard: str) -> str:
  return storage.join(directory, STATE_DIR, "shards", f"{shard}.jsonl")


def committed_rows(directory: str) -> dict[str, dict[str, Any]]:
  """slide_id -> index row, for every slide in a committed shard (a slide that two parts or
  runs both wrote counts once: the later shard by name)."""
  rows: dict[str, dict[str, Any]] = {}
  sidecars = set(storage.listdir(storage.join(directory, STATE_DIR, "shards")))
  for path in list_shards(directory):
    name = storage.basename(path)
    if f"{name}.jsonl" in sidecars:
      for row in read_jsonl(_sidecar(directory, name)):
        rows[row["slide_id"]] = row
  return rows


def _failures_dir(directory: str) -> str:
  return storage.join(directory, STATE_DIR, "failures")


class FeatureWriter:
  """Appends slide records to feature shards with commit-by-rename; resumable.

  Args:
    output_dir: the feature directory (created).
    identity: what the features are (encoder name, weights hash, feature_dim, source ...).
      Stored in ``features.json``; a directory holding features of another encoder is refused,
      because mixing encoders in one directory silently breaks every later stage.
    slides_per_shard, max_shard_bytes: a shard is committed when either is reached.
  """

  def __init__(self, output_dir: str, identity: Mapping[str, Any], slides_per_shard: int = 16,
               max_shard_bytes: int = 1 << 30, part: int | None = None):
    if slides_per_shard < 1:
      raise ValueError(f"slides_per_shard must be >= 1, got {slides_per_shard}")
    self.output_dir = output_dir
    self.slides_per_shard = slides_per_shard
    self.max_shard_bytes = max_shard_bytes
    self.part = part
    storage.makedirs(storage.join(output_dir, STATE_DIR, "shards"))
    self.identity = dict(identity)
    self._check_identity()
    self._clean_interrupted()
    self.done = committed_rows(output_dir)
    generations = [int(_SHARD_RE.match(storage.basename(p)).group(1))
                   for p in list_shards(output_dir)]
    self.generation = max(generations, default=-1) + 1
    self._shard_index = 0
    self._writer: ShardWriter | None = None
    self._rows: list[dict[str, Any]] = []
    self._bytes = 0
    self.failures: dict[str, dict[str, Any]] = {}
    self.written: list[str] = []

  def _check_identity(self) -> None:
    path = storage.join(self.output_dir, CONFIG_FILE)
    wanted = json.loads(json.dumps(self.identity))
    if storage.exists(path):
      existing = json.loads(storage.read_text(path))
      diff = {k: (existing.get(k), v) for k, v in wanted.items() if existing.get(k) != v}
      if diff:
        raise SystemExit(
            f"{self.output_dir} holds features of another encoder or source (existing, this "
            f"run): {diff}; use another --output_dir")
    else:
      storage.write_text(path, json.dumps(wanted, indent=1))

  def _clean_interrupted(self) -> None:
    """Removes a killed run's temporary shards (local only: an upload is whole or absent) and
    sidecars whose shard never arrived. Another part writing at the same moment may have a
    sidecar ahead of its shard: those of shards of other parts are left alone."""
    if not storage.is_url(self.output_dir):
      for tmp in glob.glob(os.path.join(self.output_dir, ".features-*.inprogress-*")):
        os.remove(tmp)
    shards = set(storage.listdir(self.output_dir))
    folder = storage.join(self.output_dir, STATE_DIR, "shards")
    for name in storage.listdir(folder):
      shard = name[:-len(".jsonl")]
      match = _SHARD_RE.match(shard)
      mine = match is not None and (match.group(2) is None if self.part is None
                                    else match.group(2) == f"{self.part:03d}")
      if mine and shard not in shards:
        storage.remove(storage.join(folder, name))

  def is_done(self, slide_id: str) -> bool:
    return slide_id in self.done

  def add(self, record: dict[str, Any], row: Mapping[str, Any] | None = None) -> None:
    """Writes one slide's record; ``row`` adds columns (labels, captions) to its index row."""
    slide_id = record["slide_id"]
    if slide_id in self.done:
      raise ValueError(f"slide {slide_id!r} is already in {self.output_dir}")
    record = {"schema_version": records.SCHEMA_VERSION, **record}
    records.check_features(record, where=f"slide {slide_id!r}")
    data = records.encode(record)
    if self._writer is None:
      name = shard_name(self.generation, self._shard_index, self.part)
      self._writer = ShardWriter(storage.join(self.output_dir, name))
    extra = {k: v for k, v in (row or {}).items() if k not in _POSITION_KEYS}
    index_row = {
        **extra,
        "slide_id": slide_id, "status": "ok",
        "shard": storage.basename(self._writer.path), "shard_offset": self._writer.count,
        "num_patches": int(record["features"].shape[0]),
        "feature_dim": int(record["features"].shape[1]),
        "mpp": record["mpp"], "patch_size_level0": record["patch_size_level0"],
        "encoder": record["encoder"],
    }
    self._writer.write(data)
    self._rows.append(index_row)
    self._bytes += len(data)
    self.failures.pop(slide_id, None)
    if len(self._rows) >= self.slides_per_shard or self._bytes >= self.max_shard_bytes:
      self.commit()

  def fail(self, slide_id: str, reason: str, error: str, **extra: Any) -> None:
    self.failures[slide_id] = {"slide_id": slide_id, "reason": reason, "error": error, **extra}

  def commit(self) -> None:
    """Commits the open shard: its rows go to the sidecar first, then the rename."""
    if self._writer is None:
      return
    shard = storage.basename(self._writer.path)
    write_jsonl(_sidecar(self.output_dir, shard), self._rows)
    self._writer.commit()
    for row in self._rows:
      self.done[row["slide_id"]] = row
    self.written.append(shard)
    self._writer, self._rows, self._bytes = None, [], 0
    self._shard_index += 1

  def close(self, slide_rows: Iterable[Mapping[str, Any]] = ()) -> tuple[list, list]:
    """Commits the open shard and rebuilds slides.jsonl / failures.jsonl.

    ``slide_rows`` are the rows of every slide this run was asked for (from the patch index or
    the import list): slides neither done nor failed are listed as "pending". The index holds
    every committed slide and the failures of every part (this writer's replace its earlier
    ones), so the parts of a split job each leave a complete index when they finish.
    """
    self.commit()
    self.done = committed_rows(self.output_dir)    # other parts' shards too
    part_file = storage.join(_failures_dir(self.output_dir),
                             f"{'main' if self.part is None else f'p{self.part:03d}'}.jsonl")
    write_jsonl(part_file, list(self.failures.values()))
    failures_by_slide: dict[str, dict[str, Any]] = {}
    for name in storage.listdir(_failures_dir(self.output_dir)):
      for row in read_jsonl(storage.join(_failures_dir(self.output_dir), name)):
        if row["slide_id"] not in self.done:
          failures_by_slide[row["slide_id"]] = row
    failures_by_slide.update({s: f for s, f in self.failures.items() if s not in self.done})
    self.failures = failures_by_slide
    rows, listed = [], set()
    for row in slide_rows:
      slide_id = row["slide_id"]
      listed.add(slide_id)
      extra = {k: v for k, v in row.items() if k not in _POSITION_KEYS}
      if slide_id in self.done:
        rows.append(self.done[slide_id])
      elif slide_id in self.failures:
        failure = self.failures[slide_id]
        rows.append({**extra, "slide_id": slide_id, "status": "failed",
                     "reason": failure["reason"], "error": failure["error"]})
      else:
        rows.append({**extra, "slide_id": slide_id, "status": "pending"})
    rows += [r for s, r in self.done.items() if s not in listed]
    rows += [{"slide_id": s, "status": "failed", "reason": f["reason"], "error": f["error"]}
             for s, f in self.failures.items() if s not in listed]
    failures = list(self.failures.values())
    write_jsonl(storage.join(self.output_dir, SLIDES_FILE), rows)
    write_jsonl(storage.join(self.output_dir, FAILURES_FILE), failures)
    return rows, failures


class FeatureShards:
  """Random access to the slide records of a feature directory (a grain data source).

  ``shards[i]`` is the i-th slide's record (``features`` float16 [N, D], ``coords`` [N, 2] ...);
  ``shards.get(slide_id)`` finds one by id; ``shards.rows`` are the index rows in the same order.
  """

  def __init__(self, directory: str):
    self.directory = directory
    if not storage.isdir(directory):
      raise FileNotFoundError(f"{directory}: no such feature directory")
    committed = committed_rows(directory)
    if not committed:
      raise FileNotFoundError(
          f"{directory}: no committed {SHARD_PATTERN} files (run data_prep.extract_features or "
          "data_prep.import_features)")
    self.rows = sorted(committed.values(), key=lambda r: (r["shard"], r["shard_offset"]))
    self._position = {r["slide_id"]: i for i, r in enumerate(self.rows)}
    self._readers: dict[str, Any] | None = None
    path = storage.join(directory, CONFIG_FILE)
    self.identity = json.loads(storage.read_text(path)) if storage.exists(path) else {}

  def __len__(self) -> int:
    return len(self.rows)

  def __repr__(self) -> str:
    return f"FeatureShards({self.directory!r}, slides={len(self)})"

  @property
  def slide_ids(self) -> list[str]:
    return [r["slide_id"] for r in self.rows]

  def _reader(self, shard: str):
    # Opened lazily, per process: grain pickles the source into its workers.
    if self._readers is None:
      self._readers = {}
    if shard not in self._readers:
      self._readers[shard] = array_record_module.ArrayRecordReader(
          local_file(storage.join(self.directory, shard)), "readahead_buffer_size:0")
    return self._readers[shard]

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < len(self):
      raise IndexError(f"slide index {index} out of range [0, {len(self)})")
    row = self.rows[int(index)]
    data = self._reader(row["shard"]).read([row["shard_offset"]])[0]
    where = f"{storage.join(self.directory, row['shard'])}[{row['shard_offset']}]"
    record = records.decode(data, where=where)
    records.check_features(record, where)
    if record["slide_id"] != row["slide_id"]:
      raise records.RecordError(f"{where}: holds slide {record['slide_id']!r}, the index says "
                                f"{row['slide_id']!r}")
    return record

  def get(self, slide_id: str) -> dict[str, Any]:
    if slide_id not in self._position:
      raise KeyError(f"{self.directory}: no features for slide {slide_id!r}")
    return self[self._position[slide_id]]

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_readers"] = None
    return state

  def close(self) -> None:
    for reader in (self._readers or {}).values():
      reader.close()
    self._readers = None


def weights_hash(arrays: Iterable[tuple[str, np.ndarray]]) -> str:
  """sha256 over (name, dtype, shape, bytes) of every array in name order: a fingerprint of
  encoder weights that does not depend on the file format they came in."""
  digest = hashlib.sha256()
  for name, array in sorted(arrays, key=lambda kv: kv[0]):
    array = np.ascontiguousarray(array)
    digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()
