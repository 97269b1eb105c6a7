"""Record schemas shared by every stage: msgpack maps in ArrayRecord files.

A record is a msgpack map. numpy arrays are stored as ``{"__nd__": True, "dtype", "shape", "data"}``
so that any reader (this project's, or a user's own) can rebuild them without pickle. Every record
carries ``schema_version``; readers refuse records of a newer major schema than they understand.

Schemas are declared once here, as field -> type tables, and checked on encode and decode, so that a
malformed record fails with an error that names the field.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import msgpack
import numpy as np

SCHEMA_VERSION = 1


class RecordError(ValueError):
  """A record does not match its schema (the message names the field)."""


@dataclasses.dataclass(frozen=True)
class Schema:
  """A named record layout: required and optional fields with their Python types."""

  name: str
  required: Mapping[str, type | tuple[type, ...]]
  optional: Mapping[str, type | tuple[type, ...]] = dataclasses.field(default_factory=dict)

  def check(self, record: Mapping[str, Any], where: str = "") -> None:
    prefix = f"{where}: " if where else ""
    for name, kind in self.required.items():
      if name not in record:
        raise RecordError(f"{prefix}{self.name} record is missing field {name!r}")
      _check_type(self.name, name, record[name], kind, prefix)
    for name, kind in self.optional.items():
      if name in record and record[name] is not None:
        _check_type(self.name, name, record[name], kind, prefix)
    version = record.get("schema_version")
    if isinstance(version, int) and version > SCHEMA_VERSION:
      raise RecordError(
          f"{prefix}{self.name} record has schema_version {version}, newer than this code "
          f"understands ({SCHEMA_VERSION}); update pathflip_jax")


def _check_type(schema: str, name: str, value: Any, kind, prefix: str) -> None:
  # bool is an int subclass; a coordinate that is True is a bug upstream, not a 1.
  if isinstance(value, bool) and kind in (int, float, (int, float)):
    raise RecordError(f"{prefix}{schema} field {name!r} must be {kind}, got bool")
  if not isinstance(value, kind):
    raise RecordError(
        f"{prefix}{schema} field {name!r} must be {_type_name(kind)}, got {type(value).__name__}")


def _type_name(kind) -> str:
  if isinstance(kind, tuple):
    return " or ".join(k.__name__ for k in kind)
  return kind.__name__


# One tissue patch, as written by data_prep/tile_slides.py into patches-*.array_record.
PATCH = Schema(
    name="patch",
    required={
        "schema_version": int,
        "slide_id": str,
        "x": int,                    # level-0 pixel column of the patch's top-left corner
        "y": int,                    # level-0 pixel row of the patch's top-left corner
        "col": int,                  # column of the patch on the slide's tiling grid
        "row": int,                  # row of the patch on the slide's tiling grid
        "patch_size": int,           # side of the stored image in pixels (at patch_mpp)
        "patch_size_level0": int,    # side of the patch footprint in level-0 pixels (rounded)
        "mpp": float,                # level-0 µm per pixel of the slide
        "patch_mpp": float,          # µm per pixel of the stored image
        "jpeg": bytes,               # baseline JPEG, RGB
    },
    optional={
        "tissue_fraction": float,
    },
)


# One slide's frozen patch features, as written by data_prep/extract_features.py and
# data_prep/import_features.py into features-*.array_record.
FEATURES = Schema(
    name="features",
    required={
        "schema_version": int,
        "slide_id": str,
        "features": np.ndarray,      # [N, D] float16, one row per patch
        "coords": np.ndarray,        # [N, 2] int64, level-0 (x, y) of each patch's top-left corner
        "patch_size_level0": int,    # side of every patch footprint in level-0 pixels
        "mpp": float,                # level-0 µm per pixel of the slide
        "encoder": str,              # encoder name (e.g. "vit_base_patch16", "conch_v1 (trident)")
        "weights_hash": str,         # sha256 of the encoder weights ("" when unknown: imports)
        "source": str,               # "extract_features", "trident", "clam" or "slidechat"
    },
    optional={
        "patch_size": int,           # pixels of the patch images the encoder saw
        "patch_mpp": float,          # µm per pixel of those images
        "mpp_source": str,           # where mpp came from: patches, metadata, manifest, flag, ...
        "magnification": float,      # objective magnification of the patches, where known
        "source_path": str,          # the imported file
        "coords_source": str,        # "patches" (tiling), "h5", "patch_name" or "placeholder_grid"
    },
)


def check_features(record: Mapping[str, Any], where: str = "") -> None:
  """FEATURES schema plus the array shapes and dtypes it implies."""
  FEATURES.check(record, where)
  prefix = f"{where}: " if where else ""
  features, coords = record["features"], record["coords"]
  if features.ndim != 2 or features.dtype != np.float16:
    raise RecordError(f"{prefix}features field 'features' must be float16 [N, D], got "
                      f"{features.dtype} {list(features.shape)}")
  if coords.ndim != 2 or coords.shape[1] != 2 or coords.shape[0] != features.shape[0]:
    raise RecordError(f"{prefix}features field 'coords' must be [N, 2] with N = "
                      f"{features.shape[0]} (rows of 'features'), got {list(coords.shape)}")
  if not np.issubdtype(coords.dtype, np.integer):
    raise RecordError(f"{prefix}features field 'coords' must be integers, got {coords.dtype}")


def encode(record: Mapping[str, Any], schema: Schema | None = None) -> bytes:
  """Serialises a record (a flat or nested map) to msgpack bytes, checking ``schema`` first."""
  if schema is not None:
    schema.check(record)
  return msgpack.packb(record, default=_pack_default, use_bin_type=True)


def decode(data: bytes, schema: Schema | None = None, where: str = "") -> dict[str, Any]:
  """Parses msgpack bytes written by :func:`encode`; numpy arrays come back as arrays."""
  try:
    record = msgpack.unpackb(data, object_hook=_unpack_hook, raw=False, strict_map_key=False)
  except (msgpack.UnpackException, ValueError, TypeError) as e:
    raise RecordError(f"{where}: not a valid msgpack record ({e})") from e
  if not isinstance(record, dict):
    raise RecordError(f"{where}: record is a {type(record).__name__}, expected a map")
  if schema is not None:
    schema.check(record, where)
  return record


def _pack_default(obj: Any) -> Any:
  if isinstance(obj, np.ndarray):
    array = np.ascontiguousarray(obj)
    return {"__nd__": True, "dtype": array.dtype.str, "shape": list(array.shape),
            "data": array.tobytes()}
  if isinstance(obj, np.generic):
    return obj.item()
  raise TypeError(f"cannot encode {type(obj).__name__} in a record")


def _unpack_hook(obj: dict) -> Any:
  if obj.get("__nd__") is True:
    return np.frombuffer(obj["data"], dtype=np.dtype(obj["dtype"])).reshape(obj["shape"])
  return obj
