"""Procedural H&E-like tissue textures at a physical scale, for the demo cohort.

Pixels are built in optical-density space: each texture renders a haematoxylin and an eosin
concentration map, and ``to_rgb`` applies the Beer-Lambert law with per-slide stain vectors, so
stain variation between slides changes colours the way real staining does. Sizes are given in µm
and converted with the slide's mpp, so a 40x slide shows the same structures at twice the pixels.

Tissue types differ by structure, not by flat colour: their mean colours overlap (tumour and
lymphocytes are both nucleus-dense, stroma and necrosis both eosinophilic, fat and glands both
pale), so recognising them takes texture.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image
from scipy import ndimage

BACKGROUND, STROMA, TUMOUR, GLANDS, LYMPHOCYTES, NECROSIS, FAT = range(7)
TISSUE_NAMES = {STROMA: "stroma", TUMOUR: "tumour", GLANDS: "benign glands",
                LYMPHOCYTES: "lymphocytes", NECROSIS: "necrosis", FAT: "fat"}
# Slide-level diagnoses of the demo cohort, defined by which of these types appear.
DIAGNOSES = ("benign", "carcinoma", "carcinoma with necrosis", "lymph node metastasis")
# QuPath-like display colours of the tissue classes (masks, GeoJSON, contact sheets).
TISSUE_COLORS = {STROMA: (230, 140, 190), TUMOUR: (200, 0, 0), GLANDS: (0, 150, 80),
                 LYMPHOCYTES: (60, 60, 200), NECROSIS: (160, 120, 0), FAT: (250, 210, 80)}

_H_STAIN = np.array([0.65, 0.70, 0.29])   # haematoxylin optical density per unit (R, G, B)
_E_STAIN = np.array([0.07, 0.99, 0.11])   # eosin


@dataclasses.dataclass(frozen=True)
class Stain:
  """One slide's staining: unit OD vectors and strengths."""

  h_vector: np.ndarray
  e_vector: np.ndarray
  h_strength: float
  e_strength: float

  @staticmethod
  def random(rng: np.random.Generator) -> "Stain":
    def jitter(vector):
      v = np.clip(vector + rng.normal(0, 0.08, 3), 0.02, None)
      return v / np.linalg.norm(v)
    # Wide on purpose: lab-to-lab staining differs a lot, and colour alone must not identify
    # a tissue type.
    return Stain(jitter(_H_STAIN), jitter(_E_STAIN), float(rng.uniform(0.55, 1.6)),
                 float(rng.uniform(0.55, 1.6)))


def to_rgb(h: np.ndarray, e: np.ndarray, stain: Stain) -> np.ndarray:
  """Concentration maps -> RGB uint8 (Beer-Lambert with the slide's stain vectors)."""
  out = np.empty(h.shape + (3,), np.uint8)
  hv = (stain.h_strength * stain.h_vector).astype(np.float32)
  ev = (stain.e_strength * stain.e_vector).astype(np.float32)
  for c in range(3):  # channel planes: arithmetic over a trailing axis of 3 is slow in numpy
    od = h * hv[c]
    od += e * ev[c]
    np.negative(od, out=od)
    np.exp(od, out=od)
    od *= 255.0
    od -= 8.0
    np.clip(od, 0, 255, out=od)
    out[..., c] = od
  return out


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale_px: float,
                 anisotropy: float = 1.0, angle: float = 0.0) -> np.ndarray:
  """Zero-mean, unit-std noise with features about ``scale_px`` wide (optionally stretched
  ``anisotropy`` times along ``angle``), made on a coarse grid and zoomed for speed."""
  h, w = shape
  factor = max(1.0, scale_px / 3.0)
  ch, cw = max(2, int(h / factor) + 3), max(2, int(w / factor) + 3)
  coarse = rng.normal(0, 1, (ch, cw)).astype(np.float32)
  if anisotropy != 1.0:
    sigma_along = 1.0 * anisotropy
    coarse = ndimage.gaussian_filter(coarse, sigma=1.0)
    coarse = ndimage.rotate(coarse, np.degrees(angle), reshape=False, mode="wrap", order=1)
    coarse = ndimage.gaussian_filter1d(coarse, sigma_along, axis=1, mode="wrap")
    coarse = ndimage.rotate(coarse, -np.degrees(angle), reshape=False, mode="wrap", order=1)
  else:
    coarse = ndimage.gaussian_filter(coarse, sigma=1.0)
  # Normalised on the coarse grid: full-size reductions cost more than the zoom itself.
  coarse = (coarse - coarse.mean()) / (coarse.std() + 1e-6)
  # Bilinear zoom through PIL ('F' mode): several times faster than ndimage.zoom here.
  scale_y, scale_x = (ch - 2) / h, (cw - 2) / w
  zoomed = Image.fromarray(np.ascontiguousarray(coarse, np.float32), mode="F").resize(
      (w, h), Image.Resampling.BILINEAR, box=(0, 0, w * scale_x, h * scale_y))
  return np.asarray(zoomed)


