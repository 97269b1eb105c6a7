"""Vision Transformer patch encoder (Flax NNX), laid out to import timm-format weights.

The architecture is timm's ``VisionTransformer`` (pre-norm blocks, fused qkv, exact-erf GELU,
LayerNorm eps 1e-6, optional class token, register tokens, layer scale, mean pooling with
``fc_norm``), which is the format of UNI and of CONCH's vision tower. Weights come from
``pathflip_jax.convert.timm_vit``; this module never reads files.

Layers come from ``models/layers.py`` (parameters float32 with logical axis names; ``dtype`` is
the compute dtype, bf16 on GPU/TPU; statistics, softmax and mean pooling stay float32). Position
embeddings have a fixed grid: other image sizes are handled when weights are imported (bicubic
resampling).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from pathflip_jax.models import layers

Dtype = Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# CONCH and other CLIP-family towers are trained with OpenAI CLIP statistics.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

POOLS = ("cls", "mean")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Architecture of a timm-style ViT.

  Attributes:
    width: token width (timm ``embed_dim``).
    depth: number of transformer blocks.
    num_heads: attention heads (cannot be read off weight shapes).
    mlp_dim: MLP hidden width; None means 4 * width.
    image_size: square input size in pixels; fixes the position-embedding grid.
    patch_size: square patch size in pixels.
    num_registers: register tokens after the class token (timm ``reg_tokens``).
    class_token: prepend a learned class token.
    pos_embed_on_prefix: position embeddings also cover the class/register tokens
      (timm ``no_embed_class=False``); False adds them to patch tokens only.
    pre_norm: LayerNorm after the embeddings, before the blocks (timm ``pre_norm``, CLIP towers);
      the patch embedding then has no bias, as in timm.
    layer_scale_init: initial per-channel residual scale (timm ``init_values``); None disables it.
    pool: "cls" (class token) or "mean" (mean over patch tokens, excluding class/register tokens).
    fc_norm: apply the final LayerNorm after pooling instead of before it; None means
      ``pool == "mean"`` (timm semantics).
    head_dim: width of an optional linear head on the pooled features (timm ``num_classes``).
    qkv_bias: bias on the fused qkv projection.
    norm_eps: LayerNorm epsilon (timm uses 1e-6).
  """

  width: int
  depth: int
  num_heads: int
  mlp_dim: int | None = None
  image_size: int = 224
  patch_size: int = 16
  num_registers: int = 0
  class_token: bool = True
  pos_embed_on_prefix: bool = True
  pre_norm: bool = False
  layer_scale_init: float | None = None
  pool: str = "cls"
  fc_norm: bool | None = None
  head_dim: int | None = None
  qkv_bias: bool = True
  norm_eps: float = 1e-6

  def __post_init__(self):
    if self.width % self.num_heads:
      raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
    if self.image_size % self.patch_size:
      raise ValueError(
          f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
    if self.pool not in POOLS:
      raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
    if self.pool == "cls" and not self.class_token:
      raise ValueError('pool="cls" needs class_token=True')

  # None-valued fields are resolved here rather than in __post_init__, so dataclasses.replace
  # (e.g. of pool or width) re-derives them instead of keeping the old resolved value.
  @property
  def mlp_hidden(self) -> int:
    """MLP hidden width: ``mlp_dim``, or 4 * width if that is None."""
    return self.mlp_dim or 4 * self.width

  @property
  def use_fc_norm(self) -> bool:
    """Whether the final norm follows pooling: ``fc_norm``, or ``pool == "mean"`` if None."""
    return self.pool == "mean" if self.fc_norm is None else self.fc_norm

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid_size ** 2

  @property
  def num_prefix_tokens(self) -> int:
    return int(self.class_token) + self.num_registers

  @property
  def num_tokens(self) -> int:
    return self.num_prefix_tokens + self.num_patches

  @property
  def pos_embed_len(self) -> int:
    return self.num_patches + (self.num_prefix_tokens if self.pos_embed_on_prefix else 0)

  @property
  def out_dim(self) -> int:
    return self.head_dim or self.width


VARIANTS: dict[str, ViTConfig] = {
    # Small enough for unit tests: 16 patches of 16 px.
    "vit_tiny_test": ViTConfig(width=32, depth=2, num_heads=2, image_size=64),
    # timm vit_{small,base,large}_patch16_224 (head_dim 64 throughout).
    "vit_small_patch16": ViTConfig(width=384, depth=12, num_heads=6),
    "vit_base_patch16": ViTConfig(width=768, depth=12, num_heads=12),
    "vit_large_patch16": ViTConfig(width=1024, depth=24, num_heads=16),
}


def get_config(name: str, **overrides) -> ViTConfig:
  """The named variant, with fields replaced by ``overrides`` (e.g. image_size=256)."""
  if name not in VARIANTS:
    raise ValueError(f"unknown ViT variant {name!r}; known: {sorted(VARIANTS)}")
  return dataclasses.replace(VARIANTS[name], **overrides)


def normalize(images_uint8, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD, dtype: Dtype = jnp.float32) -> jax.Array:
  """uint8 RGB [..., 3] -> (x / 255 - mean) / std in ``dtype`` (arithmetic in float32)."""
  x = jnp.asarray(images_uint8).astype(jnp.float32)
  mean = jnp.asarray(mean, jnp.float32) * 255.0
  inv_std = 1.0 / (jnp.asarray(std, jnp.float32) * 255.0)
  return ((x - mean) * inv_std).astype(dtype)


class Block(nnx.Module):
  """Pre-norm transformer block with optional layer scale (timm ``Block``)."""

  def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs, dtype: Dtype, param_dtype: Dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    norm_kw = dict(eps=config.norm_eps, dtype=dtype, param_dtype=param_dtype)
    self.dtype = dtype
    self.norm1 = layers.LayerNorm(config.width, **norm_kw)
    # On CPU the attention core runs 4 images at a time (layers.MultiHeadAttention).
    self.attn = layers.MultiHeadAttention(config.width, config.num_heads, fused_qkv=True,
                                          qkv_bias=config.qkv_bias, cpu_batch_chunk=4, **kw)
    self.norm2 = layers.LayerNorm(config.width, **norm_kw)
    self.mlp = layers.Mlp(config.width, config.mlp_hidden, **kw)
    if config.layer_scale_init is not None:
      init = nnx.initializers.constant(config.layer_scale_init)
      self.ls1 = layers.param(None, init, (config.width,), ("embed",), param_dtype)
      self.ls2 = layers.param(None, init, (config.width,), ("embed",), param_dtype)
    else:
      self.ls1 = self.ls2 = None

  def _scale(self, ls: nnx.Param | None, y: jax.Array) -> jax.Array:
    return y if ls is None else y * ls[...].astype(self.dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self._scale(self.ls1, self.attn(self.norm1(x)))
    return x + self._scale(self.ls2, self.mlp(self.norm2(x)))


class VisionTransformer(nnx.Module):
  """ViT patch encoder: images [B, H, W, 3] (normalised) -> pooled features [B, out_dim].

  Parameter names mirror timm's state-dict keys (``patch_embed``, ``cls_token``, ``reg_token``,
  ``pos_embed``, ``blocks[i].{norm1,attn,ls1,norm2,mlp,ls2}``, ``norm``, ``fc_norm``, ``head``).
  ``norm`` exists when the final norm precedes pooling, ``fc_norm`` when it follows it.
  """

  def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32):
    self.config = config
    self.dtype = dtype
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    norm_kw = dict(eps=config.norm_eps, dtype=dtype, param_dtype=param_dtype)
    p, width = config.patch_size, config.width
    # A stride-p convolution is a matmul over flattened patches: the kernel is the conv's
    # (kh, kw, in, out) kernel flattened to (kh * kw * in, out).
    self.patch_kernel = layers.param(rngs.params(), nnx.initializers.lecun_normal(),
                                     (p * p * 3, width), ("patch_in", "embed"), param_dtype)
    self.patch_bias = (None if config.pre_norm
                       else layers.param(None, layers.zeros, (width,), ("embed",), param_dtype))
    tiny = nnx.initializers.normal(1e-6)
    self.cls_token = (layers.param(rngs.params(), tiny, (1, width), (None, "embed"), param_dtype)
                      if config.class_token else None)
    self.reg_token = (layers.param(rngs.params(), tiny, (config.num_registers, width),
                                   (None, "embed"), param_dtype)
                      if config.num_registers else None)
    self.pos_embed = layers.param(rngs.params(), nnx.initializers.normal(0.02),
                                  (config.pos_embed_len, width), ("tokens", "embed"), param_dtype)
    self.norm_pre = layers.LayerNorm(width, **norm_kw) if config.pre_norm else None
    self.blocks = nnx.List([Block(config, **kw) for _ in range(config.depth)])
    self.norm = None if config.use_fc_norm else layers.LayerNorm(width, **norm_kw)
    self.fc_norm = layers.LayerNorm(width, **norm_kw) if config.use_fc_norm else None
    self.head = (layers.Dense(width, config.head_dim, ("embed", None), **kw) if config.head_dim
                 else None)

  @property
  def out_dim(self) -> int:
    return self.config.out_dim

  def embed(self, images: jax.Array) -> jax.Array:
    """Images [B, H, W, 3] -> tokens [B, prefix + patches, width], position embeddings added."""
    config = self.config
    b, h, w, c = images.shape
    if (h, w) != (config.image_size, config.image_size):
      raise ValueError(
          f"images are {h}x{w} px but the model's position embeddings are for "
          f"{config.image_size}x{config.image_size}; convert the weights with "
          f"image_size={h} to resample them")
    if c != 3:
      raise ValueError(f"images must have 3 channels (NHWC), got shape {images.shape}")
    p, g = config.patch_size, config.grid_size
    x = images.astype(self.dtype).reshape(b, g, p, g, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, g * g, p * p * c)
    x = x @ self.patch_kernel[...].astype(self.dtype)
    if self.patch_bias is not None:
      x = x + self.patch_bias[...].astype(self.dtype)
    pos = self.pos_embed[...].astype(self.dtype)
    prefix = [t[...].astype(self.dtype) for t in (self.cls_token, self.reg_token) if t is not None]
    if config.pos_embed_on_prefix:
      x = jnp.concatenate([jnp.broadcast_to(t, (b,) + t.shape) for t in prefix] + [x], axis=1)
      x = x + pos
    else:
      x = x + pos
      x = jnp.concatenate([jnp.broadcast_to(t, (b,) + t.shape) for t in prefix] + [x], axis=1)
    return x

  def forward_features(self, images: jax.Array) -> jax.Array:
    """All tokens after the blocks (and the final norm unless ``fc_norm``): [B, T, width]."""
    x = self.embed(images)
    if self.norm_pre is not None:
      x = self.norm_pre(x)
    for block in self.blocks:
      x = block(x)
    if self.norm is not None:
      x = self.norm(x)
    return x

  def pool(self, tokens: jax.Array) -> jax.Array:
    """Tokens [B, T, width] -> pooled [B, width], then ``fc_norm`` and the head if present."""
    if self.config.pool == "cls":
      x = tokens[:, 0]
    else:
      # Mean in float32: a bf16 sum over hundreds of tokens rounds badly.
      x = tokens[:, self.config.num_prefix_tokens:].astype(jnp.float32).mean(axis=1)
      x = x.astype(self.dtype)
    if self.fc_norm is not None:
      x = self.fc_norm(x)
    if self.head is not None:
      x = self.head(x)
    return x

  def __call__(self, images: jax.Array) -> jax.Array:
    return self.pool(self.forward_features(images))
