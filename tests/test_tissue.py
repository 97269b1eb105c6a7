import json

import numpy as np
import pytest

from pathflip_jax.data import qupath, tissue
from tests import synthetic


def test_mask_finds_tissue_and_not_glass():
  image, truth = synthetic.tissue_image(384, 512, seed=0)
  mask = tissue.tissue_mask(image)
  agreement = (mask == truth).mean()
  assert agreement > 0.97
  assert not tissue.tissue_mask(np.full((200, 300, 3), 247, np.uint8)).any()


def test_blank_slide_with_jpeg_noise_stays_blank():
  rng = np.random.default_rng(0)
  noisy = np.clip(246 + rng.normal(0, 2, (256, 256, 3)), 0, 255).astype(np.uint8)
  assert tissue.tissue_mask(noisy).mean() < 0.001


# Where synthetic.tissue_image(384, 512, pen=True) draws its horizontal pen stroke.
PEN_STROKE = (slice(int(0.12 * 384) - 2, int(0.12 * 384) + 2), slice(60, 450))


def test_pen_ink_is_not_tissue():
  image, truth = synthetic.tissue_image(384, 512, seed=1, pen=True)
  mask = tissue.tissue_mask(image)
  assert mask[PEN_STROKE].mean() < 0.05
  unfiltered = tissue.tissue_mask(image, tissue.TissueParams(pen_filter=False))
  assert unfiltered[PEN_STROKE].mean() > 0.9


@pytest.mark.parametrize("colour", [(105, 90, 209), (85, 83, 130), (60, 45, 110)])
def test_dense_haematoxylin_is_tissue_not_ink(colour):
  """Blue-violet tissue beside a blue pen stroke: only the stroke is ink. The first two colours
  are a lymph node of the ``--seed 7`` demo cohort as the tiler's thumbnail sees it (hue 247 and
  241), which the pen filter once took for ink, leaving the slide with no tissue at all; the
  third is dark nuclei."""
  image, truth = synthetic.tissue_image(384, 512, seed=1, pen=True)
  image[truth] = colour
  mask = tissue.tissue_mask(image)
  assert mask[truth].mean() > 0.95
  assert mask[PEN_STROKE].mean() < 0.05


def test_otsu_splits_two_modes():
  values = np.concatenate([np.full(500, 0.02), np.full(300, 0.4)])
  threshold = tissue.otsu_threshold(values)
  assert 0.02 < threshold < 0.4


def test_box_fractions_exact_on_known_mask():
  mask = np.zeros((10, 10), bool)
  mask[:5, :] = True
  fractions = tissue.box_fractions(mask, np.array([0, 0, 0]), np.array([0, 5, 3]),
                                   np.array([10, 10, 10]), np.array([5, 10, 7]))
  np.testing.assert_allclose(fractions, [1.0, 0.0, 0.5])


def test_polygons_are_in_scaled_frame_with_holes():
  mask = np.zeros((40, 60), bool)
  mask[10:30, 10:50] = True
  mask[15:25, 20:30] = False  # a hole
  polygons = tissue.tissue_polygons(mask, scale_x=4.0, scale_y=2.0, tolerance_px=0.5)
  assert len(polygons) == 1 and len(polygons[0]) == 2
  outer, hole = polygons[0]
  # x: pixel edges 10..50, times 4; y: 10..30, times 2 (corners may be cut by half a pixel).
  assert outer[:, 0].min() == pytest.approx(40, abs=2)
  assert outer[:, 0].max() == pytest.approx(200, abs=2)
  assert outer[:, 1].min() == pytest.approx(20, abs=1)
  assert outer[:, 1].max() == pytest.approx(60, abs=1)
  assert 78 <= hole[:, 0].min() and hole[:, 0].max() <= 122


def test_qupath_geojson_layout(tmp_path):
  feature = qupath.polygon_feature([[(0, 0), (10, 0), (10, 10)]], name="Tissue",
                                   color=(1, 2, 3), measurements={"score": 0.5})
  path = tmp_path / "a.geojson"
  qupath.write_geojson(path, qupath.feature_collection([feature]))
  data = json.loads(path.read_text())
  assert data["type"] == "FeatureCollection"
  ring = data["features"][0]["geometry"]["coordinates"][0]
  assert ring[0] == ring[-1] and len(ring) == 4  # closed
  props = data["features"][0]["properties"]
  assert props["objectType"] == "annotation"
  assert props["classification"] == {"name": "Tissue", "color": [1, 2, 3]}
  assert props["measurements"] == {"score": 0.5}