def _stamp(target: np.ndarray, rng: np.random.Generator, centres: np.ndarray, radius_px,
           value, elongation: float = 1.0, angles: np.ndarray | None = None,
           n_shapes: int = 12, jitter: float = 0.25) -> None:
  """Draws filled ellipses (nuclei) at ``centres`` into ``target`` (max with ``value``).

  A bank of ``n_shapes`` random shapes around ``radius_px`` is drawn once and each centre takes
  one, so thousands of nuclei cost a few vectorised assignments.
  """
  if len(centres) == 0:
    return
  h, w = target.shape
  shape_of = rng.integers(0, n_shapes, len(centres))
  for shape in range(n_shapes):
    members = centres[shape_of == shape]
    if not len(members):
      continue
    r = float(radius_px) * rng.uniform(1 - jitter, 1 + jitter)
    ry, rx = r / np.sqrt(elongation), r * np.sqrt(elongation)
    angle = rng.uniform(0, np.pi) if angles is None else float(angles[shape % len(angles)])
    extent = int(np.ceil(max(ry, rx))) + 1
    yy, xx = np.mgrid[-extent:extent + 1, -extent:extent + 1]
    ca, sa = np.cos(angle), np.sin(angle)
    u, v = xx * ca + yy * sa, -xx * sa + yy * ca
    # Irregular outline: a radius that wobbles with the angle.
    theta = np.arctan2(v, u)
    wobble = 1 + jitter * 0.5 * np.sin(3 * theta + rng.uniform(0, 6.3))
    inside = (u / rx) ** 2 + (v / ry) ** 2 <= wobble ** 2
    dy, dx = np.nonzero(inside)
    dy, dx = dy - extent, dx - extent
    ys = members[:, 0, None] + dy[None, :]
    xs = members[:, 1, None] + dx[None, :]
    ok = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    vals = value if np.isscalar(value) else value[shape_of == shape][:, None]
    vals = np.broadcast_to(vals, ys.shape)
    target[ys[ok], xs[ok]] = np.maximum(target[ys[ok], xs[ok]], vals[ok])


def _points(rng: np.random.Generator, shape: tuple[int, int], per_px2: float,
            where: np.ndarray | None = None) -> np.ndarray:
  h, w = shape
  count = rng.poisson(per_px2 * h * w)
  pts = np.stack([rng.integers(0, h, count), rng.integers(0, w, count)], axis=1)
  if where is not None and len(pts):
    pts = pts[where[pts[:, 0], pts[:, 1]]]
  return pts


