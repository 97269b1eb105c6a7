"""Slide-level training examples: feature shards joined with captions, regions and subcaptions
sampled per epoch, padded to static shapes in buckets (the grain pieces of stage "align").

One element is one slide:

  features            [n, f] float16   its patch features, padded to a bucket length
  patch_valid         [n]    bool
  region_index        [m, p] int32     rows of ``features`` in each sampled region (p = R * R)
  region_patch_valid  [m, p] bool
  region_valid        [m]    bool
  region_pos          [m, 2] int32     region grid (x, y)
  caption             [tc]   int32     token ids of the whole caption
  subcaptions         [k, ts] int32    K subcaptions (paper rule, ``data.captions``)
  subcaption_valid    [k]    bool
  negative_pick       []     int32     which subcaption other slides see as a negative
  label, slide_index  []     int32

Bucketing: ``n`` is the smallest of ``buckets`` that holds the slide, and :func:`collate` pads a
batch to its longest member, so a batch of small slides is not padded to the largest slide of
the cohort; each bucket compiles once. A slide with more patches than ``max_patches`` is
subsampled to it in training (afresh each epoch). With several processes, the trainer pads each
process's batch to the longest bucket any of them picked for the step
(``input_pipeline.agree_padding``), so the global batch has one shape.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import grain
import numpy as np

from pathflip_jax.data import captions as captions_lib, feature_shards, regions as regions_lib


@dataclasses.dataclass(frozen=True)
class ExampleConfig:
  """How a slide becomes an example (config keys ``data.*`` of stage "align")."""

  region_patches: int = 16          # R: regions are R x R patches (paper: 16)
  num_regions: int = 24             # regions sampled per slide in training (paper: 24)
  eval_num_regions: int = 256       # regions kept per slide in evaluation (the fullest)
  min_region_patches: int = 1       # smaller regions are never sampled
  num_subcaptions: int = 8          # K (paper: 8)
  max_sentences: int = 3            # sentences per subcaption (paper: 1-3)
  caption_len: int = 384
  subcaption_len: int = 192
  buckets: tuple[int, ...] = (256, 1024, 4096, 16384, 65536)
  max_patches: int = 65536          # training subsample cap
  patch_dropout: float = 0.0        # fraction of patches dropped per epoch in training

  def __post_init__(self):
    if sorted(self.buckets) != list(self.buckets) or not self.buckets:
      raise ValueError(f"data.buckets must be increasing and non-empty, got {self.buckets}")
    if not 0.0 <= self.patch_dropout < 1.0:
      raise ValueError(f"data.patch_dropout must be in [0, 1), got {self.patch_dropout}")

  @property
  def patches_per_region(self) -> int:
    return self.region_patches ** 2

  def bucket(self, n: int) -> int:
    """Padded length for a slide of n patches."""
    for size in self.buckets:
      if n <= size:
        return size
    largest = self.buckets[-1]
    return -(-n // largest) * largest


@dataclasses.dataclass(frozen=True)
class SlideText:
  slide_id: str
  caption: str
  sentences: tuple[str, ...]
  label: int


class SlideSource:
  """grain data source: i -> the record of slide ``indices[i]`` with its text and label."""

  def __init__(self, features_dir: str, indices: Sequence[int], texts: Sequence[SlideText]):
    if len(indices) != len(texts):
      raise ValueError("one text per slide index is needed")
    self.shards = feature_shards.FeatureShards(features_dir)
    self.indices = [int(i) for i in indices]
    self.texts = list(texts)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> dict[str, Any]:
    record = self.shards[self.indices[i]]
    text = self.texts[i]
    if record["slide_id"] != text.slide_id:
      raise ValueError(f"slide {i}: features of {record['slide_id']!r} joined with the text of "
                       f"{text.slide_id!r}")
    return {"features": record["features"], "coords": record["coords"],
            "patch_size_level0": float(record["patch_size_level0"]), "text": text,
            "slide_index": i}


def build_example(element: dict[str, Any], config: ExampleConfig, tokenizer,
                  rng: np.random.Generator | None) -> dict[str, np.ndarray]:
  """One slide -> padded arrays. ``rng`` None gives the deterministic evaluation example (all
  patches, the fullest ``eval_num_regions`` regions, the first K sentences as subcaptions)."""
  features, coords = element["features"], np.asarray(element["coords"])
  text: SlideText = element["text"]
  n = len(features)
  if n == 0:
    raise ValueError(f"slide {text.slide_id}: no patch features")
  keep = np.arange(n)
  if rng is not None:
    if config.patch_dropout:
      kept = keep[rng.random(n) >= config.patch_dropout]
      keep = kept if len(kept) else keep[rng.integers(n, size=1)]
    if len(keep) > config.max_patches:
      keep = np.sort(rng.choice(keep, config.max_patches, replace=False))
  grid, _ = regions_lib.group_patches(coords[keep], element["patch_size_level0"],
                                      config.region_patches)
  counts = grid.counts()
  eligible = np.nonzero(counts >= min(config.min_region_patches, counts.max()))[0]
  p = config.patches_per_region
  if rng is not None:
    m = config.num_regions
    chosen = rng.permutation(eligible)[:m]
  else:
    m = config.eval_num_regions
    chosen = eligible[np.argsort(-counts[eligible], kind="stable")][:m]
  region_index = np.zeros((m, p), np.int32)
  region_patch_valid = np.zeros((m, p), bool)
  region_pos = np.zeros((m, 2), np.int32)
  for slot, r in enumerate(chosen):
    members = grid.members[r]
    if len(members) > p:  # an overlapping tiling puts more than R*R patch centres in a cell
      members = (np.sort(rng.choice(members, p, replace=False)) if rng is not None
                 else members[np.linspace(0, len(members) - 1, p).astype(int)])
    region_index[slot, :len(members)] = members
    region_patch_valid[slot, :len(members)] = True
    region_pos[slot] = grid.cells[r]
  region_valid = np.zeros((m,), bool)
  region_valid[:len(chosen)] = True

  length = config.bucket(len(keep))
  padded = np.zeros((length, features.shape[1]), np.float16)
  padded[:len(keep)] = features[keep]
  patch_valid = np.zeros((length,), bool)
  patch_valid[:len(keep)] = True

  k = config.num_subcaptions
  sentences = list(text.sentences) or [text.caption]
  if rng is not None:
    subcaptions = captions_lib.sample_subcaptions(sentences, k, rng, config.max_sentences)
    subcaption_valid = np.ones((k,), bool)
    negative_pick = int(rng.integers(k))
  else:
    subcaptions = (sentences + [""] * k)[:k]
    subcaption_valid = np.arange(k) < len(sentences)
    negative_pick = 0
  return {
      "features": padded, "patch_valid": patch_valid,
      "region_index": region_index, "region_patch_valid": region_patch_valid,
      "region_valid": region_valid, "region_pos": region_pos,
      "caption": tokenizer.encode_batch([text.caption], config.caption_len)[0],
      "subcaptions": tokenizer.encode_batch(subcaptions, config.subcaption_len),
      "subcaption_valid": subcaption_valid, "negative_pick": np.int32(negative_pick),
      "label": np.int32(text.label), "slide_index": np.int32(element["slide_index"]),
  }


class SampleSlide(grain.transforms.RandomMap):
  """Training transform: patches, regions and subcaptions drawn afresh every epoch."""

  def __init__(self, config: ExampleConfig, tokenizer):
    self.config, self.tokenizer = config, tokenizer

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    return build_example(element, self.config, self.tokenizer, rng)


def collate(examples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Stacks examples, padding ``features``/``patch_valid`` to the batch's longest slide."""
  length = max(len(e["patch_valid"]) for e in examples)
  out = {}
  for key in examples[0]:
    values = [e[key] for e in examples]
    if key in ("features", "patch_valid"):
      values = [np.pad(v, [(0, length - len(v))] + [(0, 0)] * (v.ndim - 1)) for v in values]
    out[key] = np.stack(values)
  return out
