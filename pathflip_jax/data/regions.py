"""Regions of a slide: its patches grouped into R x R-patch cells of the level-0 grid.

PathFLIP's region Q-Former encodes each region's patches into one region token (paper: 16 x 16
patches of 256 px, i.e. 4096-px regions at 20x). Grouping uses level-0 coordinates only, so it is
the same for features from this project's tiler, TRIDENT or CLAM, whatever their magnification.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class RegionGrid:
  """Regions of one slide.

  Attributes:
    region_of_patch: [N] region number of each patch.
    cells: [M, 2] int64 region grid (x, y) of each region, relative to the slide's first region
      (so positions do not depend on where the tissue sits on the glass).
    members: per region, the patch rows it holds (ascending).
    region_size_level0: side of a region in level-0 pixels.
  """

  region_of_patch: np.ndarray
  cells: np.ndarray
  members: list[np.ndarray]
  region_size_level0: float

  @property
  def num_regions(self) -> int:
    return len(self.members)

  def counts(self) -> np.ndarray:
    return np.array([len(m) for m in self.members], np.int64)

  def bounds_level0(self, origin_level0: np.ndarray) -> np.ndarray:
    """[M, 4] x0, y0, x1, y1 of each region in level-0 pixels (``origin_level0`` from
    :func:`group_patches`)."""
    x0y0 = origin_level0 + self.cells * self.region_size_level0
    return np.concatenate([x0y0, x0y0 + self.region_size_level0], axis=1)


def group_patches(coords_n2: np.ndarray, patch_size_level0: float, region_patches: int
                  ) -> tuple[RegionGrid, np.ndarray]:
  """Groups patches (level-0 top-left corners) into ``region_patches`` x ``region_patches`` cells.

  Returns the grid and the level-0 origin of cell (0, 0). Patches are assigned by their centre,
  so a tiling with overlap or an offset grid still puts each patch in exactly one region.
  """
  if region_patches < 1:
    raise ValueError(f"region_patches must be >= 1, got {region_patches}")
  if patch_size_level0 <= 0:
    raise ValueError(f"patch_size_level0 must be > 0, got {patch_size_level0}")
  coords_n2 = np.asarray(coords_n2, np.float64).reshape(-1, 2)
  size = float(patch_size_level0) * region_patches
  if not len(coords_n2):
    return RegionGrid(np.zeros((0,), np.int64), np.zeros((0, 2), np.int64), [], size), \
        np.zeros((2,), np.float64)
  centres = coords_n2 + patch_size_level0 / 2.0
  cell_n2 = np.floor(centres / size).astype(np.int64)
  origin = cell_n2.min(axis=0)
  cell_n2 -= origin
  cells, region_of_patch = np.unique(cell_n2, axis=0, return_inverse=True)
  region_of_patch = region_of_patch.reshape(-1)
  order = np.argsort(region_of_patch, kind="stable")
  bounds = np.cumsum(np.bincount(region_of_patch, minlength=len(cells)))[:-1]
  members = np.split(order, bounds)
  return RegionGrid(region_of_patch, cells, members, size), origin.astype(np.float64) * size
