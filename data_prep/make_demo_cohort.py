r"""Generates the built-in demo cohort: synthetic H&E slides with captions, masks and labels.

Its questions are written after tiling, by ``data_prep.demo_questions``: their answers are defined
on the tiled patch grid (what the instruct stage's decoder sees).

  python -m data_prep.make_demo_cohort --output_dir D [--num_slides N] [--seed 0] \
      [--size small|medium|study] [--workers N]

Writes (see WORKSPACE.md):
  D/slides/<slide_id>.tif            pyramidal JPEG TIFF, mpp in the resolution tags
  D/masks/<slide_id>.png             tissue-type label map (one pixel = ``mask_um`` µm) and
  D/masks/<slide_id>_regions.png     region-id map (same grid; 0 = no tissue, k = region "rk")
  D/masks/<slide_id>.json            its legend, scale to level 0 and the region-id map's regions
  D/annotations/<slide_id>.geojson   every region as QuPath annotations, level-0 pixels
  D/manifest.jsonl                   slide_id, path, caption, labels, split (tile_slides input)
  D/captions.jsonl                   caption sentences, each with the region it describes
  D/contact_sheet.png, D/thumbnails.png, D/cohort.json
  D/tfds/demo_cohort/1.0.0/          the slide-level records as a TFDS ArrayRecord dataset

Deterministic for a seed (slide i draws from the generator seeded [seed, i]). Sizes:

  small   48 slides of 2-4k px a side (1.1-1.9 mm; ~30-40 tissue patches of 256 px at
          0.5 µm/px), split about 60/20/20 by patient: the quickstart's demo
  medium  48 slides of 8-18k px (4-9 mm)
  study   420 slides of 2.3-3.2 mm (median ~180 tissue patches), each with 4-10 distinct regions
          (several lesions per type, none painted over another), split 45/15/40 by patient;
          measured: 1053 s with --workers 2 on 2 shared cores, then 48 s to tile

The quickstart's stage times (docs/results.md) say how long the default cohort takes.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import sys
import time
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from pathflip_jax import progress as progress_lib
from pathflip_jax.data import demo_cohort_tfds, qupath, synthetic_he as he, tissue
from pathflip_jax.data.pyramid_tiff import write_pyramidal_tiff

DIAGNOSES = he.DIAGNOSES
MASK_UM = 8.0        # µm per pixel of the label maps


@dataclasses.dataclass
class Region:
  region_id: str
  tissue: int
  area_um2: float
  centroid: tuple[float, float]      # level-0 (x, y)
  bbox: tuple[int, int, int, int]    # level-0 x0, y0, x1, y1
  location: str
  size_word: str


def _blob(rng, shape, centre, radius, roughness=0.35, exponent: float = 2.0):
  """A blob of label-map pixels: a disk (``exponent`` > 2: a rounded square, a superellipse)
  whose radius is modulated by smooth noise."""
  yy, xx = np.ogrid[:shape[0], :shape[1]]
  if exponent == 2.0:
    d = np.hypot(yy - centre[0], xx - centre[1]) / max(radius, 1.0)
  else:
    d = (np.abs(yy - centre[0]) ** exponent + np.abs(xx - centre[1]) ** exponent) ** (
        1.0 / exponent) / max(radius, 1.0)
  noise = he.smooth_noise(rng, shape, max(radius / 2.5, 2.0))
  return d < 1.0 + roughness * noise


def _location_words(cx: float, cy: float, bbox: tuple[float, float, float, float],
                    near_edge: bool) -> str:
  x0, y0, x1, y1 = bbox
  fx = (cx - x0) / max(x1 - x0, 1)
  fy = (cy - y0) / max(y1 - y0, 1)
  vertical = "upper" if fy < 0.36 else "lower" if fy > 0.64 else "central"
  horizontal = "left" if fx < 0.36 else "right" if fx > 0.64 else ""
  if vertical == "central" and not horizontal:
    words = "in the centre"
  elif vertical == "central":
    words = f"on the {horizontal} side"
  else:
    words = f"in the {vertical} {horizontal}".rstrip() + (" part" if not horizontal else "")
  return words + (", at the periphery" if near_edge else "")


# Every place _location_words can name (before ", at the periphery") and every _size_word: the
# captions' words, which data_prep.demo_questions' answers use too.
PLACES = ("in the upper left", "in the upper right", "in the lower left", "in the lower right",
          "in the centre", "on the left side", "on the right side", "in the upper part",
          "in the lower part")
SIZE_WORDS = ("small", "medium-sized", "large")


def _size_word(area_mm2: float) -> str:
  return "small" if area_mm2 < 0.08 else "medium-sized" if area_mm2 < 0.3 else "large"


# Per diagnosis, the lesions drawn on the background tissue: (type, min count, max count, and
# the blob radius range in units of 2 µm).
LESIONS = {
    "benign": [(he.GLANDS, 1, 3, 90, 180), (he.LYMPHOCYTES, 0, 1, 50, 90), (he.FAT, 0, 1, 80, 160)],
    "carcinoma": [(he.TUMOUR, 1, 2, 120, 220), (he.GLANDS, 0, 1, 70, 130),
                  (he.FAT, 0, 1, 80, 150)],
    "carcinoma with necrosis": [(he.TUMOUR, 1, 2, 150, 240), (he.NECROSIS, 1, 1, 60, 110)],
    "lymph node metastasis": [(he.TUMOUR, 1, 2, 80, 160), (he.FAT, 0, 1, 80, 140)],
}
# The study cohort: several lesions of each kind, each many patches wide, and every slide with
# three or four tissue types (so that presence and absence questions both have three options of
# the other kind). Carcinomas never show lymphocytes, so a lymphoid background still means a node.
STUDY_LESIONS = {
    "benign": [(he.GLANDS, 2, 3, 110, 200), (he.LYMPHOCYTES, 1, 2, 80, 140),
               (he.FAT, 0, 2, 100, 180)],
    "carcinoma": [(he.TUMOUR, 2, 3, 130, 240), (he.GLANDS, 1, 2, 90, 160),
                  (he.FAT, 0, 2, 100, 170)],
    "carcinoma with necrosis": [(he.TUMOUR, 2, 3, 160, 260), (he.NECROSIS, 1, 3, 70, 120),
                                (he.FAT, 0, 1, 100, 170)],
    "lymph node metastasis": [(he.TUMOUR, 2, 3, 110, 200), (he.FAT, 1, 2, 100, 170)],
}


@dataclasses.dataclass(frozen=True)
class CohortSize:
  """What ``--size`` sets.

  Attributes:
    side_um: level-0 side range of a slide in µm (40x slides cover 0.6 of it).
    num_slides: the default ``--num_slides``.
    split_pattern: per diagnosis, patients (in a random order) take these splits in turn.
    lesions: the lesions of each diagnosis (``LESIONS``' layout).
    tissue_radius: range of a tissue piece's radius, as a share of the slide's short side.
    tissue_exponent: 2 draws round pieces; larger values rounder squares that fill more of
      their bounding box (lesions then reach its corners, so every place word gets used).
    exclusive: lesions other than necrosis only cover background tissue, so each stays one
      distinct region instead of being cut up by later ones.
    per_component: render each connected piece of a tissue type over its own box (faster on
      large slides with scattered lesions; another texture draw, so not for ``small``).
  """

  side_um: tuple[float, float]
  num_slides: int = 48
  split_pattern: tuple[str, ...] = ("train", "test", "val", "train", "train")
  lesions: dict = dataclasses.field(default_factory=lambda: LESIONS)
  tissue_radius: tuple[float, float] = (0.28, 0.4)
  tissue_exponent: float = 2.0
  exclusive: bool = False
  per_component: bool = False


SIZES = {
    "small": CohortSize(side_um=(1100.0, 1900.0)),
    "medium": CohortSize(side_um=(4000.0, 9000.0)),
    # About 45/15/40 train/val/test by patient: 9, 3 and 8 of every 20 patients of a diagnosis.
    "study": CohortSize(
        side_um=(2300.0, 3200.0), num_slides=420,
        split_pattern=("train", "test", "val", "train", "test", "train", "test", "train", "val",
                       "test", "train", "test", "train", "test", "train", "val", "test",
                       "train", "test", "train"),
        lesions=STUDY_LESIONS, tissue_radius=(0.4, 0.46), tissue_exponent=3.0, exclusive=True,
        per_component=True),
}


def layout(rng: np.random.Generator, diagnosis: str, side_um: tuple[float, float],
           size: CohortSize = SIZES["small"]):
  """Label map (tissue type per MASK_UM pixel) and region-id map of one slide."""
  h, w = (int(s / MASK_UM) for s in side_um)
  label = np.zeros((h, w), np.uint8)
  region = np.zeros((h, w), np.int16)
  pieces = int(rng.integers(1, 3))
  tissue_mask = np.zeros((h, w), bool)
  for p in range(pieces):
    centre = (rng.uniform(0.35, 0.65) * h, (p + 0.5) / pieces * w + rng.normal(0, 0.04 * w))
    radius = rng.uniform(*size.tissue_radius) * min(h, w / pieces)
    tissue_mask |= _blob(rng, (h, w), centre, radius, roughness=0.3,
                         exponent=size.tissue_exponent)
  background = he.LYMPHOCYTES if diagnosis == "lymph node metastasis" else he.STROMA
  label[tissue_mask] = background
  region[tissue_mask] = 1
  next_id = 2
  for kind, lo, hi, rmin, rmax in size.lesions[diagnosis]:
    for _ in range(int(rng.integers(lo, hi + 1))):
      ys, xs = np.nonzero(tissue_mask & (label == background))
      if not len(ys):
        break
      pick = int(rng.integers(len(ys)))
      centre = (ys[pick], xs[pick])
      if kind == he.NECROSIS:  # necrosis sits inside a tumour
        ty, tx = np.nonzero(label == he.TUMOUR)
        if len(ty):
          pick = int(rng.integers(len(ty)))
          centre = (ty[pick], tx[pick])
      blob = _blob(rng, (h, w), centre, rng.uniform(rmin, rmax) / MASK_UM * 2.0) & tissue_mask
      if kind == he.NECROSIS:
        blob &= label == he.TUMOUR
      elif size.exclusive:
        blob &= label == background
      blob &= label != he.NECROSIS
      if blob.sum() < 20:
        continue
      label[blob] = kind
      region[blob] = next_id
      next_id += 1
  return label, region, background


def render_slide(label: np.ndarray, mpp: float, stain: he.Stain,
                 rng: np.random.Generator, per_component: bool = False) -> np.ndarray:
  """Level-0 RGB pixels for a label map (MASK_UM per label pixel).

  Each tissue type's texture is rendered over the bounding box of its pixels, or with
  ``per_component`` over the box of each connected piece of it: several lesions of a type
  spread over a large slide then cost their own area, not the whole slide's."""
  factor = MASK_UM / mpp
  h, w = int(label.shape[0] * factor), int(label.shape[1] * factor)
  # Boundaries wander by a few µm instead of stepping by MASK_UM: a jittered nearest lookup at
  # 2 µm per pixel, then a plain nearest zoom to level 0.
  mid_factor = MASK_UM / 2.0
  mh, mw = int(label.shape[0] * mid_factor), int(label.shape[1] * mid_factor)
  jitter = 2.0 * mid_factor / MASK_UM * 2.0
  dy = he.smooth_noise(rng, (mh, mw), 6) * jitter
  dx = he.smooth_noise(rng, (mh, mw), 6) * jitter
  iy = np.clip(((np.arange(mh, dtype=np.float32)[:, None] + dy) / mid_factor).astype(np.int32),
               0, label.shape[0] - 1)
  ix = np.clip(((np.arange(mw, dtype=np.float32)[None, :] + dx) / mid_factor).astype(np.int32),
               0, label.shape[1] - 1)
  full = np.asarray(Image.fromarray(label[iy, ix]).resize((w, h), Image.Resampling.NEAREST))
  image = np.empty((h, w, 3), np.uint8)
  image[:] = (244, 243, 246)
  for kind in np.unique(label):
    if kind == he.BACKGROUND:
      continue
    grown = ndimage.binary_dilation(label == kind, iterations=1)
    if per_component:
      pieces, _ = ndimage.label(grown)
      boxes = [(b[0].start, b[0].stop, b[1].start, b[1].stop)
               for b in ndimage.find_objects(pieces)]
    else:
      ys, xs = np.nonzero(grown)
      boxes = [(ys.min(), ys.max() + 1, xs.min(), xs.max() + 1)]
    for by0, by1, bx0, bx1 in boxes:
      y0, y1 = int(by0 * factor), min(h, int(by1 * factor))
      x0, x1 = int(bx0 * factor), min(w, int(bx1 * factor))
      hc, ec = he.render(int(kind), (y1 - y0, x1 - x0), mpp, rng)
      rgb = he.to_rgb(hc, ec, stain)
      where = full[y0:y1, x0:x1] == kind
      # Same pixels as image[...][where] = rgb[where], without gathering them first.
      np.copyto(image[y0:y1, x0:x1], rgb, where=where[..., None])
  return image


_NAMES = {
    he.STROMA: ["fibrous stroma", "collagenous stroma", "desmoplastic stroma", "stromal tissue"],
    he.TUMOUR: ["invasive carcinoma", "nests of malignant epithelial cells",
                "sheets of tumour cells", "a carcinoma"],
    he.GLANDS: ["benign glands", "normal glandular structures", "unremarkable glands",
                "well-formed benign ducts"],
    he.LYMPHOCYTES: ["a lymphoid aggregate", "dense lymphocytes", "a lymphocytic infiltrate",
                     "sheets of small lymphocytes"],
    he.NECROSIS: ["tumour necrosis", "an area of necrosis", "comedo-type necrosis",
                  "necrotic debris"],
    he.FAT: ["adipose tissue", "mature fat", "fatty tissue", "adipocytes"],
}
_LOOKS = {
    he.STROMA: ["with wavy pink collagen fibres and scattered spindle nuclei",
                "composed of eosinophilic fibres with sparse elongated nuclei"],
    he.TUMOUR: ["with large pleomorphic hyperchromatic nuclei and prominent nucleoli",
                "showing crowded, enlarged, irregular dark nuclei"],
    he.GLANDS: ["lined by a single layer of bland cuboidal cells around open lumina",
                "with round lumina and regularly spaced basal nuclei"],
    he.LYMPHOCYTES: ["of small round dark nuclei packed closely together",
                     "made of densely packed small round lymphocytes"],
    he.NECROSIS: ["with pale eosinophilic debris and scattered nuclear fragments",
                  "containing ghost cells and karyorrhectic nuclear dust"],
    he.FAT: ["with large empty polygonal vacuoles and thin septa",
             "made of large clear adipocytes separated by delicate membranes"],
}
_VERBS = ["can be seen", "can be identified", "can be recognised", "can be noted"]
_CONCLUSION = {
    "benign": ["No malignancy is identified.", "The features are benign.",
               "There is no evidence of carcinoma."],
    "carcinoma": ["The findings are diagnostic of invasive carcinoma.",
                  "Diagnosis: invasive carcinoma.", "Overall, this is a carcinoma."],
    "carcinoma with necrosis": ["The findings indicate carcinoma with tumour necrosis.",
                                "Diagnosis: carcinoma with necrosis.",
                                "Overall, this is a necrotic carcinoma."],
    "lymph node metastasis": ["The lymph node contains metastatic carcinoma.",
                              "Diagnosis: lymph node with metastatic carcinoma.",
                              "Overall, these are features of a nodal metastasis."],
}


def _sentence(rng, region: Region) -> str:
  name = rng.choice(_NAMES[region.tissue])
  look = rng.choice(_LOOKS[region.tissue])
  verb = rng.choice(_VERBS)
  if region.tissue not in (he.STROMA, he.LYMPHOCYTES) or rng.random() < 0.5:
    article, _, rest = name.partition(" ")
    if article in ("a", "an"):  # "a large carcinoma", not "large a carcinoma"
      name = f"a {region.size_word} {rest}"
    else:
      name = f"{region.size_word} {name}"
  text = f"{name} {look} {verb} {region.location}"
  if rng.random() < 0.5:
    # Whole micrometres, not "0.4 mm": with digits split into pieces, a decimal point is the
    # sentence-ending piece, and small decoders learnt to stop after "about 0.". The Greek mu
    # (U+03BC): what NFKC-normalising tokenizers (Gemma's) turn the micro sign into.
    text += f", measuring about {int(round(np.sqrt(region.area_um2), -1))} \u03bcm across"
  return text[0].upper() + text[1:] + "."


def make_slide(args: tuple) -> dict[str, Any]:
  """Renders and writes one slide with its mask, annotations and text (worker process)."""
  output_dir, slide_id, patient_id, diagnosis, split, seed, index, size = args
  rng = np.random.default_rng([seed, index])
  mpp = 0.25 if rng.random() < 0.2 else 0.5
  lo, hi = SIZES[size].side_um
  side_um = (rng.uniform(lo, hi), rng.uniform(lo, hi))
  if mpp == 0.25:  # same pixel budget: 40x slides cover less tissue
    side_um = (side_um[0] * 0.6, side_um[1] * 0.6)
  label, region_map, background = layout(rng, diagnosis, side_um, SIZES[size])
  stain = he.Stain.random(rng)
  image = render_slide(label, mpp, stain, rng, per_component=SIZES[size].per_component)
  path = os.path.join(output_dir, "slides", f"{slide_id}.tif")
  write_pyramidal_tiff(path, image, mpp=mpp, tile_size=256, quality=85)
  scale = MASK_UM / mpp                      # level-0 pixels per mask pixel
  ys, xs = np.nonzero(label)
  tissue_bbox = (xs.min() * scale, ys.min() * scale, (xs.max() + 1) * scale,
                 (ys.max() + 1) * scale)
  edge = ndimage.distance_transform_edt(label > 0) * MASK_UM
  regions, features = [], []
  for rid in np.unique(region_map):
    if rid == 0:
      continue
    member = region_map == rid
    kind = int(np.bincount(label[member]).argmax())
    ry, rx = np.nonzero(member)
    cy, cx = ry.mean() * scale, rx.mean() * scale
    area = member.sum() * MASK_UM ** 2
    near_edge = kind != background and float(np.median(edge[member])) < 120
    region = Region(
        region_id=f"r{rid}", tissue=kind, area_um2=float(area), centroid=(cx, cy),
        bbox=(int(rx.min() * scale), int(ry.min() * scale), int((rx.max() + 1) * scale),
              int((ry.max() + 1) * scale)),
        location=_location_words(cx, cy, tissue_bbox, near_edge),
        size_word=_size_word(area / 1e6))
    regions.append(region)
    for polygon in tissue.tissue_polygons(member, scale, scale):
      features.append(qupath.polygon_feature(
          polygon, object_type="annotation", name=he.TISSUE_NAMES[kind],
          color=he.TISSUE_COLORS[kind],
          measurements={"area_um2": area}))
      features[-1]["properties"]["region_id"] = region.region_id
  os.makedirs(os.path.join(output_dir, "masks"), exist_ok=True)
  Image.fromarray(label).save(os.path.join(output_dir, "masks", f"{slide_id}.png"))
  # Which region (hence which caption sentence) covers a pixel: ground truth for region-level text.
  region_dtype = np.uint8 if region_map.max() < 256 else np.uint16
  Image.fromarray(region_map.astype(region_dtype)).save(
      os.path.join(output_dir, "masks", f"{slide_id}_regions.png"))
  with open(os.path.join(output_dir, "masks", f"{slide_id}.json"), "w") as f:
    json.dump({"slide_id": slide_id, "mask_um_per_px": MASK_UM, "level0_px_per_mask_px": scale,
               "mpp": mpp, "region_map": f"{slide_id}_regions.png",
               "labels": {str(k): v for k, v in he.TISSUE_NAMES.items()},
               "regions": [dataclasses.asdict(r) | {"tissue_name": he.TISSUE_NAMES[r.tissue]}
                           for r in regions]}, f)
  qupath.write_geojson(os.path.join(output_dir, "annotations", f"{slide_id}.geojson"),
                       qupath.feature_collection(features))
  # Caption: lesions first (largest first), then the background, then the conclusion.
  ordered = sorted(regions, key=lambda r: (r.tissue == background, -r.area_um2))
  sentences = [{"text": _sentence(rng, r), "region_id": r.region_id,
                "tissue": he.TISSUE_NAMES[r.tissue]} for r in ordered]
  sentences.append({"text": str(rng.choice(_CONCLUSION[diagnosis])), "region_id": None,
                    "tissue": None})
  present = sorted({he.TISSUE_NAMES[r.tissue] for r in regions})
  has_tils = any(r.tissue == he.LYMPHOCYTES for r in regions) and diagnosis != "benign"
  # A mutation-like label: weakly tied to morphology (tumour area, lymphocytes), mostly chance.
  tumour_area = sum(r.area_um2 for r in regions if r.tissue == he.TUMOUR) / 1e6
  p = 0.3 + 0.2 * has_tils + 0.1 * min(tumour_area, 1.0)
  biomarker = int(rng.random() < p)
  thumb = Image.fromarray(image).copy()
  thumb.thumbnail((256, 256))
  return {
      "slide_id": slide_id, "patient_id": patient_id, "path": f"slides/{slide_id}.tif",
      "split": split, "diagnosis": diagnosis, "biomarker": biomarker,
      "tissue_types": present, "caption": " ".join(s["text"] for s in sentences),
      "sentences": sentences, "regions": regions, "thumb": np.asarray(thumb),
      "samples": _sample_patches(image, label, mpp, rng),
      "width": image.shape[1], "height": image.shape[0], "slide_mpp": mpp,
  }


def _sample_patches(image, label, mpp, rng, per_type: int = 2, size_um: float = 128.0):
  """A few 256-px patches (at 0.5 µm/px) lying well inside each tissue type, for the sheet."""
  out = {}
  size = int(size_um / mpp)
  margin = int(np.ceil(size_um / 2 / MASK_UM)) + 1
  for kind in np.unique(label):
    if kind == 0:
      continue
    inner = ndimage.binary_erosion(label == kind, iterations=margin)
    ys, xs = np.nonzero(inner)
    picks = []
    for i in rng.permutation(len(ys))[:per_type]:
      y0 = int(ys[i] * MASK_UM / mpp) - size // 2
      x0 = int(xs[i] * MASK_UM / mpp) - size // 2
      if 0 <= y0 and 0 <= x0 and y0 + size <= image.shape[0] and x0 + size <= image.shape[1]:
        crop = Image.fromarray(image[y0:y0 + size, x0:x0 + size]).resize((256, 256))
        picks.append(np.asarray(crop))
    out[int(kind)] = picks
  return out


def _write_sheets(output_dir: str, slides: list[dict[str, Any]]) -> None:
  """contact_sheet.png (sample patches per tissue type) and thumbnails.png (all slides)."""
  kinds = sorted(he.TISSUE_NAMES)
  per_row = 8
  tile = 128
  sheet = Image.new("RGB", (160 + per_row * tile, len(kinds) * tile), "white")
  draw = ImageDraw.Draw(sheet)
  for row, kind in enumerate(kinds):
    patches = [p for s in slides for p in s["samples"].get(kind, [])][:per_row]
    draw.text((6, row * tile + tile // 2 - 6), he.TISSUE_NAMES[kind], fill=(0, 0, 0))
    for col, patch in enumerate(patches):
      sheet.paste(Image.fromarray(patch).resize((tile, tile)), (160 + col * tile, row * tile))
  sheet.save(os.path.join(output_dir, "contact_sheet.png"))
  cols = 8
  cell = 200
  rows = -(-len(slides) // cols)
  grid = Image.new("RGB", (cols * cell, rows * (cell + 28)), "white")
  draw = ImageDraw.Draw(grid)
  for i, s in enumerate(slides):
    thumb = Image.fromarray(s["thumb"])
    thumb.thumbnail((cell - 8, cell - 8))
    x, y = (i % cols) * cell, (i // cols) * (cell + 28)
    grid.paste(thumb, (x + 4, y + 4))
    draw.text((x + 4, y + cell - 2), f"{s['slide_id']} {s['diagnosis'][:18]}", fill=(0, 0, 0))
    draw.text((x + 4, y + cell + 10), f"{s['split']} mpp {s['slide_mpp']}", fill=(90, 90, 90))
  grid.save(os.path.join(output_dir, "thumbnails.png"))


def assign(num_slides: int, rng: np.random.Generator,
           pattern: tuple[str, ...] = SIZES["small"].split_pattern
           ) -> list[tuple[str, str, str, str]]:
  """(slide_id, patient_id, diagnosis, split) with diagnoses balanced within each split and
  every patient's slides in one split; per diagnosis, patients take ``pattern``'s splits in
  turn."""
  patients = []
  slide_count = 0
  p = 0
  while slide_count < num_slides:
    n = min(int(rng.integers(1, 3)), num_slides - slide_count)
    patients.append((f"P{p:03d}", n, DIAGNOSES[p % len(DIAGNOSES)]))
    slide_count += n
    p += 1
  splits = {}
  by_dx: dict[str, list] = {}
  for patient in patients:
    by_dx.setdefault(patient[2], []).append(patient)
  # Small: per diagnosis, patients cycle through train, test, val, train, train: every split gets
  # every diagnosis once there are three patients of it, and about 60/20/20 beyond that.
  for dx_patients in by_dx.values():
    for rank, i in enumerate(rng.permutation(len(dx_patients))):
      splits[dx_patients[i][0]] = pattern[rank % len(pattern)]
  out = []
  for patient_id, n, dx in patients:
    for k in range(n):
      out.append((f"{patient_id}-S{k + 1}", patient_id, dx, splits[patient_id]))
  return out


def run(argv=None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--output_dir", required=True)
  parser.add_argument("--num_slides", type=int, default=None,
                      help="default: the size's (small, medium 48; study 420)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--size", choices=sorted(SIZES), default="small",
                      help="small: 1.1-1.9 mm slides; medium: 4-9 mm, 48 slides; study: 2.3-3.2 "
                           "mm slides in 4-10 regions, 420 slides split 45/15/40 by patient")
  parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
  args = parser.parse_args(argv)
  if args.num_slides is None:
    args.num_slides = SIZES[args.size].num_slides
  if args.num_slides < len(DIAGNOSES):
    raise SystemExit(f"--num_slides must be >= {len(DIAGNOSES)} (one per diagnosis)")
  out = os.path.abspath(args.output_dir)
  for sub in ("slides", "masks", "annotations"):
    os.makedirs(os.path.join(out, sub), exist_ok=True)
  rng = np.random.default_rng(args.seed)
  plan = assign(args.num_slides, rng, SIZES[args.size].split_pattern)
  jobs = [(out, sid, pid, dx, split, args.seed, i, args.size)
          for i, (sid, pid, dx, split) in enumerate(plan)]
  start = time.time()
  slides: list[dict[str, Any]] = [None] * len(jobs)
  progress = progress_lib.Progress(len(jobs), "slides", "make_demo_cohort", interval_s=0)
  # spawn, not fork: a parent that has imported JAX (a notebook, the tests) is multithreaded.
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, args.workers),
                                              mp_context=context) as pool:
    futures = {pool.submit(make_slide, job): i for i, job in enumerate(jobs)}
    for done, future in enumerate(concurrent.futures.as_completed(futures), start=1):
      slides[futures[future]] = future.result()
      progress.update(done)
  with open(os.path.join(out, "manifest.jsonl"), "w") as f:
    for s in slides:
      f.write(json.dumps({k: s[k] for k in ("slide_id", "path", "patient_id", "split",
                                            "diagnosis", "biomarker", "tissue_types",
                                            "caption")}) + "\n")
  with open(os.path.join(out, "captions.jsonl"), "w") as f:
    for s in slides:
      f.write(json.dumps({"slide_id": s["slide_id"], "caption": s["caption"],
                          "sentences": s["sentences"]}) + "\n")
  # Questions are written after tiling (data_prep/demo_questions.py): their answers are
  # defined on the tiled patch grid. One left by an earlier version would not match.
  for stale in ("questions.csv", "questions.json"):
    if os.path.exists(os.path.join(out, stale)):
      os.remove(os.path.join(out, stale))
  _write_sheets(out, slides)
  demo_cohort_tfds.prepare(out)
  summary = {"seed": args.seed, "size": args.size, "num_slides": len(slides),
             "seconds": round(time.time() - start, 1),
             "diagnoses": {d: sum(s["diagnosis"] == d for s in slides) for d in DIAGNOSES},
             "splits": {sp: sum(s["split"] == sp for s in slides) for sp in ("train", "val",
                                                                             "test")}}
  with open(os.path.join(out, "cohort.json"), "w") as f:
    json.dump(summary, f, indent=1)
  print(f"[make_demo_cohort] {len(slides)} slides in {summary['seconds']}s -> {out}",
        file=sys.stderr)
  return summary


def main() -> None:
  run()


if __name__ == "__main__":
  from data_prep import make_demo_cohort
  make_demo_cohort.main()
