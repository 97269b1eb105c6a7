"""Opening whole-slide images: validation, mpp, native pyramid levels and region reads.

Pixels are read through large_image (its OpenSlide and TIFF sources). The native pyramid is taken
from OpenSlide or, for TIFFs OpenSlide does not know, from tifffile, because large_image only
exposes its own power-of-two virtual levels. Every failure is a :class:`SlideError` whose
``reason`` is one short, stable word that jobs record in ``failures.jsonl``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import struct
import warnings

import numpy as np
from PIL import Image

import large_image
import large_image_source_tiff
import openslide
import tifffile

from pathflip_jax import storage

# large_image logs every failed source probe and every sparse pyramid at WARNING; a job that
# reports its own failures per slide does not need them.
for _name in ("large_image", "large-image", "large_image_source_openslide",
              "large_image_source_tiff", "tifffile"):
  logging.getLogger(_name).setLevel(logging.ERROR)

# Pixels as scanned: the tiling job copies JPEG tiles untouched where it can, and decoded patches
# must match those bytes, so large_image's ICC colour correction stays off.
large_image.config.setConfig("icc_correction", False)

# Largest region decoded in one piece (pixels at the level read); bigger reads go band by band.
_MAX_REGION_PIXELS = 2**26

_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")

# Failure reasons, stable words written to failures.jsonl.
MISSING_FILE = "missing_file"
NOT_A_SLIDE = "not_a_slide"
CORRUPT_SLIDE = "corrupt_slide"
NO_MPP = "no_mpp"
MPP_TOO_COARSE = "mpp_too_coarse"
NO_TISSUE = "no_tissue"
UNREACHABLE = "unreachable"     # a slide URL whose store cannot be read


class SlideError(Exception):
  """A slide that cannot be used; ``reason`` is a stable word, the message says why."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason
    self.message = message


@dataclasses.dataclass(frozen=True)
class Level:
  """One native pyramid level."""

  width: int
  height: int
  downsample: float  # level-0 pixels per level pixel


@dataclasses.dataclass(frozen=True)
class SlideInfo:
  path: str
  width: int          # level-0 width in pixels
  height: int         # level-0 height in pixels
  mpp: float          # level-0 µm per pixel
  mpp_source: str     # "metadata", "manifest" or "flag"
  levels: tuple[Level, ...]
  reader: str         # large_image source name
  file_bytes: int

  def level_mpp(self, index: int) -> float:
    return self.mpp * self.levels[index].downsample


def _is_tiff(path: str) -> bool:
  with open(path, "rb") as f:
    return f.read(4) in _TIFF_MAGICS


def _walk_tiff_directories(path: str, file_bytes: int) -> None:
  """Follows the TIFF directory chain; raises CORRUPT_SLIDE where it leaves the file."""
  with open(path, "rb") as f:
    header = f.read(16)
    order = "<" if header[:2] == b"II" else ">"
    big = struct.unpack(order + "H", header[2:4])[0] == 43
    count_fmt, count_size, entry_size, offset_fmt = (
        ("Q", 8, 20, "Q") if big else ("H", 2, 12, "I"))
    offset = struct.unpack(order + offset_fmt, header[8:16] if big else header[4:8])[0]
    seen = set()
    index = 0
    while offset and index < 100_000:
      if offset in seen:
        raise SlideError(CORRUPT_SLIDE, f"{path}: TIFF directory chain loops at byte {offset:,}")
      seen.add(offset)
      if offset + count_size > file_bytes:
        raise SlideError(CORRUPT_SLIDE, f"{path}: truncated: TIFF directory {index} starts at "
                         f"byte {offset:,} but the file has {file_bytes:,} bytes")
      f.seek(offset)
      entries = struct.unpack(order + count_fmt, f.read(count_size))[0]
      end = offset + count_size + entries * entry_size
      next_size = 8 if big else 4
      if end + next_size > file_bytes:
        raise SlideError(CORRUPT_SLIDE, f"{path}: truncated: TIFF directory {index} "
                         f"({entries} entries at byte {offset:,}) runs past the end of the file "
                         f"({file_bytes:,} bytes)")
      f.seek(end)
      offset = struct.unpack(order + offset_fmt, f.read(next_size))[0]
      index += 1


