"""Tissue detection on a low-resolution thumbnail, and tissue outlines as polygons.

Tissue is stained, background glass is not: pixels whose HSV saturation exceeds an Otsu threshold
(never below ``min_saturation``, so a blank slide stays blank) are tissue, after removing pen ink
(green/blue hues, near-black strokes) and cleaning the mask morphologically.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage
# The submodule, not skimage.measure: the package's lazy loader pulls in scipy.stats and more
# (seconds per worker process) for one function.
from skimage.measure._find_contours import find_contours


@dataclasses.dataclass(frozen=True)
class TissueParams:
  min_saturation: float = 0.07     # floor of the Otsu threshold on saturation
  pen_filter: bool = True          # drop green/blue/black pen ink
  smooth_px: int = 2               # radius of the opening/closing, thumbnail pixels
  min_object_px: int = 32          # tissue pieces smaller than this (thumbnail px) are dropped
  max_hole_px: int = 64            # holes smaller than this inside tissue are filled


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Hue (degrees), saturation and value in [0, 1] of an RGB uint8 image."""
  # Channel planes and pairwise maxima: reductions over a trailing axis of 3 are slow in numpy.
  r, g, b = (rgb[..., i].astype(np.float32) * (1 / 255) for i in range(3))
  vmax = np.maximum(np.maximum(r, g), b)
  chroma = vmax - np.minimum(np.minimum(r, g), b)
  saturation = chroma / np.maximum(vmax, 1e-6)
  safe = np.maximum(chroma, 1e-6)
  hue = np.where(vmax == r, ((g - b) / safe) % 6.0,
                 np.where(vmax == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0)) * 60.0
  hue[chroma == 0] = 0.0
  return hue, saturation, vmax


def pen_mask(rgb: np.ndarray, hsv=None) -> np.ndarray:
  """Pixels of marker ink: saturated green-to-blue hues (H&E is pink to violet) or near black.

  Blue stops at hue 235 and needs saturation above 0.4: haematoxylin is blue-violet (hue ~235-
  300), and dense nuclei (a lymph node, sheets of tumour) blur on a thumbnail into a saturated
  blue-violet that a bound of 250 took for ink, dropping up to a whole slide's tissue. Marker
  blue has little red (hue ~200-235) and is strongly saturated."""
  hue, saturation, value = _hsv(rgb) if hsv is None else hsv
  green_ink = (hue > 70) & (hue < 200) & (saturation > 0.25)
  blue_ink = (hue >= 200) & (hue < 235) & (saturation > 0.4)
  black_ink = value < 0.16
  return green_ink | blue_ink | black_ink


def _disk(radius: int) -> np.ndarray:
  yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
  return xx * xx + yy * yy <= radius * radius


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
  """The threshold that maximises the between-class variance of ``values``' histogram."""
  counts, edges = np.histogram(values, bins=bins)
  centres = (edges[:-1] + edges[1:]) / 2
  weight_low = np.cumsum(counts).astype(np.float64)
  weight_high = weight_low[-1] - weight_low
  sum_low = np.cumsum(counts * centres)
  mean_low = sum_low / np.maximum(weight_low, 1)
  mean_high = (sum_low[-1] - sum_low) / np.maximum(weight_high, 1)
  between = weight_low * weight_high * (mean_low - mean_high) ** 2
  return float(centres[int(np.argmax(between[:-1]))])


def simplify_polyline(points: np.ndarray, tolerance: float) -> np.ndarray:
  """Douglas-Peucker simplification: drops points closer than ``tolerance`` to the chord."""
  if len(points) < 3:
    return points
  keep = np.zeros(len(points), bool)
  keep[[0, -1]] = True
  stack = [(0, len(points) - 1)]
  while stack:
    lo, hi = stack.pop()
    if hi - lo < 2:
      continue
    chord = points[hi] - points[lo]
    rel = points[lo + 1:hi] - points[lo]
    length = np.hypot(*chord)
    if length == 0:
      dist = np.hypot(rel[:, 0], rel[:, 1])
    else:
      dist = np.abs(chord[0] * rel[:, 1] - chord[1] * rel[:, 0]) / length
    worst = int(np.argmax(dist))
    if dist[worst] > tolerance:
      mid = lo + 1 + worst
      keep[mid] = True
      stack += [(lo, mid), (mid, hi)]
  return points[keep]


