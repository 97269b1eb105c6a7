"""Text-prompted heatmaps of a slide: a score per patch, a PNG overlay, QuPath GeoJSON.

For each text query the alignment model scores every patch (``PathFlip.patch_heatmap``: each
region's share of the query's match with its text-conditioned region embedding, times the region
Q-Former's attention over that region's patches, DESIGN.md section 2.4). Patches are addressed
by their level-0 top-left corners, so the same scores draw over a thumbnail
(``render_overlay``) and export to QuPath as detections (``geojson``) whatever the slide's
magnification.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from pathflip_jax.data import qupath, tissue

# How a region scores a text (``PathFlip.patch_heatmap``): its share of the text's match with its
# text-conditioned embedding (the default, what localization is evaluated with), or the
# text-conditioned attention's weights alone.
METHODS = ("contribution", "attention")


class HeatmapScorer:
  """Patch scores [t, n] of one slide example for token rows of text queries.

  One compiled function per padded slide length (the example buckets keep these few).
  """

  def __init__(self, method: str = METHODS[0]):
    if method not in METHODS:
      raise ValueError(f"heatmap method {method!r}: expected one of {METHODS}")
    self.method = method

    @jax.jit
    def score(graphdef, state, example, tokens_tl):
      model = nnx.merge(graphdef, state)
      text_te = model.encode_texts(tokens_tl)
      batch = jax.tree.map(lambda x: x[None], example)
      return model.patch_heatmap(batch, text_te[None], method=self.method)[0]

    self._score = score

  def __call__(self, model: nnx.Module, example: Mapping[str, np.ndarray],
               tokens_tl: np.ndarray) -> np.ndarray:
    """``example``: one slide from ``slide_examples.build_example`` (evaluation form, all
    patches in order); returns float32 [t, number of real patches]."""
    keys = ("features", "patch_valid", "region_index", "region_patch_valid", "region_valid",
            "region_pos")
    graphdef, state = nnx.split(model)
    scores = self._score(graphdef, state, {k: jnp.asarray(example[k]) for k in keys},
                         jnp.asarray(tokens_tl))
    n = int(np.asarray(example["patch_valid"]).sum())
    return np.asarray(jax.device_get(scores), np.float32)[:, :n]


def normalise(scores_n: np.ndarray) -> np.ndarray:
  """Scores -> [0, 1] over a slide's patches by min-max (constant scores -> 0)."""
  scores_n = np.asarray(scores_n, np.float64)
  if not scores_n.size:
    return np.zeros_like(scores_n, np.float32)
  low, high = float(scores_n.min()), float(scores_n.max())
  if high <= low:
    return np.zeros_like(scores_n, np.float32)
  return ((scores_n - low) / (high - low)).astype(np.float32)


# A dark-to-bright ramp (navy, violet, crimson, orange, pale yellow) whose lightness rises
# monotonically, so the heat reads in greyscale prints too.
_RAMP = np.array([[12, 7, 60], [92, 22, 120], [186, 44, 86], [243, 128, 36], [252, 240, 160]],
                 np.float64)


def colormap(values: np.ndarray) -> np.ndarray:
  """Values in [0, 1] -> RGB uint8 [..., 3] along the ramp."""
  v = np.clip(np.asarray(values, np.float64), 0.0, 1.0) * (len(_RAMP) - 1)
  low = np.minimum(np.floor(v).astype(int), len(_RAMP) - 2)
  frac = (v - low)[..., None]
  return np.round(_RAMP[low] * (1 - frac) + _RAMP[low + 1] * frac).astype(np.uint8)


def _font(size: int) -> ImageFont.ImageFont:
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow < 10.1 has one bitmap size
    return ImageFont.load_default()