def _check_tiff_complete(path: str, file_bytes: int) -> None:
  """Raises CORRUPT_SLIDE when a TIFF's directories or tile data run past the end of the file.

  A truncated slide often still opens (its first directory is intact) and fails only when a
  missing tile is read, deep inside a job; checking the offsets up front gives a clear reason.
  """
  _walk_tiff_directories(path, file_bytes)
  try:
    with tifffile.TiffFile(path) as tif:
      for index, page in enumerate(tif.pages):
        offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        counts = np.asarray(page.databytecounts, dtype=np.int64)
        if offsets.size and int((offsets + counts).max()) > file_bytes:
          raise SlideError(
              CORRUPT_SLIDE,
              f"{path}: truncated: image data of TIFF directory {index} ends at byte "
              f"{int((offsets + counts).max()):,} but the file has {file_bytes:,} bytes")
  except SlideError:
    raise
  except Exception as e:  # tifffile raises many types for damaged files
    raise SlideError(CORRUPT_SLIDE, f"{path}: damaged TIFF structure ({type(e).__name__}: {e})")


def _native_levels(path: str, width: int, height: int) -> tuple[Level, ...]:
  """Native pyramid levels, finest first; falls back to level 0 alone."""
  try:
    with openslide.OpenSlide(path) as osr:
      return tuple(Level(int(w), int(h), float(d))
                   for (w, h), d in zip(osr.level_dimensions, osr.level_downsamples))
  except (openslide.OpenSlideError, openslide.OpenSlideUnsupportedFormatError):
    pass
  try:
    with tifffile.TiffFile(path) as tif:
      levels = []
      for page in tif.pages:
        if not page.is_tiled or page.shape[-1] not in (3, 4):
          continue
        h, w = page.shape[:2]
        if levels and not (w < levels[-1].width and abs(w / h - width / height) < 0.02):
          continue  # label, macro or other associated image
        if not levels and (w, h) != (width, height):
          continue
        levels.append(Level(w, h, width / w))
      if levels:
        return tuple(levels)
  except Exception:  # not a TIFF: large_image opened it, level 0 is all we know
    pass
  return (Level(width, height, 1.0),)


# OpenSlide vendors whose levels are plain tiled TIFF pages (no tile overlaps, no multi-image
# pages), so that decoding the pages' tiles directly gives exactly OpenSlide's pixels.
_DIRECT_VENDORS = ("aperio", "generic-tiff")


def _openslide_metadata(path: str):
  """(width, height, native levels, mpp or None, vendor) from OpenSlide, or None."""
  try:
    with openslide.OpenSlide(path) as osr:
      width, height = osr.dimensions
      levels = tuple(Level(int(w), int(h), float(d))
                     for (w, h), d in zip(osr.level_dimensions, osr.level_downsamples))
      mpp = osr.properties.get(openslide.PROPERTY_NAME_MPP_X)
      vendor = osr.properties.get(openslide.PROPERTY_NAME_VENDOR)
  except (openslide.OpenSlideError, openslide.OpenSlideUnsupportedFormatError):
    return None
  try:
    mpp = float(mpp) if mpp else None
  except ValueError:
    mpp = None
  return int(width), int(height), levels, mpp, vendor


