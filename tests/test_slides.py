import numpy as np
import pytest

from pathflip_jax.data import slides, tiling
from pathflip_jax.data.pyramid_tiff import write_pyramidal_tiff


def test_opens_real_aperio_slide(cmu_slide):
  with slides.Slide(cmu_slide) as slide:
    info = slide.info
    assert (info.width, info.height) == (2220, 2967)
    assert info.mpp == pytest.approx(0.499)
    assert info.mpp_source == "metadata"
    assert len(info.levels) == 1
    region = slide.read_region(1024, 1536, 256, 256, 256, 256)
  assert region.shape == (256, 256, 3) and region.dtype == np.uint8
  assert region.std() > 5  # real tissue texture, not a blank fill


def test_native_levels_and_level_reads(slide_dir):
  with slides.Slide(slide_dir / "slide40x.tif") as slide:
    assert [lv.downsample for lv in slide.info.levels] == [1.0, 2.0]
    assert slide.info.level_mpp(1) == pytest.approx(0.5)
    assert slide.best_level(2.0) == 1 and slide.best_level(1.9) == 0
    level1 = slide.read_level(512, 512, 512, 512, level=1)
    level0 = slide.read_level(512, 512, 512, 512, level=0)
  assert level1.shape == (256, 256, 3) and level0.shape == (512, 512, 3)
  # Level 1 is level 0 box-averaged when written; JPEG keeps them close.
  halved = level0.reshape(256, 2, 256, 2, 3).mean(axis=(1, 3))
  assert np.abs(halved - level1).mean() < 4


def test_region_matches_written_pixels(tmp_path):
  rng = np.random.default_rng(0)
  image = np.kron(rng.integers(0, 255, (32, 48, 3)), np.ones((32, 32, 1))).astype(np.uint8)
  path = tmp_path / "blocks.tif"
  write_pyramidal_tiff(path, image, mpp=0.5, quality=95)
  with slides.Slide(path) as slide:
    region = slide.read_region(320, 96, 512, 256, 512, 256)
  assert np.abs(region.astype(int) - image[96:352, 320:832]).mean() < 3


@pytest.mark.parametrize("make, reason", [
    (lambda d: d / "absent.svs", slides.MISSING_FILE),
    (lambda d: _write(d / "notes.svs", b"this is a text file, not a slide\n"), slides.NOT_A_SLIDE),
    (lambda d: _write(d / "empty.tif", b""), slides.NOT_A_SLIDE),
])
def test_unusable_files_have_reasons(tmp_path, make, reason):
  with pytest.raises(slides.SlideError) as error:
    slides.Slide(make(tmp_path))
  assert error.value.reason == reason
  assert str(tmp_path) in error.value.message


def _write(path, data):
  path.write_bytes(data)
  return path


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95])
def test_truncated_slides_are_corrupt(cmu_slide, slide_dir, tmp_path, keep):
  for source in (cmu_slide, slide_dir / "slide20x.tif"):
    data = source.read_bytes()
    path = tmp_path / f"cut-{source.name}"
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(slides.SlideError) as error:
      slides.Slide(path)
    assert error.value.reason == slides.CORRUPT_SLIDE, error.value.message
    assert "truncated" in error.value.message or "damaged" in error.value.message


def test_missing_mpp_needs_manifest_or_flag(slide_dir):
  with pytest.raises(slides.SlideError) as error:
    slides.Slide(slide_dir / "nompp.tif")
  assert error.value.reason == slides.NO_MPP and "--fallback_mpp" in error.value.message
  with slides.Slide(slide_dir / "nompp.tif", fallback_mpp=0.5) as slide:
    assert slide.info.mpp == 0.5 and slide.info.mpp_source == "flag"
  with slides.Slide(slide_dir / "nompp.tif", mpp=0.47, fallback_mpp=0.5) as slide:
    assert slide.info.mpp == 0.47 and slide.info.mpp_source == "manifest"


def test_level_choice_by_mpp(slide_dir):
  params = tiling.TilingParams(target_mpp=0.5)
  with slides.Slide(slide_dir / "slide40x.tif") as slide:
    assert tiling.choose_level(slide.info, params) == (1, 0.5, False)
    # 0.25 is level 0 exactly; 1.0 is no level: read level 1 (0.5) and downsample.
    assert tiling.choose_level(slide.info, tiling.TilingParams(target_mpp=0.25)) == (0, 0.25, False)
    assert tiling.choose_level(slide.info, tiling.TilingParams(target_mpp=1.0)) == (1, 1.0, True)
  with slides.Slide(slide_dir / "slide40x_flat.tif") as slide:
    assert tiling.choose_level(slide.info, params) == (0, 0.5, True)
  with slides.Slide(slide_dir / "slide20x.tif") as slide:
    with pytest.raises(slides.SlideError) as error:
      tiling.choose_level(slide.info, tiling.TilingParams(target_mpp=0.25))
    assert error.value.reason == slides.MPP_TOO_COARSE


def test_mpp_within_tolerance_reads_native_level(cmu_slide):
  with slides.Slide(cmu_slide) as slide:
    level, patch_mpp, resampled = tiling.choose_level(slide.info, tiling.TilingParams())
  assert (level, resampled) == (0, False) and patch_mpp == pytest.approx(0.499)


def test_large_reads_go_band_by_band_with_the_same_result(slide_dir, monkeypatch):
  with slides.Slide(slide_dir / "slide40x_flat.tif") as slide:
    whole = slide.thumbnail(640)
    monkeypatch.setattr(slides, "_MAX_REGION_PIXELS", 2560 * 100)
    calls = []
    real = slide.read_level
    monkeypatch.setattr(slide, "read_level", lambda *a, **k: calls.append(a) or real(*a, **k))
    banded = slide.thumbnail(640)
  assert len(calls) > 10
  assert banded.shape == whole.shape == (512, 640, 3)
  assert np.abs(banded.astype(int) - whole).mean() < 1.5


def test_untiled_tiff_images_are_read_whole(tmp_path):
  import tifffile
  image = np.full((600, 800, 3), 250, np.uint8)
  image[100:500, 200:600] = (200, 120, 170)
  path = tmp_path / "export.tif"
  tifffile.imwrite(path, image, resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
  with slides.Slide(path) as slide:
    assert (slide.info.width, slide.info.height) == (800, 600)
    assert slide.info.mpp == pytest.approx(0.5)
    assert np.array_equal(slide.read_region(200, 100, 64, 64, 64, 64),
                          image[100:164, 200:264])
  tifffile.imwrite(tmp_path / "nores.tif", image)
  with pytest.raises(slides.SlideError) as error:
    slides.Slide(tmp_path / "nores.tif")
  assert error.value.reason == slides.NO_MPP
