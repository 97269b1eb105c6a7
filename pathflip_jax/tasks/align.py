"""Stage "align": PathFLIP's slide-caption and region-subcaption alignment on frozen features.

Reads a feature directory (``data_prep/extract_features.py`` or ``import_features.py``), whose
``slides.jsonl`` carries each slide's caption, labels and split from the manifest (or joins a
manifest given as ``config.manifest`` by slide_id, e.g. for imported TRIDENT/CLAM features);
optionally a ``data_prep/decompose_captions.py`` output (``config.captions``) replaces the
rule-based sentence split. Each step draws, per slide, up to ``data.num_regions`` regions and K
subcaptions (``data.slide_examples``) and minimises (``losses``)

  slide_weight  * symmetric InfoNCE(slide embedding, caption embedding)       [config.slide_loss]
  region_weight * sigmoid loss(subcaption, text-conditioned region embedding) [config.region_loss]

over the global batch (explicit gathers in ``jax.shard_map``).

Config keys read here (see ``configs/pathflip_demo.py``): ``features_dir``, ``manifest``,
``captions``, ``label_key``, ``class_names``, ``dtype``, ``tokenizer`` ("" trains one on the
training split's text), ``vocab_size``, ``tokenizer_type``, ``data.*``
(``slide_examples.ExampleConfig``), ``model.*``, ``slide_loss``, ``region_loss``,
``region_attention``, ``region_qformer``, ``slide_qformer`` (the paper's ablations),
``loss.{slide_weight, region_weight, temperature, label_smoothing}``, ``bert`` (a BERT-family
checkpoint directory the Q-Former's text branch and self-attention start from:
``convert/bert.py``; its sizes must be the Q-Former's, which configs/pathflip_paper.py's
``bert=`` arg sets).
"""

from __future__ import annotations

import dataclasses
import re
import sys
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from pathflip_jax import checkpointing, losses, storage, tokenizer as tokenizer_lib
from pathflip_jax.data import captions as captions_lib, feature_shards, manifest
from pathflip_jax.data import slide_examples
from pathflip_jax.models import pathflip, qformer

SPLITS = ("train", "val", "test")


@dataclasses.dataclass
class Split:
  indices: list[int]                         # rows of the feature directory
  texts: list[slide_examples.SlideText]

  def __len__(self) -> int:
    return len(self.indices)


def example_config(config: ml_collections.ConfigDict) -> slide_examples.ExampleConfig:
  fields = dict(config.data)
  known = {f.name for f in dataclasses.fields(slide_examples.ExampleConfig)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"config.data has unknown keys {unknown}; known: {sorted(known)}")
  if "buckets" in fields:
    fields["buckets"] = tuple(fields["buckets"])
  return slide_examples.ExampleConfig(**fields)


def model_config(config: ml_collections.ConfigDict, vocab_size: int, pad_id: int,
                 feature_dim: int) -> pathflip.PathFlipConfig:
  m = dict(config.model)
  q = dict(m.pop("qformer"))
  q_known = {f.name for f in dataclasses.fields(qformer.QFormerConfig)}
  bad = sorted(set(q) - q_known)
  if bad:
    raise ValueError(f"config.model.qformer has unknown keys {bad}; known: {sorted(q_known)}")
  q.update(vocab_size=vocab_size, pad_id=pad_id, feature_dim=feature_dim)
  max_len = max(config.data.caption_len, config.data.subcaption_len)
  q.setdefault("max_text_len", max_len)
  if q["max_text_len"] < max_len:
    raise ValueError(f"config.model.qformer.max_text_len={q['max_text_len']} is shorter than "
                     f"config.data caption/subcaption length {max_len}")
  known = {f.name for f in dataclasses.fields(pathflip.PathFlipConfig)} - {"qformer"}
  bad = sorted(set(m) - known)
  if bad:
    raise ValueError(f"config.model has unknown keys {bad}; known: {sorted(known)}")
  # The paper's ablations are top-level config fields (configs/common.py align_stage).
  for switch in ("region_attention", "region_qformer", "slide_qformer"):
    m[switch] = bool(config.get(switch, m.get(switch, True)))
  return pathflip.PathFlipConfig(qformer=qformer.QFormerConfig(**q), **m)


