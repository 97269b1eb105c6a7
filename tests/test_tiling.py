import numpy as np
import pytest
import tifffile

from pathflip_jax.data import records, slides, tiling


def _all_records(slide, plan, params):
  return [r for b in range(plan.num_batches) for r in tiling.read_batch(slide, plan, b, params)]


def test_40x_slide_tiled_at_half_micron_from_level_1(slide_dir):
  params = tiling.TilingParams(passthrough=False)
  with slides.Slide(slide_dir / "slide40x.tif") as slide:
    plan, _ = tiling.plan_slide(slide, "s40", params)
    assert (plan.level, plan.resampled, plan.patch_mpp) == (1, False, 0.5)
    assert plan.patch_size_level0 == 512 and plan.step_level0 == 512
    assert (plan.grid_cols, plan.grid_rows) == (5, 4)
    patches = _all_records(slide, plan, params)
    level0 = slide.read_level(0, 0, 2560, 2048, level=0)
  assert len(patches) == plan.num_patches > 0
  for patch in patches:
    records.PATCH.check(patch)
    x, y = patch["x"], patch["y"]
    assert (x, y) == (patch["col"] * 512, patch["row"] * 512)   # level-0 pixels
    pixels = tiling.decode_jpeg(patch["jpeg"]).astype(np.float32)
    expected = level0[y:y + 512, x:x + 512].reshape(256, 2, 256, 2, 3).mean(axis=(1, 3))
    assert np.abs(pixels - expected).mean() < 5, (x, y)


def test_flat_40x_slide_is_resampled_to_same_grid(slide_dir):
  params = tiling.TilingParams(passthrough=False)
  with slides.Slide(slide_dir / "slide40x.tif") as slide:
    pyramid_plan, _ = tiling.plan_slide(slide, "a", params)
    pyramid = _all_records(slide, pyramid_plan, params)
  with slides.Slide(slide_dir / "slide40x_flat.tif") as slide:
    flat_plan, _ = tiling.plan_slide(slide, "b", params)
    flat = _all_records(slide, flat_plan, params)
  assert flat_plan.resampled and flat_plan.level == 0 and flat_plan.patch_size_level0 == 512
  assert [(p["x"], p["y"]) for p in flat] == [(p["x"], p["y"]) for p in pyramid]
  diff = [np.abs(tiling.decode_jpeg(a["jpeg"]).astype(int) - tiling.decode_jpeg(b["jpeg"])).mean()
          for a, b in zip(flat, pyramid)]
  assert max(diff) < 6


def test_patch_count_matches_tissue_grid(slide_dir):
  params = tiling.TilingParams()
  truth = np.load(slide_dir / "slide20x_mask.npy")
  with slides.Slide(slide_dir / "slide20x.tif") as slide:
    plan, pictures = tiling.plan_slide(slide, "s20", params)
  # Ground truth: share of each 256-px cell that is tissue in the generator's own mask.
  cells = truth[:6 * 256, :8 * 256].reshape(6, 256, 8, 256).mean(axis=(1, 3))
  true_cells = {(c, r) for r, c in zip(*np.nonzero(cells >= 0.25))}
  found = {tuple(cell) for cell in plan.cells}
  assert len(found ^ true_cells) <= 2, (sorted(found - true_cells), sorted(true_cells - found))
  # Batches partition the cells.
  assert plan.batch_starts[0] == 0 and plan.batch_starts[-1] == plan.num_patches
  assert np.all(np.diff(plan.batch_starts) > 0)
  assert pictures.polygons and pictures.thumbnail.shape[2] == 3


def test_real_slide_grid(cmu_slide):
  params = tiling.TilingParams()
  with slides.Slide(cmu_slide) as slide:
    plan, pictures = tiling.plan_slide(slide, "cmu", params)
    patches = _all_records(slide, plan, params)
  assert (plan.grid_cols, plan.grid_rows) == (8, 11)
  assert len(patches) == plan.num_patches == len(set((p["x"], p["y"]) for p in patches))
  assert 20 <= plan.num_patches <= 60
  assert not plan.passthrough  # 240-px native tiles do not coincide with 256-px patches
  image = tiling.render_thumbnail(plan, pictures)
  assert max(image.size) == 1024


def test_passthrough_bytes_decode_like_the_slide(slide_dir):
  on = tiling.TilingParams(passthrough=True)
  off = tiling.TilingParams(passthrough=False)
  with slides.Slide(slide_dir / "slide20x.tif") as slide:
    plan_on, _ = tiling.plan_slide(slide, "s", on)
    plan_off, _ = tiling.plan_slide(slide, "s", off)
    copied = _all_records(None, plan_on, on)   # no decoding: no open slide needed
    decoded = _all_records(slide, plan_off, off)
  assert plan_on.passthrough and not plan_off.passthrough
  assert [(p["x"], p["y"]) for p in copied] == [(p["x"], p["y"]) for p in decoded]
  with tifffile.TiffFile(slide_dir / "slide20x.tif") as tif:
    level0 = tif.pages[0].asarray()
  for patch in copied[:10]:
    pixels = tiling.decode_jpeg(patch["jpeg"])
    assert pixels.shape == (256, 256, 3)
    expected = level0[patch["y"]:patch["y"] + 256, patch["x"]:patch["x"] + 256]
    assert np.array_equal(pixels, expected)  # the file's own tile, bit for bit


def test_passthrough_of_rgb_coded_aperio_tiles(cmu_slide):
  """Aperio stores RGB-coded JPEG tiles with shared tables; the copy must decode to the same
  colours as the slide reader, which needs the tables spliced in and the Adobe marker."""
  params = tiling.TilingParams(patch_size=240, passthrough=True)
  with slides.Slide(cmu_slide) as slide:
    plan, _ = tiling.plan_slide(slide, "cmu", params)
    assert plan.passthrough
    copied = tiling.read_batch(None, plan, 0, params)[:5]
    for patch in copied:
      region = slide.read_level(patch["x"], patch["y"], 240, 240, 0)
      assert np.abs(tiling.decode_jpeg(patch["jpeg"]).astype(int) - region).mean() < 1.0


def test_plan_errors(slide_dir):
  with slides.Slide(slide_dir / "white.tif") as slide:
    with pytest.raises(slides.SlideError) as error:
      tiling.plan_slide(slide, "w", tiling.TilingParams())
  assert error.value.reason == slides.NO_TISSUE
  with pytest.raises(ValueError, match="min_tissue_fraction"):
    tiling.TilingParams(min_tissue_fraction=2).validate()
