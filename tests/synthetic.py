"""Small synthetic H&E-like slides for tests: white glass, pink tissue with purple nuclei."""

from __future__ import annotations

import pathlib

import numpy as np

from pathflip_jax.data.pyramid_tiff import write_pyramidal_tiff


def tissue_image(height: int, width: int, seed: int = 0, ellipses=None,
                 pen: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """An RGB image and its true tissue mask: elliptical tissue pieces with nuclei on white."""
  rng = np.random.default_rng(seed)
  yy, xx = np.ogrid[:height, :width]
  mask = np.zeros((height, width), bool)
  if ellipses is None:
    ellipses = [(0.5, 0.45, 0.3, 0.22), (0.3, 0.8, 0.12, 0.1)]
  for cy, cx, ry, rx in ellipses:
    mask |= ((yy / height - cy) / ry) ** 2 + ((xx / width - cx) / rx) ** 2 < 1
  # Stroma colour with coarse texture (noise drawn on an 8x coarser grid, then repeated).
  noise = rng.normal(0, 10, (-(-height // 8), -(-width // 8))).astype(np.float32)
  noise = np.repeat(np.repeat(noise, 8, 0), 8, 1)[:height, :width, None]
  tissue = np.clip(np.array([232, 150, 190], np.float32) + noise, 0, 255).astype(np.uint8)
  image = np.where(mask[..., None], tissue, np.array([245, 244, 246], np.uint8))
  # Nuclei: 7x7 discs at random centres inside tissue.
  count = int(mask.sum() * 0.004 / 49 * 8)
  cy = rng.integers(3, height - 3, count)
  cx = rng.integers(3, width - 3, count)
  keep = mask[cy, cx]
  disc = np.argwhere(np.hypot(*np.mgrid[-3:4, -3:4]) <= 3.2) - 3
  ys = (cy[keep, None] + disc[None, :, 0]).ravel()
  xs = (cx[keep, None] + disc[None, :, 1]).ravel()
  image[ys, xs] = (95, 50, 140)
  if pen:
    half = max(3, height // 150)
    row = int(0.12 * height)
    image[row - half:row + half, int(width * 0.1):int(width * 0.9)] = (40, 90, 200)
  return image, mask


def write_test_slides(directory: pathlib.Path) -> pathlib.Path:
  """Writes the synthetic slides the tests share and returns the directory.

  - slide40x.tif: 2560x2048 at 0.25 µm/px with 2x and 4x levels (a 40x scan with a pyramid)
  - slide40x_flat.tif: the same pixels, level 0 only (forces resampling to 0.5 µm/px)
  - slide20x.tif: 2048x1536 at 0.5 µm/px, 256-px tiles (JPEG passthrough applies)
  - nompp.tif: like slide20x.tif without resolution tags
  - white.tif: blank glass at 0.5 µm/px
  - pen.tif: tissue plus a blue pen stroke at 0.5 µm/px
  """
  directory.mkdir(parents=True, exist_ok=True)
  image40, mask40 = tissue_image(2048, 2560, seed=1)
  write_pyramidal_tiff(directory / "slide40x.tif", image40, mpp=0.25, min_level_size=1000)
  write_pyramidal_tiff(directory / "slide40x_flat.tif", image40, mpp=0.25,
                       min_level_size=10**9)
  np.save(directory / "slide40x_mask.npy", mask40)
  image20, mask20 = tissue_image(1536, 2048, seed=2)
  write_pyramidal_tiff(directory / "slide20x.tif", image20, mpp=0.5)
  np.save(directory / "slide20x_mask.npy", mask20)
  write_pyramidal_tiff(directory / "nompp.tif", image20, mpp=None)
  write_pyramidal_tiff(directory / "white.tif", np.full((1024, 1024, 3), 246, np.uint8), mpp=0.5)
  image_pen, _ = tissue_image(1536, 2048, seed=3, pen=True)
  write_pyramidal_tiff(directory / "pen.tif", image_pen, mpp=0.5)
  return directory


def region_grid(tissue_by_cell: dict[tuple[int, int], dict[int, float]], side: int):
  """A demo_questions.SlideRegions of side x side regions, all stroma except where
  ``tissue_by_cell`` says ((col, row) -> {tissue type: share})."""
  from data_prep import demo_questions  # noqa: PLC0415
  stroma = demo_questions.TISSUES.index("stroma")
  cells, fractions = [], []
  for row in range(side):
    for col in range(side):
      share = np.zeros(len(demo_questions.TISSUES))
      share[stroma] = 1.0
      for kind, value in tissue_by_cell.get((col, row), {}).items():
        share[kind] = value
        share[stroma] -= value
      cells.append((col, row))
      fractions.append(share)
  cells = np.array(cells)
  return demo_questions.SlideRegions(np.array(fractions),
                                     demo_questions.relative_positions(cells, cells))