class AlignTask:
  """Data, model and loss of the alignment stage (the trainer's task interface)."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.config = config
    self.mesh = None
    if not config.get("features_dir"):
      raise ValueError("config.features_dir is not set (stage align trains on patch features: "
                       "data_prep/extract_features.py or data_prep/import_features.py)")
    if not storage.isdir(config.features_dir):
      raise FileNotFoundError(
          f"config.features_dir={config.features_dir}: no such feature directory "
          "(data_prep/extract_features.py or import_features.py writes one; the demo configs' "
          "default is the quickstart's: python -m pathflip_jax.quickstart --workdir "
          "runs/quickstart)")
    self.shards = feature_shards.FeatureShards(config.features_dir)
    self.example_config = example_config(config)
    self.class_names = list(config.class_names)
    label_of = {name: i for i, name in enumerate(self.class_names)}
    sentences = captions_lib.read_sentences(config.captions) if config.get("captions") else {}
    joined = self._join_manifest(config.get("manifest", ""))
    self.splits = {s: Split([], []) for s in SPLITS}
    skipped = []
    for index, row in enumerate(self.shards.rows):
      if joined is not None:
        if row["slide_id"] not in joined:
          skipped.append(row["slide_id"])
          continue
        row = {**row, **joined[row["slide_id"]]}
      caption = str(row.get("caption") or "").strip()
      if not caption:
        skipped.append(row["slide_id"])
        continue
      split = row.get("split", "train")
      if split not in self.splits:
        raise ValueError(f"{config.features_dir}/slides.jsonl: slide {row['slide_id']} has split "
                         f"{split!r}; expected one of {SPLITS}")
      value = row.get(config.label_key)
      if value is not None and str(value) not in label_of:
        raise ValueError(f"slide {row['slide_id']}: {config.label_key}={value!r} is not in "
                         f"config.class_names {self.class_names}")
      text = slide_examples.SlideText(
          slide_id=row["slide_id"], caption=caption,
          sentences=tuple(sentences.get(row["slide_id"])
                          or captions_lib.split_sentences(caption)),
          label=label_of[str(value)] if value is not None else -1)
      self.splits[split].indices.append(index)
      self.splits[split].texts.append(text)
    if config.get("captions"):
      missing = [t.slide_id for s in self.splits.values() for t in s.texts
                 if t.slide_id not in sentences]
      if missing:
        print(f"[align] {len(missing)} slides are not in config.captions={config.captions}; "
              f"their captions are split into sentences (e.g. {missing[:3]})", file=sys.stderr)
    counts = {k: len(v) for k, v in self.splits.items()}
    print(f"[align] {len(self.shards)} slides with features ({self.feature_dim}-d, encoder "
          f"{self.shards.identity.get('encoder', '?')}); per split {counts}"
          + (f"; {len(skipped)} without a caption (or not in config.manifest) skipped"
             if skipped else ""), file=sys.stderr)
    if not counts["train"]:
      raise ValueError(f"{config.features_dir}: no training slides (split 'train' with a caption)")
    self.tokenizer = self._tokenizer(config, workdir)
    self._eval_examples: dict[str, list[dict[str, np.ndarray]]] = {}

  def _join_manifest(self, path: str) -> dict[str, dict] | None:
    """slide_id -> manifest columns (caption, split, labels), overriding the feature index's."""
    if not path:
      return None
    joined = {}
    for line, row in manifest.read_rows(path):
      if not row.get("slide_id"):
        raise ValueError(f"{path}:{line}: config.manifest row without a slide_id")
      joined[str(row["slide_id"])] = {k: v for k, v in row.items() if v not in (None, "")}
    missing = sorted(set(joined) - set(self.shards.slide_ids))
    if missing:
      print(f"[align] {len(missing)} slides of config.manifest={path} have no features in "
            f"{self.config.features_dir} (e.g. {missing[:3]})", file=sys.stderr)
    return joined

  @property
  def feature_dim(self) -> int:
    dim = self.shards.rows[0].get("feature_dim") or self.shards.identity.get("feature_dim")
    return int(dim) if dim else int(self.shards[0]["features"].shape[1])

  def corpus(self) -> list[str]:
    return [x for s in self.splits.values() for t in s.texts for x in (t.caption, *t.sentences)]

  def _tokenizer(self, config, workdir: str):
    """SentencePiece (``config.tokenizer`` or one trained here) or a BERT checkpoint's
    WordPiece (``config.tokenizer`` naming its directory or vocabulary file)."""
    if config.tokenizer:
      return tokenizer_lib.load(config.tokenizer)
    path = storage.join(workdir, "tokenizer.model")
    if not storage.exists(path):
      # Only the training split's text: evaluation captions stay unseen.
      train_text = [x for t in self.splits["train"].texts for x in (t.caption, *t.sentences)]
      tokenizer_lib.train(train_text, storage.join(workdir, "tokenizer"),
                          vocab_size=config.vocab_size, model_type=config.tokenizer_type)
    return tokenizer_lib.Tokenizer(path)

  # ------------------------------------------------------------------ trainer interface
  @property
  def model_config(self) -> pathflip.PathFlipConfig:
    return model_config(self.config, self.tokenizer.num_embeddings, self.tokenizer.pad_id,
                        self.feature_dim)

  def create_model(self, rngs: nnx.Rngs) -> pathflip.PathFlip:
    # config.dtype is the compute dtype (bfloat16 on GPU/TPU); parameters stay float32.
    dtype = jnp.dtype(self.config.get("dtype", "float32"))
    return pathflip.PathFlip(self.model_config, rngs=rngs, dtype=dtype)

  def initial_params(self, params: Any) -> tuple[Any, str] | None:
    """``config.bert``: the Q-Former's text branch and self-attention start from the BERT
    checkpoint (the trainer calls this for a fresh run only: a resumed run keeps its own)."""
    path = self.config.get("bert")
    if not path:
      return None
    from pathflip_jax.convert import bert  # pylint: disable=import-outside-toplevel
    checkpoint = bert.load_bert(path)
    bert.check_qformer(self.model_config.qformer, checkpoint)
    loaded = {f"qformer/{name}": value for name, value in checkpoint.params.items()}
    # Exactly the imported names: any other parameter keeps its initialisation.
    include = ["^(" + "|".join(re.escape(name) for name in loaded) + ")$"]
    params, taken = checkpointing.partial_init(params, loaded, include,
                                               source=f"config.bert={path}")
    left = [name[len("qformer/"):] for name in checkpointing.named_leaves(params)
            if name.startswith("qformer/") and name not in loaded]
    print(f"[align] config.bert={path}: Q-Former parameters imported: "
          f"{bert.summary([n[len('qformer/'):] for n in taken])}\n[align] left initialised: "
          f"{bert.summary(left)}\n[align] checkpoint tensors not used: "
          f"{', '.join(checkpoint.unused) or 'none'}", file=sys.stderr, flush=True)
    return params, (f"Q-Former text branch and self-attention initialised from BERT checkpoint "
                    f"{path} ({len(taken)} arrays); {len(left)} Q-Former arrays "
                    "(cross-attention, queries, feature projection) and the rest of the model "
                    "from scratch")

  def source(self, split: str) -> slide_examples.SlideSource:
    s = self.splits[split]
    return slide_examples.SlideSource(self.config.features_dir, s.indices, s.texts)

  def train_source(self) -> grain.MapDataset:
    return grain.MapDataset.source(self.source("train"))

  def train_transform(self) -> grain.transforms.RandomMap:
    return slide_examples.SampleSlide(self.example_config, self.tokenizer)

  # A plain function, not a bound method: grain pickles it into its worker processes.
  collate = staticmethod(slide_examples.collate)
  # The arrays collate pads to the batch's longest slide (key -> axis): a multi-process run pads
  # every process's batch to the longest of any (input_pipeline.agree_padding).
  padded_axes = {"features": 1, "patch_valid": 1}

  def loss(self, model: pathflip.PathFlip, batch: dict[str, jax.Array], rng: jax.Array):
    del rng  # sampling happens in the input pipeline
    config = self.config
    if not (config.slide_loss or config.region_loss):
      raise ValueError("config.slide_loss and config.region_loss are both False: nothing to train")
    slides = model.encode_slides(batch)
    metrics: dict[str, jax.Array] = {}
    total = jnp.zeros((), jnp.float32)
    gathered = self.mesh is not None
    if config.slide_loss:
      caption_be = model.encode_texts(batch["caption"])
      scale = 1.0 / config.loss.temperature
      if gathered:
        slide_loss, m = losses.gathered_contrastive_loss(
            slides["slide"], caption_be, scale, self.mesh,
            label_smoothing=config.loss.label_smoothing)
      else:
        slide_loss, m = losses.contrastive_loss(slides["slide"], caption_be, scale,
                                                label_smoothing=config.loss.label_smoothing)
      total = total + config.loss.slide_weight * slide_loss
      metrics.update(slide_loss=slide_loss, slide_i2t_accuracy=m["i2t_accuracy"],
                     slide_t2i_accuracy=m["t2i_accuracy"])
    if config.region_loss:
      b, k, t = batch["subcaptions"].shape
      sub_bke = model.encode_texts(batch["subcaptions"].reshape(b * k, t)).reshape(b, k, -1)
      attend, params = model.attend_fn()
      scale, bias = model.region_logit_params()
      region_loss, m = losses.region_sigmoid_loss(
          attend, params, slides["regions"], slides["region_valid"], sub_bke,
          batch["subcaption_valid"], batch["negative_pick"], scale, bias, mesh=self.mesh)
      total = total + config.loss.region_weight * region_loss
      metrics.update(region_loss=region_loss, region_scale=scale, region_bias=bias, **m)
    return total, metrics

  def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
    """A batch of the training input's shapes and dtypes (for shape tracing and tests)."""
    c = self.example_config
    n, m, p, k = c.buckets[0], c.num_regions, c.patches_per_region, c.num_subcaptions
    return {"features": np.zeros((batch_size, n, self.feature_dim), np.float16),
            "patch_valid": np.ones((batch_size, n), bool),
            "region_index": np.zeros((batch_size, m, p), np.int32),
            "region_patch_valid": np.ones((batch_size, m, p), bool),
            "region_valid": np.ones((batch_size, m), bool),
            "region_pos": np.zeros((batch_size, m, 2), np.int32),
            "caption": np.zeros((batch_size, c.caption_len), np.int32),
            "subcaptions": np.zeros((batch_size, k, c.subcaption_len), np.int32),
            "subcaption_valid": np.ones((batch_size, k), bool),
            "negative_pick": np.zeros((batch_size,), np.int32),
            "label": np.zeros((batch_size,), np.int32),
            "slide_index": np.arange(batch_size, dtype=np.int32)}

  # ------------------------------------------------------------------ evaluator interface
  def eval_examples(self, split: str) -> list[dict[str, np.ndarray]]:
    """Every slide of a split as a deterministic example (all patches, fullest regions)."""
    if split not in self._eval_examples:
      source = self.source(split)
      self._eval_examples[split] = [
          slide_examples.build_example(source[i], self.example_config, self.tokenizer, None)
          for i in range(len(source))]
    return self._eval_examples[split]

  def eval_batches(self, split: str, batch_size: int):
    """(batches, count): the split's examples collated in slide order, slides of similar
    length together (fewer padded patches); the last batch is padded by repetition and
    ``slide_index`` says which rows are real (-1 for padding)."""
    examples = self.eval_examples(split)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["patch_valid"]))
    batches = []
    for start in range(0, len(order), batch_size):
      rows = [examples[i] for i in order[start:start + batch_size]]
      pad = batch_size - len(rows)
      batch = slide_examples.collate(rows + rows[-1:] * pad)
      batch["slide_index"] = np.concatenate([batch["slide_index"][:len(rows)],
                                             np.full((pad,), -1, np.int32)])
      batches.append(batch)
    return batches, len(examples)
