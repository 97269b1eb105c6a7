"""Stage "patch_clip": patch-text contrastive pretraining of the demo's patch encoder.

Pairs every tissue patch of the tiled demo cohort with the caption sentence of the region under
it (``data.demo_annotations``) and trains a ViT and a text Transformer (``models.patch_clip``)
with a symmetric InfoNCE loss: the role CONCH plays for the paper. Training patches come from the
cohort's train split; evaluators score the val split.

Config keys read here (see ``configs/patch_clip_demo.py``): ``cohort_dir``, ``patches_dir``,
``tokenizer`` ("" trains one on the cohort's text into the workdir), ``vocab_size``,
``text_len``, ``min_purity``, ``min_patches_per_text``, ``augment.*``, ``model.*``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from flax import nnx
from PIL import Image

from pathflip_jax import losses, storage, tokenizer as tokenizer_lib
from pathflip_jax.data import demo_annotations, patch_shards, tiling
from pathflip_jax.models import patch_clip, text_encoder, vit


class PatchTextSource:
  """grain data source: i -> the i-th selected patch's JPEG, its sentence's tokens and labels."""

  def __init__(self, patches_dir: str, indices: np.ndarray, tokens: np.ndarray,
               text_ids: np.ndarray, labels: np.ndarray):
    self.patches = patch_shards.PatchShards(patches_dir)
    self.indices, self.tokens, self.text_ids, self.labels = indices, tokens, text_ids, labels

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> dict[str, Any]:
    record = self.patches[int(self.indices[i])]
    return {"jpeg": record["jpeg"], "tokens": self.tokens[self.text_ids[i]],
            "text_id": np.int32(self.text_ids[i]), "label": np.int32(self.labels[i])}


def _resize(image: np.ndarray, size: int) -> np.ndarray:
  if image.shape[0] == size and image.shape[1] == size:
    return image
  return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR,
                                                  reducing_gap=2.0))


class Augment(grain.transforms.RandomMap):
  """Random crop (scale), 90-degree rotation, flip, stain jitter and grayscale; then resize.

  Stain jitter scales and shifts each channel's optical density (-log of transmitted light), the
  space in which stain amount acts; slides of one cohort differ mostly there, and without it a
  model can tell regions apart by their slide's stain instead of by their tissue.
  """

  def __init__(self, image_size: int, min_crop: float, stain_jitter: float,
               grayscale_prob: float):
    self.image_size, self.min_crop = image_size, min_crop
    self.stain_jitter, self.grayscale_prob = stain_jitter, grayscale_prob

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    image = tiling.decode_jpeg(element["jpeg"])
    side = image.shape[0]
    crop = int(round(side * rng.uniform(self.min_crop, 1.0)))
    y0, x0 = rng.integers(0, side - crop + 1, size=2)
    image = _resize(image[y0:y0 + crop, x0:x0 + crop], self.image_size)
    image = np.rot90(image, int(rng.integers(4)))
    if rng.random() < 0.5:
      image = image[:, ::-1]
    if self.stain_jitter:
      density = -np.log((image.astype(np.float32) + 1.0) / 256.0)
      scale = np.clip(1.0 + rng.normal(0.0, self.stain_jitter, size=3), 0.3, 2.0)
      shift = rng.normal(0.0, 0.2 * self.stain_jitter, size=3)
      density = np.maximum(density * scale + shift, 0.0)
      image = np.clip(256.0 * np.exp(-density) - 1.0, 0, 255).astype(np.uint8)
    if rng.random() < self.grayscale_prob:
      grey = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
      image = np.repeat(grey[..., None], 3, axis=2).astype(np.uint8)
    return {"image": np.ascontiguousarray(image), "tokens": element["tokens"],
            "text_id": element["text_id"], "label": element["label"]}


class DecodeResize(grain.transforms.Map):
  """The whole patch, resized to the model's input size (evaluation)."""

  def __init__(self, image_size: int):
    self.image_size = image_size

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    image = _resize(tiling.decode_jpeg(element["jpeg"]), self.image_size)
    return {"image": image, "label": element["label"]}


def model_config(config: ml_collections.ConfigDict, vocab_size: int,
                 pad_id: int) -> patch_clip.PatchClipConfig:
  m = config.model
  vision = vit.get_config(m.vision_variant, **dict(m.get("vision_overrides", {})))
  text = text_encoder.TextConfig(vocab_size=vocab_size, max_len=config.text_len,
                                 width=m.text_width, depth=m.text_depth,
                                 num_heads=m.text_heads, pad_id=pad_id)
  return patch_clip.PatchClipConfig(vision=vision, text=text, embed_dim=m.embed_dim)


def cohort_corpus(cohort_dir: str, split: str = "train") -> list[str]:
  """Captions and their sentences of one split's slides: what the demo's tokenizer is trained
  on (the training split only, so evaluation text stays unseen)."""
  splits = {row["slide_id"]: row.get("split", "train")
            for row in patch_shards.read_jsonl(os.path.join(cohort_dir, "manifest.jsonl"))}
  texts = []
  for row in patch_shards.read_jsonl(os.path.join(cohort_dir, "captions.jsonl")):
    if splits.get(row["slide_id"]) != split:
      continue
    texts.append(row["caption"])
    texts.extend(s["text"] for s in row["sentences"])
  return texts


@dataclasses.dataclass
class Split:
  indices: np.ndarray      # patch indices into the tiling output
  text_ids: np.ndarray     # row of the sentence in PatchClipTask.tokens
  labels: np.ndarray       # tissue type (demo_annotations labels)
  slide_ids: np.ndarray