def render(tissue: int, shape: tuple[int, int], mpp: float,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Haematoxylin and eosin concentration maps of one tissue type over ``shape`` pixels."""
  um = 1.0 / mpp  # pixels per micron
  h = np.zeros(shape, np.float32)
  e = np.zeros(shape, np.float32)
  area_um2 = um * um
  if tissue == STROMA:
    angle = rng.uniform(0, np.pi)
    fibres = smooth_noise(rng, shape, 3 * um, anisotropy=8.0, angle=angle)
    waves = smooth_noise(rng, shape, 40 * um)
    e[:] = 0.55 + 0.28 * np.tanh(1.2 * fibres) + 0.08 * waves
    e[fibres < -0.9] *= 0.35                                      # clefts between fibres
    h[:] = 0.05
    nuclei = _points(rng, shape, 1 / 900 / area_um2)
    _stamp(h, rng, nuclei, 2.2 * um, 1.3, elongation=5.0,
           angles=np.array([angle + rng.normal(0, 0.15) for _ in range(12)]))
  elif tissue == TUMOUR:
    nests = smooth_noise(rng, shape, 150 * um) > -1.3
    e[:] = np.where(nests, 0.36, 0.55) + 0.05 * smooth_noise(rng, shape, 8 * um)
    h[:] = np.where(nests, 0.16, 0.04)
    nuclei = _points(rng, shape, 1 / 110 / area_um2, where=nests)
    _stamp(h, rng, nuclei, 5.5 * um, rng.uniform(1.0, 1.6, len(nuclei)).astype(np.float32),
           elongation=1.4, jitter=0.45, n_shapes=24)
    nucleoli = nuclei[rng.random(len(nuclei)) < 0.4]
    _stamp(h, rng, nucleoli + rng.integers(-2, 3, nucleoli.shape), 1.2 * um, 2.2)
  elif tissue == GLANDS:
    e[:] = 0.5 + 0.15 * smooth_noise(rng, shape, 20 * um)
    h[:] = 0.05
    spacing = 110 * um
    ys, xs = np.mgrid[spacing / 2:shape[0]:spacing, spacing / 2:shape[1]:spacing]
    centres = np.stack([ys.ravel(), xs.ravel()], 1) + rng.normal(0, spacing * 0.15,
                                                                 (ys.size, 2))
    lumen_r = rng.uniform(16, 30, len(centres)) * um
    wall = 12 * um
    yy, xx = np.ogrid[:shape[0], :shape[1]]
    ring_nuclei = []
    for (cy, cx), r in zip(centres, lumen_r):
      y0, y1 = int(max(cy - r - wall - 2, 0)), int(min(cy + r + wall + 3, shape[0]))
      x0, x1 = int(max(cx - r - wall - 2, 0)), int(min(cx + r + wall + 3, shape[1]))
      if y1 <= y0 or x1 <= x0:
        continue
      d = np.hypot(yy[y0:y1] - cy, xx[:, x0:x1] - cx)
      ring = (d >= r) & (d < r + wall)
      e[y0:y1, x0:x1][ring] = 0.32
      lumen = d < r
      e[y0:y1, x0:x1][lumen] = 0.03
      h[y0:y1, x0:x1][lumen] = 0.0
      count = int(2 * np.pi * (r + 0.75 * wall) / (7 * um))
      theta = np.linspace(0, 2 * np.pi, count, endpoint=False) + rng.uniform(0, 1)
      rr = r + 0.72 * wall
      ring_nuclei.append(np.stack([cy + rr * np.sin(theta), cx + rr * np.cos(theta)], 1))
    if ring_nuclei:
      points = np.concatenate(ring_nuclei).round().astype(np.int64)
      _stamp(h, rng, points, 2.8 * um, 1.0, elongation=1.6)
  elif tissue == LYMPHOCYTES:
    e[:] = 0.28 + 0.04 * smooth_noise(rng, shape, 15 * um)
    h[:] = 0.06
    nuclei = _points(rng, shape, 1 / 75 / area_um2)
    _stamp(h, rng, nuclei, 3.3 * um, 1.5, elongation=1.05, jitter=0.1)
  elif tissue == NECROSIS:
    mottle = smooth_noise(rng, shape, 10 * um)
    e[:] = 0.58 + 0.1 * mottle + 0.06 * smooth_noise(rng, shape, 60 * um)
    h[:] = 0.12 + 0.05 * smooth_noise(rng, shape, 4 * um)
    fragments = _points(rng, shape, 1 / 110 / area_um2)
    _stamp(h, rng, fragments, 1.1 * um, 1.3, jitter=0.5)
    ghosts = _points(rng, shape, 1 / 400 / area_um2)
    _stamp(e, rng, ghosts, 5 * um, 0.75, jitter=0.3)
  elif tissue == FAT:
    cell = 55 * um
    coarse = 4
    small = (max(2, shape[0] // coarse + 1), max(2, shape[1] // coarse + 1))
    seeds = np.zeros(small, bool)
    count = max(1, int(small[0] * small[1] * (coarse / cell) ** 2 * 1.3))
    seeds[rng.integers(0, small[0], count), rng.integers(0, small[1], count)] = True
    _, (iy, ix) = ndimage.distance_transform_edt(~seeds, return_indices=True)
    cell_id = iy * small[1] + ix
    edges = (np.diff(cell_id, axis=0, prepend=cell_id[:1]) != 0) | \
        (np.diff(cell_id, axis=1, prepend=cell_id[:, :1]) != 0)
    edges = np.repeat(np.repeat(edges, coarse, 0), coarse, 1)[:shape[0], :shape[1]]
    edges = ndimage.binary_dilation(edges, iterations=max(1, int(0.6 * um)))
    e[:] = np.where(edges, 0.6, 0.02)
    h[:] = 0.0
    nuclei = _points(rng, shape, 1 / 4000 / area_um2, where=edges)
    _stamp(h, rng, nuclei, 2.0 * um, 1.1, elongation=3.0)
  else:
    raise ValueError(f"unknown tissue type {tissue}")
  return h, e
