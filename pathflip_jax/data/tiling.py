"""Cutting a slide into tissue patches: the plan (level, grid, tissue cells) and the reads.

The tiling job (data_prep/tile_slides.py) runs :func:`plan_slide` once per slide and
:func:`read_batch` once per batch of patches, possibly on different workers; inference on a new
slide runs both in-process.

Geometry. Patches form a grid on level 0 with step ``step_level0 = patch_size * patch_mpp / mpp``.
When a native level's mpp is within ``mpp_tolerance`` of the target, that level is read as is
(``patch_mpp`` is the level's own mpp, no resampling); otherwise the finest level that is finer
than the target is read and area-averaged to the target mpp. Only whole patches inside the slide
are cut. Coordinates are level-0 pixels of the patch's top-left corner.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any

import imagecodecs
import numpy as np
import tifffile
from PIL import Image, ImageDraw

from pathflip_jax.data import qupath, records, slides, tissue

# APP14 "Adobe" segment with transform 0: tells JPEG decoders that the components are RGB, not
# YCbCr. Aperio and other scanners store RGB-coded JPEG tiles and say so only in the TIFF tags.
_ADOBE_RGB_MARKER = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"
_TIFF_JPEG = 7
_TIFF_RGB = 2


@dataclasses.dataclass(frozen=True)
class TilingParams:
  """What to cut. Defaults follow the paper: 256-px patches at 0.5 µm/px ("20x")."""

  target_mpp: float = 0.5
  patch_size: int = 256
  min_tissue_fraction: float = 0.25   # share of a patch's footprint that must be tissue
  mpp_tolerance: float = 0.1          # relative; a native level this close is used as is
  jpeg_quality: int = 90
  batch_patches: int = 256            # patches per unit of work
  block_patches: int = 16             # side, in patches, of the square read as one region
  passthrough: bool = True            # copy native JPEG tiles when the grid coincides
  thumbnail_side: int = 1024
  mask_px_per_patch: int = 16         # tissue-mask resolution: mask pixels along a patch side
  tissue: tissue.TissueParams = tissue.TissueParams()

  def validate(self) -> None:
    if not self.target_mpp > 0:
      raise ValueError(f"target_mpp must be > 0, got {self.target_mpp}")
    if self.patch_size < 16:
      raise ValueError(f"patch_size must be >= 16, got {self.patch_size}")
    if not 0 <= self.min_tissue_fraction <= 1:
      raise ValueError(f"min_tissue_fraction must be in [0, 1], got {self.min_tissue_fraction}")
    if not 1 <= self.jpeg_quality <= 100:
      raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
    if self.batch_patches < 1 or self.block_patches < 1:
      raise ValueError("batch_patches and block_patches must be >= 1")

  def fingerprint(self) -> dict[str, Any]:
    """The parameters that decide which records a slide yields (a re-run must match them)."""
    out = dataclasses.asdict(self)
    for key in ("batch_patches", "thumbnail_side"):
      out.pop(key)
    return out


@dataclasses.dataclass
class SlidePlan:
  """Everything needed to cut one slide, small enough to ship between workers."""

  slide_id: str
  path: str
  width: int
  height: int
  mpp: float
  mpp_source: str
  reader: str
  file_bytes: int
  level: int                 # native level read
  level_mpp: float
  patch_mpp: float
  resampled: bool
  passthrough: bool
  patch_size: int
  step_level0: float
  grid_cols: int
  grid_rows: int
  tissue_fraction: float     # share of the slide that is tissue
  cells: np.ndarray          # [K, 2] int32 (col, row) of tissue patches, in batch order
  fractions: np.ndarray      # [K] float32 tissue fraction of each patch
  batch_starts: np.ndarray   # [B + 1] int64 offsets into cells

  @property
  def num_patches(self) -> int:
    return int(self.cells.shape[0])

  @property
  def num_batches(self) -> int:
    return int(self.batch_starts.shape[0] - 1)

  @property
  def patch_size_level0(self) -> int:
    return int(round(self.step_level0))

  def batch_cells(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = int(self.batch_starts[index]), int(self.batch_starts[index + 1])
    return self.cells[lo:hi], self.fractions[lo:hi]

  def coords_level0(self, cells: np.ndarray | None = None) -> np.ndarray:
    """[K, 2] int64 level-0 (x, y) of the top-left corners of ``cells`` (default: all)."""
    cells = self.cells if cells is None else cells
    return np.round(cells.astype(np.float64) * self.step_level0).astype(np.int64)

  def summary(self) -> dict[str, Any]:
    """The slide's row in slides.jsonl (without passthrough columns or shard location)."""
    return {
        "width": self.width, "height": self.height, "mpp": self.mpp,
        "mpp_source": self.mpp_source, "reader": self.reader, "level": self.level,
        "level_mpp": self.level_mpp, "patch_mpp": self.patch_mpp, "resampled": self.resampled,
        "passthrough": self.passthrough, "patch_size": self.patch_size,
        "patch_size_level0": self.patch_size_level0, "step_level0": self.step_level0,
        "grid": {"cols": self.grid_cols, "rows": self.grid_rows,
                 "tissue_cells": self.num_patches},
        "num_patches": self.num_patches, "tissue_fraction": round(self.tissue_fraction, 4),
    }


