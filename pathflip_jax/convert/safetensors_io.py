"""Reading and writing ``.safetensors`` files with numpy alone (no safetensors package).

The format (https://huggingface.co/docs/safetensors): an 8-byte little-endian unsigned header
length N, N bytes of JSON mapping tensor names to ``{"dtype", "shape", "data_offsets": [begin,
end]}`` (offsets relative to the end of the header) plus an optional ``"__metadata__"`` map of
strings, then the raw little-endian, C-ordered tensor bytes.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Mapping

import numpy as np

# numpy has no bfloat16: BF16 is read as uint16 and widened to float32 (see _bf16_to_f32).
_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_CODES = {np.dtype(v).newbyteorder("="): k for k, v in _DTYPES.items() if k != "BF16"}
# Headers of real checkpoints are a few hundred kB; anything far larger is a corrupt length.
_MAX_HEADER = 100 * 2**20


class SafetensorsError(ValueError):
  """A malformed or unsupported .safetensors file; the message names the file (and tensor)."""


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
  # bfloat16 is the top half of a float32: shifting the bits up is exact.
  return (raw.astype(np.uint32) << 16).view(np.float32)


def read_header(path: str) -> tuple[dict[str, dict], dict[str, str], int]:
  """(tensor entries, metadata, byte offset of the data section) of a .safetensors file."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    prefix = f.read(8)
    if len(prefix) < 8:
      raise SafetensorsError(f"{path}: {size} bytes is too short for a safetensors file")
    (n,) = struct.unpack("<Q", prefix)
    if n > min(size - 8, _MAX_HEADER):
      raise SafetensorsError(
          f"{path}: header length {n} does not fit in the file ({size} bytes); not a "
          "safetensors file or truncated")
    try:
      header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from None
  if not isinstance(header, dict):
    raise SafetensorsError(f"{path}: header is not a JSON object")
  metadata = header.pop("__metadata__", None) or {}
  return header, metadata, 8 + n


def _check_entry(path: str, name: str, entry, data_len: int) -> tuple[np.dtype, tuple, int, int]:
  try:
    code, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
  except (KeyError, TypeError, ValueError):
    raise SafetensorsError(f"{path}: tensor {name!r} has a malformed header entry {entry!r}") \
        from None
  if code not in _DTYPES:
    raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {code} "
                           f"(supported: {', '.join(_DTYPES)})")
  if not all(isinstance(d, int) and d >= 0 for d in shape):
    raise SafetensorsError(f"{path}: tensor {name!r} has an invalid shape {list(shape)}")
  if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_len):
    raise SafetensorsError(
        f"{path}: tensor {name!r} has data_offsets [{begin}, {end}] outside the data section "
        f"of {data_len} bytes (file truncated?)")
  dtype = _DTYPES[code]
  if end - begin != math.prod(shape) * dtype.itemsize:
    raise SafetensorsError(
        f"{path}: tensor {name!r} ({code} {list(shape)}) needs "
        f"{math.prod(shape) * dtype.itemsize} bytes but data_offsets span {end - begin}")
  return dtype, shape, begin, end


def load_file(path: str) -> dict[str, np.ndarray]:
  """All tensors of a .safetensors file as numpy arrays (BF16 widened to float32)."""
  header, _, data_start = read_header(path)
  data_len = os.path.getsize(path) - data_start
  entries = {name: _check_entry(path, name, entry, data_len) for name, entry in header.items()}
  out = {}
  # One memory map, one copy per tensor: the file is never held twice in memory.
  mapped = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(data_len,)) \
      if data_len else np.zeros((0,), np.uint8)
  try:
    for name, (dtype, shape, begin, end) in entries.items():
      array = np.frombuffer(mapped[begin:end], dtype=dtype).reshape(shape)
      if header[name]["dtype"] == "BF16":
        array = _bf16_to_f32(array)
      out[name] = array.astype(array.dtype.newbyteorder("="), copy=True)
  finally:
    del mapped
  return out


def save_file(tensors: Mapping[str, np.ndarray], path: str,
              metadata: Mapping[str, str] | None = None) -> None:
  """Writes numpy arrays as a .safetensors file (readable by the safetensors package)."""
  header: dict = {}
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  arrays, offset = [], 0
  for name in sorted(tensors):
    array = np.ascontiguousarray(tensors[name])
    code = _CODES.get(array.dtype.newbyteorder("="))
    if code is None:
      raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {array.dtype}")
    data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    header[name] = {"dtype": code, "shape": list(array.shape),
                    "data_offsets": [offset, offset + len(data)]}
    arrays.append(data)
    offset += len(data)
  blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
  blob += b" " * (-len(blob) % 8)  # the spec allows space padding; aligns the data section
  tmp = f"{path}.tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for data in arrays:
      f.write(data)
  os.replace(tmp, path)