def render_overlay(thumbnail_hw3: np.ndarray, downsample: float, coords_n2: np.ndarray,
                   patch_size_level0: float, scores_n: np.ndarray, title: str,
                   alpha: float = 0.55, label: str = "score") -> Image.Image:
  """The heatmap over the slide thumbnail, with the query as the title and a colour bar.

  ``downsample``: level-0 pixels per thumbnail pixel. Scores are drawn min-max normalised per
  slide (the colour bar names the raw range); glass and untiled tissue keep the thumbnail.
  """
  thumb = np.asarray(thumbnail_hw3, np.uint8)[..., :3]
  h, w = thumb.shape[:2]
  coords_n2 = np.asarray(coords_n2, np.float64).reshape(-1, 2)
  scores_n = np.asarray(scores_n, np.float64).reshape(-1)
  if len(coords_n2) != len(scores_n):
    raise ValueError(f"{len(coords_n2)} patch coordinates but {len(scores_n)} scores")
  heat = np.zeros((h, w), np.float64)
  weight = np.zeros((h, w), np.float64)
  norm = normalise(scores_n)
  side = patch_size_level0 / downsample
  for (x, y), value in zip(coords_n2 / downsample, norm):
    x0, y0 = int(np.floor(x)), int(np.floor(y))
    x1, y1 = max(x0 + 1, int(np.ceil(x + side))), max(y0 + 1, int(np.ceil(y + side)))
    heat[max(y0, 0):y1, max(x0, 0):x1] += value
    weight[max(y0, 0):y1, max(x0, 0):x1] += 1.0
  covered = weight > 0
  blended = thumb.astype(np.float64)
  mean_heat = np.where(covered, heat / np.maximum(weight, 1.0), 0.0)
  blended[covered] = ((1 - alpha) * blended[covered]
                      + alpha * colormap(mean_heat[covered]).astype(np.float64))
  body = Image.fromarray(np.round(blended).astype(np.uint8))

  # Canvas: title band above, colour bar to the right.
  font_size = max(12, min(24, w // 30))
  font = _font(font_size)
  bar_w, margin = max(14, w // 40), 8
  label_w = font_size * 6
  title_h = font_size * 2 + margin
  canvas = Image.new("RGB", (w + 3 * margin + bar_w + label_w, h + title_h + margin), "white")
  canvas.paste(body, (margin, title_h))
  draw = ImageDraw.Draw(canvas)
  draw.text((margin, margin), _ellipsis(title, draw, font, canvas.width - 2 * margin),
            fill="black", font=font)
  bar_x = w + 2 * margin
  ramp = colormap(np.linspace(1.0, 0.0, h))[:, None, :].repeat(bar_w, axis=1)
  canvas.paste(Image.fromarray(ramp), (bar_x, title_h))
  draw.rectangle([bar_x, title_h, bar_x + bar_w - 1, title_h + h - 1], outline="black")
  low, high = (float(scores_n.min()), float(scores_n.max())) if scores_n.size else (0.0, 0.0)
  text_x = bar_x + bar_w + 4
  draw.text((text_x, title_h), f"{high:.3g}", fill="black", font=font)
  draw.text((text_x, title_h + h - font_size - 2), f"{low:.3g}", fill="black", font=font)
  draw.text((text_x, title_h + h // 2 - font_size // 2), label, fill="black", font=font)
  return canvas


def _ellipsis(text: str, draw: ImageDraw.ImageDraw, font, width: int) -> str:
  if draw.textlength(text, font=font) <= width:
    return text
  while text and draw.textlength(text + "...", font=font) > width:
    text = text[:-1]
  return text + "..."


def geojson(coords_n2: np.ndarray, patch_size_level0: float, scores_n: np.ndarray,
            query: str, color: tuple[int, int, int] = (230, 80, 30),
            min_score: float | None = None) -> dict:
  """QuPath detections: one square per patch (level-0 pixels) classified as ``query``, with
  measurements ``score`` (raw) and ``score_normalised`` (min-max over the slide). Patches under
  ``min_score`` (normalised) are left out when it is given."""
  coords_n2 = np.asarray(coords_n2, np.float64).reshape(-1, 2)
  scores_n = np.asarray(scores_n, np.float64).reshape(-1)
  norm = normalise(scores_n)
  features = []
  s = float(patch_size_level0)
  for (x, y), raw, value in zip(coords_n2, scores_n, norm):
    if min_score is not None and value < min_score:
      continue
    ring = [(x, y), (x + s, y), (x + s, y + s), (x, y + s)]
    features.append(qupath.polygon_feature(
        [ring], object_type="detection", name=query, color=color,
        measurements={"score": float(raw), "score_normalised": float(value)}))
  return qupath.feature_collection(features)


def contour_geojson(coords_n2: np.ndarray, patch_size_level0: float, scores_n: np.ndarray,
                    query: str, threshold: float = 0.5,
                    color: tuple[int, int, int] = (230, 80, 30), smooth: int = 4) -> dict:
  """QuPath annotations: the outlines (with holes) of the connected areas whose patches score at
  least ``threshold`` (min-max normalised over the slide), in level-0 pixels. Each patch becomes
  ``smooth`` x ``smooth`` mask pixels so outlines follow the patch edges without staircases of
  single pixels. Measurements: the threshold, the area's patch count and mean normalised score."""
  coords_n2 = np.asarray(coords_n2, np.float64).reshape(-1, 2)
  norm = normalise(scores_n)
  if not len(coords_n2):
    return qupath.feature_collection([])
  origin = coords_n2.min(axis=0)
  cells = np.round((coords_n2 - origin) / patch_size_level0).astype(int)      # (col, row)
  shape = (cells[:, 1].max() + 1, cells[:, 0].max() + 1)
  above = np.zeros(shape, bool)
  above[cells[:, 1], cells[:, 0]] = norm >= threshold
  scale = patch_size_level0 / smooth
  labels, count = ndimage.label(above)
  patch_label = labels[cells[:, 1], cells[:, 0]]
  features = []
  for k in range(1, count + 1):
    mask = np.kron(labels == k, np.ones((smooth, smooth), bool))
    members = patch_label == k
    for rings in tissue.tissue_polygons(mask, scale, scale, tolerance_px=0.5):
      features.append(qupath.polygon_feature(
          [[(float(x), float(y)) for x, y in ring + origin] for ring in rings],
          object_type="annotation", name=query, color=color,
          measurements={"threshold": float(threshold), "patches": float(members.sum()),
                        "mean_score_normalised": float(norm[members].mean())}))
  return qupath.feature_collection(features)


def query_colors(count: int) -> list[tuple[int, int, int]]:
  """Distinct classification colours for ``count`` queries (QuPath shows them per class)."""
  palette = [(230, 80, 30), (40, 120, 220), (40, 170, 80), (200, 60, 180), (230, 190, 30),
             (40, 190, 200), (120, 80, 40), (120, 120, 120)]
  return [palette[i % len(palette)] for i in range(count)]


def safe_name(text: str, limit: int = 60) -> str:
  """A file-name stem for a query ("Invasive carcinoma!" -> "invasive_carcinoma")."""
  stem = "".join(c.lower() if c.isalnum() else "_" for c in text).strip("_")
  while "__" in stem:
    stem = stem.replace("__", "_")
  return stem[:limit].rstrip("_") or "query"


def write_outputs(output_dir: str, slide_id: str, queries: Sequence[str],
                  scores_tn: np.ndarray, coords_n2: np.ndarray, patch_size_level0: float,
                  thumbnail_hw3: np.ndarray, downsample: float) -> list[dict[str, str]]:
  """Per query under ``output_dir``: the PNG overlay, the patch detections (GeoJSON) and the
  outlines of the areas scoring at least half the slide's range (``_contours.geojson``);
  returns their paths per query."""
  os.makedirs(output_dir, exist_ok=True)
  written = []
  for query, scores_n, color in zip(queries, scores_tn, query_colors(len(queries))):
    stem = f"{slide_id}__{safe_name(query)}"
    png = os.path.join(output_dir, f"{stem}.png")
    render_overlay(thumbnail_hw3, downsample, coords_n2, patch_size_level0, scores_n,
                   f"{slide_id}: \"{query}\"").save(png)
    path = os.path.join(output_dir, f"{stem}.geojson")
    qupath.write_geojson(path, geojson(coords_n2, patch_size_level0, scores_n, query, color))
    contours = os.path.join(output_dir, f"{stem}_contours.geojson")
    qupath.write_geojson(contours, contour_geojson(coords_n2, patch_size_level0, scores_n,
                                                   query, color=color))
    written.append({"query": query, "png": png, "geojson": path, "contours": contours})
  return written