@dataclasses.dataclass
class PlanPictures:
  """Side products of planning: the display thumbnail and the tissue outline."""

  thumbnail: np.ndarray
  mask: np.ndarray
  polygons: list  # [[outer, holes...], ...] in level-0 pixels


def choose_level(info: slides.SlideInfo, params: TilingParams) -> tuple[int, float, bool]:
  """Returns (native level to read, patch mpp, resampled?) for the target mpp."""
  ratios = [abs(info.level_mpp(i) / params.target_mpp - 1.0) for i in range(len(info.levels))]
  closest = int(np.argmin(ratios))
  if ratios[closest] <= params.mpp_tolerance:
    return closest, info.level_mpp(closest), False
  finer = [i for i in range(len(info.levels)) if info.level_mpp(i) < params.target_mpp]
  if not finer:
    raise slides.SlideError(
        slides.MPP_TOO_COARSE,
        f"{info.path}: level 0 is {info.mpp:.4g} µm/px, coarser than the target "
        f"{params.target_mpp:.4g} µm/px (beyond the {params.mpp_tolerance:.0%} tolerance); "
        "patches would have to be upsampled")
  level = max(finer, key=info.level_mpp)
  return level, params.target_mpp, True


def plan_slide(slide: slides.Slide, slide_id: str,
               params: TilingParams) -> tuple[SlidePlan, PlanPictures]:
  """Chooses the level, detects tissue and lays out the patch grid and work batches."""
  info = slide.info
  level, patch_mpp, resampled = choose_level(info, params)
  step = params.patch_size * patch_mpp / info.mpp
  cols = int(math.floor((info.width - step) / step + 1e-9)) + 1 if info.width >= step else 0
  rows = int(math.floor((info.height - step) / step + 1e-9)) + 1 if info.height >= step else 0

  mask_scale = step / params.mask_px_per_patch          # level-0 pixels per mask pixel
  mask_w = max(1, round(info.width / mask_scale))
  mask_h = max(1, round(info.height / mask_scale))
  thumb = slide.thumbnail(max(params.thumbnail_side, mask_w, mask_h))
  mask_image = slides.resize(thumb, min(mask_w, thumb.shape[1]), min(mask_h, thumb.shape[0]))
  mask = tissue.tissue_mask(mask_image, params.tissue)
  sx, sy = info.width / mask.shape[1], info.height / mask.shape[0]

  if cols and rows:
    grid_c, grid_r = np.meshgrid(np.arange(cols), np.arange(rows))
    x0 = np.round(grid_c * step)
    y0 = np.round(grid_r * step)
    fractions = tissue.box_fractions(mask, x0 / sx, y0 / sy, (x0 + step) / sx, (y0 + step) / sy)
    keep = fractions >= max(params.min_tissue_fraction, 1e-9)
    cells = np.stack([grid_c[keep], grid_r[keep]], axis=1).astype(np.int32)
    cell_fractions = fractions[keep].astype(np.float32)
  else:
    cells = np.zeros((0, 2), np.int32)
    cell_fractions = np.zeros((0,), np.float32)
  if not cells.shape[0]:
    raise slides.SlideError(
        slides.NO_TISSUE,
        f"{info.path}: no {params.patch_size}-px patch at {patch_mpp:.3g} µm/px has at least "
        f"{params.min_tissue_fraction:.0%} tissue ({mask.mean():.1%} of the slide is tissue)")

  # Order cells block by block (row-major blocks, row-major inside), so that each block is read
  # as one region, then cut that order into batches of whole blocks.
  block = params.block_patches
  block_id = (cells[:, 1] // block) * (cols // block + 1) + cells[:, 0] // block
  order = np.lexsort((cells[:, 0], cells[:, 1], block_id))
  cells, cell_fractions, block_id = cells[order], cell_fractions[order], block_id[order]
  block_starts = np.flatnonzero(np.r_[True, block_id[1:] != block_id[:-1]])
  batch_starts, count = [0], 0
  for start, end in zip(block_starts, np.r_[block_starts[1:], len(cells)]):
    count += end - start
    if count >= params.batch_patches:
      batch_starts.append(int(end))
      count = 0
  if batch_starts[-1] != len(cells):
    batch_starts.append(len(cells))

  plan = SlidePlan(
      slide_id=slide_id, path=info.path, width=info.width, height=info.height, mpp=info.mpp,
      mpp_source=info.mpp_source, reader=info.reader, file_bytes=info.file_bytes, level=level,
      level_mpp=info.level_mpp(level), patch_mpp=patch_mpp, resampled=resampled,
      passthrough=False, patch_size=params.patch_size, step_level0=step, grid_cols=cols,
      grid_rows=rows, tissue_fraction=float(mask.mean()), cells=cells, fractions=cell_fractions,
      batch_starts=np.asarray(batch_starts, np.int64))
  if params.passthrough and not resampled:
    plan.passthrough = _jpeg_tile_page(plan) is not None
  polygons = tissue.tissue_polygons(mask, sx, sy)
  display = thumb
  if max(thumb.shape[:2]) > params.thumbnail_side:
    scale = params.thumbnail_side / max(thumb.shape[:2])
    display = slides.resize(thumb, max(1, round(thumb.shape[1] * scale)),
                            max(1, round(thumb.shape[0] * scale)))
  return plan, PlanPictures(thumbnail=display, mask=mask, polygons=polygons)


def _jpeg_tile_page(plan: SlidePlan) -> tuple[int, int] | None:
  """(TIFF page index, series) whose JPEG tiles coincide with the patch grid, or None."""
  level_w = round(plan.width * plan.mpp / plan.level_mpp)
  level_h = round(plan.height * plan.mpp / plan.level_mpp)
  if abs(plan.step_level0 * plan.mpp / plan.level_mpp - plan.patch_size) > 1e-6:
    return None
  try:
    with tifffile.TiffFile(plan.path) as tif:
      for index, page in enumerate(tif.pages):
        if (page.is_tiled and page.compression == _TIFF_JPEG and page.tilewidth == plan.patch_size
            and page.tilelength == plan.patch_size and page.shape[:2] == (level_h, level_w)
            and page.samplesperpixel == 3 and page.planarconfig == 1):
          return index, page.photometric
  except Exception:  # not a TIFF, or one tifffile cannot parse: decode through large_image
    return None
  return None


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
  return bytes(imagecodecs.jpeg8_encode(rgb, level=quality))


def decode_jpeg(data: bytes) -> np.ndarray:
  """Decodes a patch's JPEG bytes to an HxWx3 uint8 RGB array."""
  return imagecodecs.jpeg8_decode(data)


def _passthrough_patches(plan: SlidePlan, cells: np.ndarray) -> list[bytes]:
  page_index, photometric = _jpeg_tile_page(plan)
  with tifffile.TiffFile(plan.path) as tif:
    page = tif.pages[page_index]
    tables = page.jpegtables
    tiles_across = -(-page.shape[1] // page.tilewidth)
    offsets, counts = page.dataoffsets, page.databytecounts
    handle = tif.filehandle
    out = []
    for col, row in cells:
      index = int(row) * tiles_across + int(col)
      if counts[index] == 0:
        raise slides.SlideError(slides.CORRUPT_SLIDE,
                                f"{plan.path}: tile {index} of page {page_index} is empty")
      handle.seek(offsets[index])
      data = handle.read(counts[index])
      if tables:  # abbreviated stream: splice the shared tables in front of the frame
        data = bytes(tables[:-2]) + data[2:]
      if photometric == _TIFF_RGB:
        data = data[:2] + _ADOBE_RGB_MARKER + data[2:]
      out.append(data)
  return out


def _row_runs(cells: np.ndarray) -> list[np.ndarray]:
  """Indices of ``cells`` grouped into runs of horizontally adjacent cells on one grid row."""
  order = np.lexsort((cells[:, 0], cells[:, 1]))
  ordered = cells[order]
  breaks = np.flatnonzero((np.diff(ordered[:, 1]) != 0) | (np.diff(ordered[:, 0]) != 1)) + 1
  return np.split(order, breaks)


def _decoded_patches(slide: slides.Slide, plan: SlidePlan, cells: np.ndarray,
                     quality: int) -> list[bytes]:
  # One region per run of adjacent tissue patches on a grid row: no background between runs is
  # decoded, and the slide reader's tile cache decodes tiles shared by neighbouring runs once.
  ps, step = plan.patch_size, plan.step_level0
  out: list[bytes | None] = [None] * len(cells)
  for run in _row_runs(cells):
    c0, row = cells[run[0]]
    c1 = cells[run[-1], 0] + 1
    x, y = int(round(c0 * step)), int(round(row * step))
    w, h = int(round(c1 * step)) - x, int(round((row + 1) * step)) - y
    region = slide.read_region(x, y, w, h, int(c1 - c0) * ps, ps)
    for member in run:
      left = (cells[member, 0] - c0) * ps
      out[member] = encode_jpeg(region[:, left:left + ps], quality)
  return out


def read_batch(slide: slides.Slide | None, plan: SlidePlan, batch_index: int,
               params: TilingParams) -> list[dict[str, Any]]:
  """The patch records (schema ``records.PATCH``) of one batch of the plan.

  ``slide`` may be None when the plan copies JPEG tiles (passthrough): no decoding is needed.
  """
  cells, fractions = plan.batch_cells(batch_index)
  if plan.passthrough:
    jpegs = _passthrough_patches(plan, cells)
  else:
    if slide is None:
      raise ValueError("read_batch needs an open slide unless the plan is passthrough")
    jpegs = _decoded_patches(slide, plan, cells, params.jpeg_quality)
  coords = plan.coords_level0(cells)
  base = {"schema_version": records.SCHEMA_VERSION, "slide_id": plan.slide_id,
          "patch_size": plan.patch_size, "patch_size_level0": plan.patch_size_level0,
          "mpp": float(plan.mpp), "patch_mpp": float(plan.patch_mpp)}
  return [dict(base, x=int(x), y=int(y), col=int(c), row=int(r), tissue_fraction=float(f),
               jpeg=jpeg)
          for (x, y), (c, r), f, jpeg in zip(coords, cells, fractions, jpegs)]


def render_thumbnail(plan: SlidePlan, pictures: PlanPictures) -> Image.Image:
  """The thumbnail with the kept patches shaded and outlined and the tissue contour drawn."""
  image = Image.fromarray(pictures.thumbnail).convert("RGBA")
  sx = image.width / plan.width
  sy = image.height / plan.height
  overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
  draw = ImageDraw.Draw(overlay)
  step = plan.step_level0
  outline = max(1, round(min(sx, sy) * step / 24))
  for x, y in plan.coords_level0():
    box = (x * sx, y * sy, (x + step) * sx - 1, (y + step) * sy - 1)
    draw.rectangle(box, fill=(40, 200, 80, 50), outline=(20, 140, 50, 200),
                   width=outline if step * sx >= 6 else 0)
  for polygon in pictures.polygons:
    for ring in polygon:
      points = [(float(px) * sx, float(py) * sy) for px, py in ring]
      draw.line(points + points[:1], fill=(30, 60, 230, 255), width=2)
  return Image.alpha_composite(image, overlay).convert("RGB")


def tissue_feature_collection(plan: SlidePlan, pictures: PlanPictures) -> dict:
  """The tissue outline as QuPath annotations (level-0 pixels)."""
  return qupath.feature_collection(
      qupath.polygon_feature(polygon, object_type="annotation", name="Tissue",
                             color=(30, 60, 230))
      for polygon in pictures.polygons)


def plan_digest(plan: SlidePlan) -> str:
  """A short hash of the cells a plan cuts: staged batches are reused only for the same plan."""
  digest = hashlib.sha1()
  digest.update(np.ascontiguousarray(plan.cells).tobytes())
  digest.update(np.ascontiguousarray(plan.batch_starts).tobytes())
  digest.update(f"{plan.step_level0:.6f}|{plan.passthrough}|{plan.level}".encode())
  return digest.hexdigest()[:12]