def tissue_mask(rgb: np.ndarray, params: TissueParams = TissueParams()) -> np.ndarray:
  """Boolean tissue mask of an RGB thumbnail."""
  hsv = _hsv(rgb)
  saturation = ndimage.gaussian_filter(hsv[1], sigma=1.0)
  threshold = params.min_saturation
  if np.ptp(saturation) > 1e-3:
    threshold = max(threshold, otsu_threshold(saturation))
  mask = saturation > threshold
  if params.pen_filter:
    ink = pen_mask(rgb, hsv)
    # Ink is removed with a margin: its blurred border is often saturated enough to pass.
    mask &= ~ndimage.binary_dilation(ink, iterations=2)
  if params.smooth_px > 0:
    structure = _disk(params.smooth_px)
    mask = ndimage.binary_opening(mask, structure=structure)
    mask = ndimage.binary_closing(mask, structure=structure, border_value=0)
  labels, count = ndimage.label(mask)
  if count:
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
    mask = np.isin(labels, np.flatnonzero(sizes >= params.min_object_px) + 1)
  holes = ndimage.binary_fill_holes(mask) & ~mask
  hole_labels, hole_count = ndimage.label(holes)
  if hole_count:
    sizes = ndimage.sum_labels(holes, hole_labels, index=np.arange(1, hole_count + 1))
    mask |= np.isin(hole_labels, np.flatnonzero(sizes < params.max_hole_px) + 1)
  return mask


def box_fractions(mask: np.ndarray, x0: np.ndarray, y0: np.ndarray, x1: np.ndarray,
                  y1: np.ndarray) -> np.ndarray:
  """Fraction of True pixels of ``mask`` in each box [x0, x1) x [y0, y1) (mask pixel units,
  fractional edges rounded, every box at least one pixel)."""
  h, w = mask.shape
  integral = np.zeros((h + 1, w + 1), np.int64)
  integral[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
  xa = np.clip(np.floor(x0).astype(np.int64), 0, w - 1)
  ya = np.clip(np.floor(y0).astype(np.int64), 0, h - 1)
  xb = np.clip(np.maximum(np.round(x1).astype(np.int64), xa + 1), 1, w)
  yb = np.clip(np.maximum(np.round(y1).astype(np.int64), ya + 1), 1, h)
  total = integral[yb, xb] - integral[ya, xb] - integral[yb, xa] + integral[ya, xa]
  return total / ((xb - xa) * (yb - ya))


def tissue_polygons(mask: np.ndarray, scale_x: float, scale_y: float,
                    tolerance_px: float = 1.0) -> list[list[np.ndarray]]:
  """Outlines of the mask's connected pieces as polygons in the scaled frame.

  Returns one entry per piece: ``[outer_ring, hole_ring, ...]``, each ring an (n, 2) array of
  (x, y) points multiplied by (scale_x, scale_y), e.g. thumbnail pixels to level-0 pixels.
  """
  polygons = []
  labels, count = ndimage.label(mask)
  for index, piece_slice in enumerate(ndimage.find_objects(labels), start=1):
    if piece_slice is None:
      continue
    piece = labels[piece_slice] == index
    filled = ndimage.binary_fill_holes(piece)
    offset = np.array([piece_slice[0].start, piece_slice[1].start], np.float64)
    outer = _longest_contour(filled)
    if outer is None:
      continue
    rings = [_to_ring(outer, offset, scale_x, scale_y, tolerance_px)]
    hole_labels, hole_count = ndimage.label(filled & ~piece)
    for hole_index in range(1, hole_count + 1):
      contour = _longest_contour(hole_labels == hole_index)
      if contour is not None:
        rings.append(_to_ring(contour, offset, scale_x, scale_y, tolerance_px))
    polygons.append([r for r in rings if len(r) >= 4])
  return [p for p in polygons if p]


def _longest_contour(binary: np.ndarray) -> np.ndarray | None:
  padded = np.pad(binary.astype(np.float32), 1)
  contours = find_contours(padded, 0.5)
  if not contours:
    return None
  return max(contours, key=len) - 1.0  # undo the padding


def _to_ring(contour_rc: np.ndarray, offset_rc: np.ndarray, scale_x: float, scale_y: float,
             tolerance_px: float) -> np.ndarray:
  simplified = simplify_polyline(contour_rc, tolerance_px)
  # Contours run through pixel centres of the mask; +0.5 maps them to pixel-edge coordinates.
  rows = (simplified[:, 0] + offset_rc[0] + 0.5) * scale_y
  cols = (simplified[:, 1] + offset_rc[1] + 0.5) * scale_x
  return np.stack([cols, rows], axis=1)
