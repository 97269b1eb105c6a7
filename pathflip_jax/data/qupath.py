"""QuPath-compatible GeoJSON: FeatureCollections of annotations and detections in level-0 pixels.

QuPath imports a GeoJSON FeatureCollection whose features carry ``properties.objectType``
("annotation" or "detection"), an optional ``classification`` {name, color} and ``measurements``
(a flat name -> number map, shown in QuPath's measurement table).
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Iterable, Mapping, Sequence

Ring = Sequence[tuple[float, float]]


def _closed(ring: Ring) -> list[list[float]]:
  points = [[round(float(x), 2), round(float(y), 2)] for x, y in ring]
  if points and points[0] != points[-1]:
    points.append(points[0])
  return points


def polygon_feature(rings: Sequence[Ring], *, object_type: str = "annotation",
                    name: str | None = None, color: tuple[int, int, int] | None = None,
                    measurements: Mapping[str, float] | None = None) -> dict:
  """One feature whose geometry is a polygon: ``rings[0]`` is the outline, the rest are holes."""
  if object_type not in ("annotation", "detection"):
    raise ValueError(f"object_type must be 'annotation' or 'detection', got {object_type!r}")
  if not rings or len(rings[0]) < 3:
    raise ValueError("a polygon needs an outer ring of at least 3 points")
  properties: dict = {"objectType": object_type}
  if name is not None:
    properties["classification"] = {"name": name, "color": list(color or (255, 0, 0))}
  if measurements:
    properties["measurements"] = {k: float(v) for k, v in measurements.items()}
  return {
      "type": "Feature",
      "id": str(uuid.uuid4()),
      "geometry": {"type": "Polygon", "coordinates": [_closed(r) for r in rings]},
      "properties": properties,
  }


def feature_collection(features: Iterable[dict]) -> dict:
  return {"type": "FeatureCollection", "features": list(features)}


def write_geojson(path: str | os.PathLike, collection: dict) -> None:
  """Writes a FeatureCollection atomically (temporary name, then rename)."""
  tmp = f"{path}.partial"
  with open(tmp, "w") as f:
    json.dump(collection, f)
  os.replace(tmp, path)
