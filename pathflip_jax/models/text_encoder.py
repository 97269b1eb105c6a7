"""A small bidirectional text Transformer (Flax NNX): token ids -> one pooled text embedding.

The text tower of the patch-text pretraining (``configs/patch_clip_demo.py``). Pre-norm blocks of
the shared layers (``models/layers.py``), learned position embeddings, padding masked out of
attention, and the BOS token's output as the text's embedding (BERT's CLS role),
so the tokenizer must put BOS first (``Tokenizer.encode_batch(add_bos=True)``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pathflip_jax.models import layers

Dtype = Any


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """Sizes of the text Transformer.

  Attributes:
    vocab_size: embedding rows (``Tokenizer.num_embeddings``).
    max_len: longest token sequence (position embeddings).
    width, depth, num_heads, mlp_ratio: Transformer sizes.
    out_dim: width of a linear projection after pooling (0: none).
    pad_id: token id masked out of attention.
  """

  vocab_size: int
  max_len: int = 64
  width: int = 128
  depth: int = 2
  num_heads: int = 4
  mlp_ratio: float = 4.0
  out_dim: int = 0
  pad_id: int = 0
  norm_eps: float = 1e-6

  def __post_init__(self):
    if self.width % self.num_heads:
      raise ValueError(f"text width {self.width} is not divisible by num_heads {self.num_heads}")


class Block(nnx.Module):
  """Pre-norm self-attention + MLP block over [B, T, width] with a key padding mask."""

  def __init__(self, config: TextConfig, *, rngs: nnx.Rngs, dtype: Dtype, param_dtype: Dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    norm_kw = dict(eps=config.norm_eps, dtype=dtype, param_dtype=param_dtype)
    self.norm1 = layers.LayerNorm(config.width, **norm_kw)
    self.attention = layers.MultiHeadAttention(config.width, config.num_heads, fused_qkv=True,
                                               **kw)
    self.norm2 = layers.LayerNorm(config.width, **norm_kw)
    self.mlp = layers.Mlp(config.width, int(config.width * config.mlp_ratio), **kw)

  def __call__(self, x: jax.Array, valid_bt: jax.Array) -> jax.Array:
    x = x + self.attention(self.norm1(x), valid_bk=valid_bt)
    return x + self.mlp(self.norm2(x))


class TextEncoder(nnx.Module):
  """Token ids [B, T] (BOS first, right-padded) -> pooled embedding [B, out_dim or width]."""

  def __init__(self, config: TextConfig, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32):
    self.config, self.dtype = config, dtype
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.text_embed = layers.TokenEmbedding(config.vocab_size, config.max_len, config.width,
                                            config.pad_id, **kw)
    self.blocks = nnx.List([Block(config, **kw) for _ in range(config.depth)])
    self.norm = layers.LayerNorm(config.width, eps=config.norm_eps, dtype=dtype,
                              param_dtype=param_dtype)
    self.head = (layers.Dense(config.width, config.out_dim, ("embed", None), **kw)
                 if config.out_dim else None)

  @property
  def out_dim(self) -> int:
    return self.config.out_dim or self.config.width

  def __call__(self, tokens_bt: jax.Array) -> jax.Array:
    x, valid_bt = self.text_embed(tokens_bt)
    for block in self.blocks:
      x = block(x, valid_bt)
    pooled = self.norm(x[:, 0])
    return self.head(pooled) if self.head is not None else pooled