class _PlainTiff:
  """A TIFF that is an ordinary image (strips, no pyramid), e.g. a region exported from a slide:
  decoded once, on first read. Larger images than ``max_pixels`` are refused (they need a tiled
  pyramid to be read piecewise)."""

  max_pixels = 2**28

  def __init__(self, path: str):
    with tifffile.TiffFile(path) as tif:
      page = tif.pages[0]
      if page.dtype != np.uint8 or page.ndim not in (2, 3):
        raise ValueError(f"unsupported pixel layout {page.shape} {page.dtype}")
      self.height, self.width = page.shape[:2]
      self.mpp = _tiff_resolution_mpp(page)
    if self.height * self.width > self.max_pixels:
      raise ValueError(f"{self.width}x{self.height} untiled image is too large to read whole")
    self._path = path
    self._pixels: np.ndarray | None = None

  def read(self, x: int, y: int, width: int, height: int) -> np.ndarray:
    if self._pixels is None:
      pixels = tifffile.imread(self._path, key=0)
      self._pixels = _to_rgb(pixels, pixels.shape[1], pixels.shape[0], self._path)
    out = np.full((height, width, 3), 255, np.uint8)
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + width, self.width), min(y + height, self.height)
    if x1 > x0 and y1 > y0:
      out[y0 - y:y1 - y, x0 - x:x1 - x] = self._pixels[y0:y1, x0:x1]
    return out

  def close(self) -> None:
    self._pixels = None


def _tiff_resolution_mpp(page) -> float | None:
  """µm per pixel from XResolution/ResolutionUnit (None when the unit is not physical)."""
  tag = page.tags.get("XResolution")
  unit = page.tags.get("ResolutionUnit")
  if tag is None or unit is None:
    return None
  numerator, denominator = tag.value
  if not numerator or not denominator:
    return None
  per_unit = numerator / denominator
  microns = {2: 25400.0, 3: 10000.0}.get(int(unit.value))
  return microns / per_unit if microns else None


def _try_plain_tiff(path: str) -> _PlainTiff | None:
  try:
    return _PlainTiff(path)
  except Exception:  # not an ordinary image either: the slide readers' error stands
    return None


def _open_source(path: str, is_tiff: bool):
  """large_image's TIFF source for TIFF-family files (SVS included): it decodes tiles several
  times faster than its OpenSlide source here; anything else goes through large_image.open."""
  if is_tiff:
    try:
      return large_image_source_tiff.open(path, noCache=True)
    except Exception:
      pass
  return large_image.open(path, noCache=True)


