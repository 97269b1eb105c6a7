"""Patch-text contrastive model (CLIP-style): a ViT patch tower and a text tower in one space.

The demo's stand-in for CONCH: ``configs/patch_clip_demo.py`` pretrains it on demo patches and
the caption sentence of the region under each patch; its image tower then becomes the patch
encoder of ``data_prep/extract_features.py`` (``--config ...:checkpoint=WORKDIR``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from pathflip_jax.models import layers, text_encoder, vit

Dtype = Any


@dataclasses.dataclass(frozen=True)
class PatchClipConfig:
  vision: vit.ViTConfig
  text: text_encoder.TextConfig
  embed_dim: int = 128
  mean: Sequence[float] = vit.IMAGENET_MEAN      # image normalisation statistics
  std: Sequence[float] = vit.IMAGENET_STD
  init_temperature: float = 0.07


class PatchClip(nnx.Module):
  """uint8 patches [B, H, W, 3] and token ids [B, T] -> unit-norm embeddings [B, embed_dim]."""

  def __init__(self, config: PatchClipConfig, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32):
    self.config, self.dtype = config, dtype
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.vision = vit.VisionTransformer(config.vision, **kw)
    self.text = text_encoder.TextEncoder(config.text, **kw)
    self.image_proj = layers.Dense(self.vision.out_dim, config.embed_dim, ("embed", None), **kw)
    self.text_proj = layers.Dense(self.text.out_dim, config.embed_dim, ("embed", None), **kw)
    self.logit_scale = nnx.Param(jnp.full((), math.log(1.0 / config.init_temperature),
                                          param_dtype))

  def image_features(self, images_uint8: jax.Array) -> jax.Array:
    """The ViT's pooled features (what the patch encoder exports), before the projection."""
    x = vit.normalize(images_uint8, self.config.mean, self.config.std, self.dtype)
    return self.vision(x)

  def encode_images(self, images_uint8: jax.Array) -> jax.Array:
    return _unit(self.image_proj(self.image_features(images_uint8)))

  def encode_texts(self, tokens_bt: jax.Array) -> jax.Array:
    return _unit(self.text_proj(self.text(tokens_bt)))

  def __call__(self, images_uint8: jax.Array, tokens_bt: jax.Array):
    """(image embeddings, text embeddings, logit scale), embeddings float32 and unit-norm."""
    scale = jnp.exp(jnp.clip(self.logit_scale[...], 0.0, math.log(100.0)))
    return self.encode_images(images_uint8), self.encode_texts(tokens_bt), scale


def _unit(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)
