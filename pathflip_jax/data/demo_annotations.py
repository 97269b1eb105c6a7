"""Ground truth of the demo cohort at patch level: tissue type and the sentence that covers a patch.

``data_prep/make_demo_cohort.py`` writes, per slide, a tissue-type label map and a region-id map
(``masks/<slide>.png``, ``masks/<slide>_regions.png``, one pixel = 8 µm) and a caption whose
sentences each name the region they describe (``captions.jsonl``). A patch (level-0 x, y, side)
is labelled by the majority tissue type under its footprint, and paired with the sentence of the
region that covers most of that tissue: the patch-level text the patch-text pretraining
(``configs/patch_clip_demo.py``) learns from, and the labels its evaluators score against.
Glass does not dilute a label: ``purity`` is the share of the patch's *tissue* pixels that have
its type, ``coverage`` the share of the footprint that is tissue at all.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable

import numpy as np
from PIL import Image

from pathflip_jax.data import patch_shards, synthetic_he as he

BACKGROUND = he.BACKGROUND
TISSUE_NAMES = dict(he.TISSUE_NAMES)          # label -> name; 0 (background) has none
CLASS_LABELS = tuple(sorted(TISSUE_NAMES))    # the tissue classes, in label order


@dataclasses.dataclass(frozen=True)
class PatchLabel:
  tissue: int              # majority tissue type among the patch's tissue pixels (0: no tissue)
  purity: float            # share of the tissue pixels that have that type
  coverage: float          # share of the footprint that is tissue (the rest is glass)
  region_id: str | None    # region covering most of that tissue ("r3"), None without tissue
  sentence: str | None     # the caption sentence describing that region


@dataclasses.dataclass
class _SlideTruth:
  label: np.ndarray        # [h, w] uint8 tissue labels
  regions: np.ndarray      # [h, w] region ids (0 = none)
  scale: float             # level-0 pixels per mask pixel

  def window(self, x: float, y: float, size_level0: float) -> tuple[tuple[slice, slice], int]:
    """The mask pixels under a patch (level-0 top-left x, y and side), clipped to the mask, and
    the footprint in mask pixels including any part outside the slide (which counts as glass)."""
    h, w = self.label.shape
    x0, y0 = int(np.floor(x / self.scale)), int(np.floor(y / self.scale))
    x1 = max(x0 + 1, int(np.ceil((x + size_level0) / self.scale)))
    y1 = max(y0 + 1, int(np.ceil((y + size_level0) / self.scale)))
    return ((slice(max(y0, 0), min(y1, h)), slice(max(x0, 0), min(x1, w))),
            (x1 - x0) * (y1 - y0))


class CohortAnnotations:
  """Reads a demo cohort's masks and captions; labels patches by their level-0 footprint."""

  def __init__(self, cohort_dir: str):
    self.cohort_dir = cohort_dir
    captions = os.path.join(cohort_dir, "captions.jsonl")
    if not os.path.exists(captions):
      raise FileNotFoundError(
          f"{captions} not found: {cohort_dir} is not a demo cohort "
          "(python -m data_prep.make_demo_cohort --output_dir DIR)")
    self.sentences: dict[str, dict[str, str]] = {}
    for row in patch_shards.read_jsonl(captions):
      self.sentences[row["slide_id"]] = {s["region_id"]: s["text"] for s in row["sentences"]
                                         if s.get("region_id")}
    self.slides: dict[str, dict[str, Any]] = {
        row["slide_id"]: row
        for row in patch_shards.read_jsonl(os.path.join(cohort_dir, "manifest.jsonl"))}
    self._truth: dict[str, _SlideTruth] = {}

  def split(self, slide_id: str) -> str:
    return self.slides[slide_id]["split"]

  def _slide(self, slide_id: str) -> _SlideTruth:
    if slide_id not in self._truth:
      masks = os.path.join(self.cohort_dir, "masks")
      meta_path = os.path.join(masks, f"{slide_id}.json")
      if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{meta_path}: no mask for slide {slide_id!r} in the demo cohort")
      with open(meta_path) as f:
        meta = json.load(f)
      region_path = os.path.join(masks, meta.get("region_map", f"{slide_id}_regions.png"))
      if not os.path.exists(region_path):
        raise FileNotFoundError(
            f"{region_path} not found: this cohort predates region-id maps; regenerate it with "
            "python -m data_prep.make_demo_cohort")
      label = np.asarray(Image.open(os.path.join(masks, f"{slide_id}.png")))
      regions = np.asarray(Image.open(region_path)).astype(np.int32)
      self._truth[slide_id] = _SlideTruth(label, regions, float(meta["level0_px_per_mask_px"]))
    return self._truth[slide_id]

  def tissue_fractions(self, slide_id: str, coords_n2: np.ndarray, size_level0: float
                       ) -> np.ndarray:
    """Share of each patch's footprint covered by each tissue type: [n, len(CLASS_LABELS)]
    (columns in ``CLASS_LABELS`` order; glass and pixels outside the slide count in no column).
    The ground truth of the localization evaluator."""
    truth = self._slide(slide_id)
    coords_n2 = np.asarray(coords_n2, np.float64).reshape(-1, 2)
    out = np.zeros((len(coords_n2), len(CLASS_LABELS)), np.float32)
    for row, (x, y) in enumerate(coords_n2):
      window, footprint = truth.window(x, y, size_level0)
      counts = np.bincount(truth.label[window].ravel(), minlength=max(CLASS_LABELS) + 1)
      out[row] = counts[list(CLASS_LABELS)] / footprint
    return out

  def patch_regions(self, slide_id: str, coords_n2: np.ndarray, size_level0: float,
                    tissue: int) -> tuple[np.ndarray, np.ndarray]:
    """Per patch: the id of the ``tissue``-type region (lesion) covering most of the patch's
    ``tissue`` pixels (0: none), and the share of the footprint that region covers."""
    truth = self._slide(slide_id)
    coords_n2 = np.asarray(coords_n2, np.float64).reshape(-1, 2)
    ids = np.zeros(len(coords_n2), np.int64)
    shares = np.zeros(len(coords_n2), np.float32)
    for row, (x, y) in enumerate(coords_n2):
      window, footprint = truth.window(x, y, size_level0)
      regions = truth.regions[window][truth.label[window] == tissue]
      if regions.size:
        counts = np.bincount(regions)
        ids[row] = int(counts.argmax())
        shares[row] = counts.max() / footprint
    return ids, shares

  def label_patch(self, slide_id: str, x: int, y: int, size_level0: int) -> PatchLabel:
    """Majority tissue type under the patch and the sentence of the region holding most of it."""
    truth = self._slide(slide_id)
    window, footprint = truth.window(x, y, size_level0)
    label = truth.label[window].ravel()
    regions = truth.regions[window].ravel()
    counts = np.bincount(label, minlength=len(TISSUE_NAMES) + 1)[1:] if label.size else []
    tissue_pixels = int(np.sum(counts))
    if not tissue_pixels:
      return PatchLabel(BACKGROUND, 0.0, 0.0, None, None)
    tissue = int(np.argmax(counts)) + 1
    region = int(np.bincount(regions[label == tissue]).argmax())
    region_id = f"r{region}" if region else None
    sentence = self.sentences.get(slide_id, {}).get(region_id) if region_id else None
    return PatchLabel(tissue, float(counts[tissue - 1] / tissue_pixels),
                      float(tissue_pixels / footprint), region_id, sentence)