class _TiffTiles:
  """Direct tile access to one tiled TIFF page: reads and decodes each tile with tifffile.

  large_image's TIFF source goes through PIL for every tile and retiles through Python; for the
  common case (a tiled JPEG pyramid level) decoding the tiles directly is 2-3x faster, which is
  the difference between a tiler that keeps up with the JPEG encoder and one that does not.
  Recently decoded tiles are kept, since neighbouring regions share edge tiles.
  """

  def __init__(self, tif: tifffile.TiffFile, page, cache_tiles: int = 256):
    self._tif = tif
    self._page = page
    self._tile_h, self._tile_w = page.tilelength, page.tilewidth
    self._height, self._width = page.shape[:2]
    self._across = -(-self._width // self._tile_w)
    self._cache: dict[int, np.ndarray] = {}
    self._cache_tiles = cache_tiles

  def _tile(self, index: int) -> np.ndarray:
    tile = self._cache.get(index)
    if tile is None:
      page = self._page
      count = page.databytecounts[index]
      if count == 0:  # a tile the scanner never wrote: background
        tile = np.full((self._tile_h, self._tile_w, 3), 255, np.uint8)
      else:
        handle = self._tif.filehandle
        handle.seek(page.dataoffsets[index])
        data = handle.read(count)
        if len(data) != count:
          raise SlideError(CORRUPT_SLIDE, f"{self._tif.filehandle.path}: tile {index} is "
                           f"truncated ({len(data)} of {count} bytes)")
        decoded, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
        tile = decoded[0, :self._tile_h, :self._tile_w, :3]
      if len(self._cache) >= self._cache_tiles:
        self._cache.pop(next(iter(self._cache)))
      self._cache[index] = tile
    return tile

  def read(self, x: int, y: int, width: int, height: int) -> np.ndarray:
    """Pixels [y, y+height) x [x, x+width) of the page; outside the image is white."""
    out = np.full((height, width, 3), 255, np.uint8)
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + width, self._width), min(y + height, self._height)
    if x1 <= x0 or y1 <= y0:
      return out
    for ty in range(y0 // self._tile_h, (y1 - 1) // self._tile_h + 1):
      for tx in range(x0 // self._tile_w, (x1 - 1) // self._tile_w + 1):
        tile = self._tile(ty * self._across + tx)
        top, left = ty * self._tile_h, tx * self._tile_w
        sy0, sy1 = max(y0, top), min(y1, top + self._tile_h)
        sx0, sx1 = max(x0, left), min(x1, left + self._tile_w)
        out[sy0 - y:sy1 - y, sx0 - x:sx1 - x] = tile[sy0 - top:sy1 - top, sx0 - left:sx1 - left]
    return out

  def close(self) -> None:
    self._cache.clear()


def _direct_tile_readers(path: str, levels: tuple[Level, ...]) -> tuple[tifffile.TiffFile | None,
                                                                         dict[int, _TiffTiles]]:
  """Direct readers for the native levels stored as tiled 8-bit RGB TIFF pages."""
  try:
    tif = tifffile.TiffFile(path)
  except Exception:
    return None, {}
  readers = {}
  for index, level in enumerate(levels):
    for page in tif.pages:
      if (page.is_tiled and page.shape[:2] == (level.height, level.width)
          and page.dtype == np.uint8 and page.samplesperpixel in (3, 4)
          and page.planarconfig == 1 and page.photometric in (2, 6)):
        readers[index] = _TiffTiles(tif, page)
        break
  if not readers:
    tif.close()
    return None, {}
  return tif, readers


def _staged(url: str) -> str:
  """A local copy of a slide URL; what the store says when it cannot give one, as a SlideError
  (a missing object, an unreachable or refusing store)."""
  try:
    return storage.cache().local_copy(url)
  except FileNotFoundError:
    raise SlideError(MISSING_FILE, f"{url}: no such object") from None
  except OSError as e:   # storage.StorageError, network errors
    raise SlideError(UNREACHABLE, f"{url}: cannot be read from the store ({e})") from None


class Slide:
  """An open slide. Use as a context manager, or call :meth:`close`.

  Args:
    path: slide file, or a URL (``s3://``, ``gs://``): read from a copy in the local cache
      (``storage.cache()``, size-limited), since the slide readers open local files only.
    mpp: µm per pixel that overrides the file's metadata (e.g. from a manifest row).
    fallback_mpp: µm per pixel used only when the file has none.
  """

  def __init__(self, path: str | os.PathLike, mpp: float | None = None,
               fallback_mpp: float | None = None):
    source = os.fspath(path)
    if not storage.is_url(source):
      self._open(source, mpp, fallback_mpp)
      return
    local = _staged(source)
    try:
      self._open(local, mpp, fallback_mpp)
    except SlideError as e:
      # Name the slide as the user gave it, not its copy in the cache.
      raise SlideError(e.reason, e.message.replace(local, source)) from None

  def _open(self, path: str, mpp: float | None, fallback_mpp: float | None) -> None:
    if not os.path.exists(path):
      raise SlideError(MISSING_FILE, f"{path}: no such file")
    if not os.path.isfile(path):
      raise SlideError(NOT_A_SLIDE, f"{path}: not a regular file")
    file_bytes = os.path.getsize(path)
    if file_bytes == 0:
      raise SlideError(NOT_A_SLIDE, f"{path}: empty file")
    is_tiff = _is_tiff(path)
    self._path = path
    self._source = None
    self._tif, self._direct = None, {}
    if is_tiff:
      _check_tiff_complete(path, file_bytes)
      found = _openslide_metadata(path)
      if found is not None and found[4] in _DIRECT_VENDORS:
        width, height, levels, file_mpp, _ = found
        self._tif, self._direct = _direct_tile_readers(path, levels)
    reader = "tifffile"
    if 0 not in self._direct:
      # Not a plain tiled TIFF pyramid: large_image (OpenSlide or TIFF source) reads everything,
      # and an ordinary untiled TIFF image is read whole.
      self.close()
      try:
        self._source = self._open_large_image(is_tiff)
      except SlideError as error:
        plain = _try_plain_tiff(path) if is_tiff else None
        if plain is None:
          raise error
        self._direct = {0: plain}
        width, height, file_mpp = plain.width, plain.height, plain.mpp
        levels = (Level(width, height, 1.0),)
        reader = "tifffile-untiled"
      else:
        meta = self._source.getMetadata()
        width, height = int(meta["sizeX"]), int(meta["sizeY"])
        file_mpp = float(meta["mm_x"]) * 1000.0 if meta.get("mm_x") else None
        levels = _native_levels(path, width, height)
        reader = type(self._source).__name__
    if mpp is not None:
      slide_mpp, mpp_source = float(mpp), "manifest"
    elif file_mpp:
      slide_mpp, mpp_source = file_mpp, "metadata"
    elif fallback_mpp is not None:
      slide_mpp, mpp_source = float(fallback_mpp), "flag"
    else:
      self.close()
      raise SlideError(NO_MPP, f"{path}: the file has no microns-per-pixel metadata; give it an "
                       "'mpp' column in the manifest or pass --fallback_mpp")
    if not slide_mpp > 0:
      self.close()
      raise SlideError(NO_MPP, f"{path}: invalid mpp {slide_mpp}")
    self.info = SlideInfo(
        path=path, width=width, height=height, mpp=slide_mpp, mpp_source=mpp_source,
        levels=levels, reader=reader, file_bytes=file_bytes)

  def _open_large_image(self, is_tiff: bool):
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _open_source(self._path, is_tiff)
    except Exception as e:
      if is_tiff:
        raise SlideError(CORRUPT_SLIDE,
                         f"{self._path}: TIFF file that no slide reader can open ({e})") from None
      raise SlideError(NOT_A_SLIDE, f"{self._path}: not a slide format that large_image or "
                       f"OpenSlide can read ({type(e).__name__})") from None

  @property
  def source(self):
    """The large_image tile source, opened on first use (tiled TIFF levels do without it)."""
    if self._source is None:
      self._source = self._open_large_image(_is_tiff(self._path))
    return self._source

  def __enter__(self) -> "Slide":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    self._source = None
    for reader in getattr(self, "_direct", {}).values():
      reader.close()
    self._direct = {}
    if getattr(self, "_tif", None) is not None:
      self._tif.close()
      self._tif = None

  def best_level(self, downsample: float) -> int:
    """Index of the coarsest native level that is not coarser than ``downsample``."""
    best = 0
    for index, level in enumerate(self.info.levels):
      if level.downsample <= downsample * (1 + 1e-3):
        best = index
    return best

  def read_level(self, x: int, y: int, width: int, height: int, level: int) -> np.ndarray:
    """Native pixels of native level ``level`` covering the level-0 rectangle, RGB uint8."""
    downsample = self.info.levels[level].downsample
    out_w = max(1, round(width / downsample))
    out_h = max(1, round(height / downsample))
    if level in self._direct:
      try:
        return self._direct[level].read(round(x / downsample), round(y / downsample), out_w,
                                        out_h)
      except SlideError:
        raise
      except Exception as e:
        raise SlideError(CORRUPT_SLIDE, f"{self.info.path}: cannot decode region x={x} y={y} "
                         f"{width}x{height} of level {level} ({type(e).__name__}: {e})") from None
    try:
      array, _ = self.source.getRegion(
          region=dict(left=x, top=y, width=width, height=height, units="base_pixels"),
          output=dict(maxWidth=out_w, maxHeight=out_h),
          format=large_image.constants.TILE_FORMAT_NUMPY)
    except Exception as e:
      raise SlideError(CORRUPT_SLIDE, f"{self.info.path}: cannot read region x={x} y={y} "
                       f"{width}x{height} ({type(e).__name__}: {e})") from None
    return _to_rgb(array, out_w, out_h, self.info.path)

  def read_region(self, x: int, y: int, width: int, height: int, out_width: int,
                  out_height: int) -> np.ndarray:
    """Reads the level-0 rectangle (x, y, width, height) as an ``out_height x out_width x 3``
    uint8 RGB array, from the finest native level that is at least that coarse, area-averaged
    to the requested size when the level does not match exactly. Transparent pixels (outside
    scanned areas) come back white."""
    level = self.best_level(min(width / out_width, height / out_height))
    downsample = self.info.levels[level].downsample
    native_row = width / downsample
    if native_row * height / downsample <= _MAX_REGION_PIXELS or out_height < 2:
      return resize(self.read_level(x, y, width, height, level), out_width, out_height)
    # Band by band, so that a thumbnail of a slide without a pyramid never decodes it whole.
    native_rows_per_out_row = height / downsample / out_height
    band = max(1, int(_MAX_REGION_PIXELS / native_row / native_rows_per_out_row))
    out = np.empty((out_height, out_width, 3), np.uint8)
    for r0 in range(0, out_height, band):
      r1 = min(out_height, r0 + band)
      y0 = y + round(r0 * height / out_height)
      y1 = y + round(r1 * height / out_height)
      out[r0:r1] = resize(self.read_level(x, y0, width, y1 - y0, level), out_width, r1 - r0)
    return out

  def thumbnail(self, max_side: int) -> np.ndarray:
    """The whole slide with its longer side at most ``max_side`` pixels, RGB uint8."""
    scale = min(1.0, max_side / max(self.info.width, self.info.height))
    out_w = max(1, round(self.info.width * scale))
    out_h = max(1, round(self.info.height * scale))
    return self.read_region(0, 0, self.info.width, self.info.height, out_w, out_h)


def resize(array: np.ndarray, out_width: int, out_height: int) -> np.ndarray:
  """Resizes an RGB uint8 image; area averaging when shrinking (exact box sums for integer
  factors), bilinear when enlarging by a rounding pixel."""
  h, w = array.shape[:2]
  if (w, h) == (out_width, out_height):
    return array
  if w % out_width == 0 and h % out_height == 0 and w // out_width == h // out_height:
    return np.asarray(Image.fromarray(array).reduce(w // out_width))
  method = Image.Resampling.BOX if out_width <= w else Image.Resampling.BILINEAR
  return np.asarray(Image.fromarray(array).resize((out_width, out_height), method))


def _to_rgb(array: np.ndarray, out_width: int, out_height: int, path: str) -> np.ndarray:
  if array.ndim == 2:
    array = array[..., None]
  if array.dtype != np.uint8:
    if np.issubdtype(array.dtype, np.integer) and array.max(initial=0) > 255:
      array = (array / 257.0).round()
    array = np.clip(array, 0, 255).astype(np.uint8)
  bands = array.shape[2]
  if bands == 4:
    alpha = array[..., 3:4]
    rgb = array[..., :3]
    if alpha.min() < 255:  # areas outside the scan are transparent: composite over white
      a = alpha.astype(np.uint32)
      rgb = ((rgb.astype(np.uint32) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)
    array = rgb
  elif bands == 1:
    array = np.repeat(array, 3, axis=2)
  elif bands == 2:
    array = np.repeat(array[..., :1], 3, axis=2)
  elif bands > 4:
    array = array[..., :3]
  if array.shape[0] != out_height or array.shape[1] != out_width:
    # large_image keeps the aspect ratio and may be off by a pixel from the requested size.
    if abs(array.shape[0] - out_height) > 2 or abs(array.shape[1] - out_width) > 2:
      raise SlideError(CORRUPT_SLIDE, f"{path}: region read returned {array.shape[1]}x"
                       f"{array.shape[0]}, expected {out_width}x{out_height}")
    fixed = np.full((out_height, out_width, 3), 255, np.uint8)
    h, w = min(out_height, array.shape[0]), min(out_width, array.shape[1])
    fixed[:h, :w] = array[:h, :w, :3]
    array = fixed
  return np.ascontiguousarray(array)