class PatchClipTask:
  """Data, model and loss of the patch_clip stage (the trainer's task interface)."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.config = config
    for key in ("cohort_dir", "patches_dir"):
      if not config.get(key):
        raise ValueError(f"config.{key} is not set (stage patch_clip needs the demo cohort and "
                         "its tiling output)")
    self.tokenizer = self._tokenizer(config, workdir)
    annotations = demo_annotations.CohortAnnotations(config.cohort_dir)
    patches = patch_shards.PatchShards(config.patches_dir)
    table = demo_annotations.label_patches(annotations, patches)
    keep = ((table["tissue"] != demo_annotations.BACKGROUND)
            & (table["purity"] >= config.min_purity))
    sentences = sorted(set(table["sentence"][keep & (table["sentence"] != "")]))
    self.sentences = sentences
    self.tokens = self.tokenizer.encode_batch(sentences, config.text_len)
    row_of = {s: i for i, s in enumerate(sentences)}
    self.class_labels = demo_annotations.CLASS_LABELS
    self.class_names = [demo_annotations.TISSUE_NAMES[k] for k in self.class_labels]
    class_of = {k: i for i, k in enumerate(self.class_labels)}
    self.splits: dict[str, Split] = {}
    for split in ("train", "val", "test"):
      rows = np.nonzero(keep & (table["split"] == split) & (table["sentence"] != ""))[0]
      self.splits[split] = Split(
          indices=table["index"][rows],
          text_ids=np.array([row_of[s] for s in table["sentence"][rows]], np.int32),
          labels=np.array([class_of[t] for t in table["tissue"][rows]], np.int32),
          slide_ids=table["slide_id"][rows])
    counts = {k: len(v.indices) for k, v in self.splits.items()}
    print(f"[patch_clip] {len(table['index'])} patches, {int(keep.sum())} on tissue; "
          f"{len(sentences)} distinct sentences; patches per split {counts}", file=sys.stderr)
    if not counts["train"]:
      raise ValueError(f"{config.patches_dir}: no training patches (split 'train') with tissue")
    self._images: dict[str, tuple[np.ndarray, np.ndarray]] = {}

  @staticmethod
  def _tokenizer(config, workdir: str) -> tokenizer_lib.Tokenizer:
    path = tokenizer_path(config, workdir)
    if not config.tokenizer and not storage.exists(path):
      tokenizer_lib.train(cohort_corpus(config.cohort_dir), storage.join(workdir, "tokenizer"),
                          vocab_size=config.vocab_size, model_type=config.tokenizer_type)
    return tokenizer_lib.Tokenizer(path)

  @property
  def image_size(self) -> int:
    return self.model_config.vision.image_size

  @property
  def model_config(self) -> patch_clip.PatchClipConfig:
    return model_config(self.config, self.tokenizer.num_embeddings, self.tokenizer.pad_id)

  def create_model(self, rngs: nnx.Rngs) -> patch_clip.PatchClip:
    return patch_clip.PatchClip(self.model_config, rngs=rngs)

  def source(self, split: str) -> grain.MapDataset:
    s = self.splits[split]
    return grain.MapDataset.source(PatchTextSource(
        self.config.patches_dir, s.indices, self.tokens, s.text_ids, s.labels))

  def train_source(self) -> grain.MapDataset:
    """The train split, with the patches of rarely described regions repeated.

    A large stroma region covers dozens of patches, a gland or necrosis region a handful; each
    sentence's patches are repeated until they make at least ``min_patches_per_text`` entries
    per epoch (repeat-factor sampling over texts: no labels involved), so that small regions
    are seen as often as their sentences are worth.
    """
    s = self.splits["train"]
    counts = np.bincount(s.text_ids, minlength=len(self.sentences))
    repeats = np.maximum(1, np.ceil(self.config.min_patches_per_text / np.maximum(counts, 1)))
    rows = np.repeat(np.arange(len(s.indices)), repeats[s.text_ids].astype(int))
    return grain.MapDataset.source(PatchTextSource(
        self.config.patches_dir, s.indices[rows], self.tokens, s.text_ids[rows], s.labels[rows]))

  def train_transform(self) -> grain.transforms.RandomMap:
    a = self.config.augment
    return Augment(self.image_size, a.min_crop, a.stain_jitter, a.grayscale_prob)

  def loss(self, model: patch_clip.PatchClip, batch: dict[str, jax.Array], rng: jax.Array):
    del rng  # no dropout
    image, text, scale = model(batch["image"], batch["tokens"])
    loss, metrics = losses.contrastive_loss(image, text, scale, batch["text_id"])
    return loss, {**metrics, "temperature": 1.0 / scale}

  def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
    """A batch of the training input's shapes and dtypes (for shape tracing and tests)."""
    s = self.image_size
    return {"image": np.zeros((batch_size, s, s, 3), np.uint8),
            "tokens": np.zeros((batch_size, self.config.text_len), np.int32),
            "text_id": np.arange(batch_size, dtype=np.int32),
            "label": np.zeros((batch_size,), np.int32)}

  def images(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Every patch of a split, decoded and resized once: (images [n, s, s, 3], labels [n])."""
    if split not in self._images:
      ds = self.source(split).map(DecodeResize(self.image_size))
      rows = [ds[i] for i in range(len(ds))]
      s = self.image_size
      images = (np.stack([r["image"] for r in rows]) if rows
                else np.zeros((0, s, s, 3), np.uint8))
      self._images[split] = (images, np.array([r["label"] for r in rows], np.int32))
    return self._images[split]


def tokenizer_path(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The SentencePiece model a patch_clip run uses: ``config.tokenizer``, else the one it trains
  into its workdir."""
  return config.tokenizer or storage.join(workdir, "tokenizer.model")
