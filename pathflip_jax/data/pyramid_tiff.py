"""Writes pyramidal, tiled, JPEG-compressed TIFF slides that OpenSlide and large_image both read.

OpenSlide's generic-tiff reader sees sub-resolution levels only when they are main-chain IFDs with
``subfiletype=1`` (a ``subifds`` pyramid shows one level), and takes the mpp from resolution tags in
pixels per centimetre.
"""

from __future__ import annotations

import os

import numpy as np
import tifffile
from PIL import Image


def downsample2(image: np.ndarray) -> np.ndarray:
  """Halves an HxWx3 uint8 image by 2x2 box averaging (odd edges are cropped)."""
  h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
  return np.asarray(Image.fromarray(np.ascontiguousarray(image[:h, :w])).reduce(2))


def write_pyramidal_tiff(path: str | os.PathLike, image: np.ndarray, mpp: float | None,
                         tile_size: int = 256, quality: int = 90, min_level_size: int = 512,
                         description: str = "") -> list[tuple[int, int]]:
  """Writes ``image`` (HxWx3 uint8, level 0) and its 2x-downsampled levels as one pyramidal TIFF.

  Args:
    path: output file; written under a temporary name and renamed when complete.
    image: level-0 RGB pixels.
    mpp: level-0 µm per pixel written into the resolution tags; None writes no resolution, which
      makes a slide without mpp metadata (useful for testing that path).
    tile_size: TIFF tile side in pixels (a multiple of 16).
    quality: JPEG quality of the tiles.
    min_level_size: stop adding levels once the longer side would fall below this.
    description: ImageDescription of level 0.

  Returns:
    The (width, height) of each written level, finest first.
  """
  if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
    raise ValueError(f"{path}: expected an HxWx3 uint8 image, got {image.shape} {image.dtype}")
  if tile_size % 16:
    raise ValueError(f"{path}: tile_size must be a multiple of 16, got {tile_size}")
  levels = [image]
  while max(levels[-1].shape[:2]) // 2 >= min_level_size:
    levels.append(downsample2(levels[-1]))
  tmp = f"{path}.partial"
  sizes = []
  with tifffile.TiffWriter(tmp, bigtiff=image.nbytes > 2**31) as writer:
    for index, level in enumerate(levels):
      extra = {}
      if mpp is not None:
        level_mpp = mpp * image.shape[1] / level.shape[1]
        extra = dict(resolution=(1e4 / level_mpp, 1e4 / level_mpp), resolutionunit="CENTIMETER")
      writer.write(
          level, tile=(tile_size, tile_size), photometric="rgb", compression="jpeg",
          compressionargs={"level": quality}, subfiletype=0 if index == 0 else 1,
          description=description if index == 0 else None, metadata=None, **extra)
      sizes.append((level.shape[1], level.shape[0]))
  os.replace(tmp, path)
  return sizes