def label_patches(annotations: CohortAnnotations, patches: patch_shards.PatchShards,
                  indices: Iterable[int] | None = None) -> dict[str, np.ndarray]:
  """Labels every patch of a tiling output: column arrays indexed like ``patches``.

  Columns: ``index``, ``slide_id``, ``split``, ``tissue``, ``purity``, ``coverage``,
  ``sentence`` ("" where none).
  """
  rows = []
  for index in (range(len(patches)) if indices is None else indices):
    record = patches[int(index)]
    slide_id = record["slide_id"]
    if slide_id not in annotations.slides:
      raise KeyError(f"{patches.directory}: slide {slide_id!r} is not in the demo cohort "
                     f"{annotations.cohort_dir}")
    patch = annotations.label_patch(slide_id, record["x"], record["y"],
                                    record["patch_size_level0"])
    rows.append((int(index), slide_id, annotations.split(slide_id), patch.tissue,
                 patch.purity, patch.coverage, patch.sentence or ""))
  columns = list(zip(*rows)) if rows else [()] * 7
  return {
      "index": np.asarray(columns[0], np.int64),
      "slide_id": np.asarray(columns[1], object),
      "split": np.asarray(columns[2], object),
      "tissue": np.asarray(columns[3], np.int32),
      "purity": np.asarray(columns[4], np.float32),
      "coverage": np.asarray(columns[5], np.float32),
      "sentence": np.asarray(columns[6], object),
  }
