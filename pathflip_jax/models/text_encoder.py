"""A small bidirectional text Transformer (Flax NNX): token ids -> one pooled text embedding.

The text tower of the patch-text pretraining (``configs/patch_clip_demo.py``). Pre-norm blocks as
in the ViT (``vit.LayerNorm``/``vit.Dense`` are reused), learned position embeddings, padding
masked out of attention, and the BOS token's output as the text's embedding (BERT's CLS role),
so the tokenizer must put BOS first (``Tokenizer.encode_batch(add_bos=True)``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pathflip_jax.models import vit

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
    width, heads = config.width, config.num_heads
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    norm_kw = dict(eps=config.norm_eps, dtype=dtype, param_dtype=param_dtype)
    self.num_heads, self.dtype = heads, dtype
    self.norm1 = vit.LayerNorm(width, **norm_kw)
    self.qkv = vit.Dense(width, 3 * width, ("embed", "heads"), **kw)
    self.proj = vit.Dense(width, width, ("heads", "embed"), **kw)
    self.norm2 = vit.LayerNorm(width, **norm_kw)
    hidden = int(width * config.mlp_ratio)
    self.fc1 = vit.Dense(width, hidden, ("embed", "mlp"), **kw)
    self.fc2 = vit.Dense(hidden, width, ("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array, valid_bt: jax.Array) -> jax.Array:
    b, t, d = x.shape
    h = self.num_heads
    # einsum letters: b batch, q/k query/key tokens, h heads, c head channels.
    qkv = self.qkv(self.norm1(x)).reshape(b, t, 3, h, d // h)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum("bqhc,bkhc->bhqk", q, k).astype(jnp.float32) * (d // h) ** -0.5
    logits = jnp.where(valid_bt[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    attended = jnp.einsum("bhqk,bkhc->bqhc", weights, v).reshape(b, t, d)
    x = x + self.proj(attended)
    return x + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x)), approximate=False))


class TextEncoder(nnx.Module):
  """Token ids [B, T] (BOS first, right-padded) -> pooled embedding [B, out_dim or width]."""

  def __init__(self, config: TextConfig, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32):
    self.config, self.dtype = config, dtype
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.token_embed = vit._param(rngs.params(), nnx.initializers.normal(0.02),
                                  (config.vocab_size, config.width), ("vocab", "embed"),
                                  param_dtype)
    self.pos_embed = vit._param(rngs.params(), nnx.initializers.normal(0.01),
                                (config.max_len, config.width), ("tokens", "embed"), param_dtype)
    self.blocks = nnx.List([Block(config, **kw) for _ in range(config.depth)])
    self.norm = vit.LayerNorm(config.width, eps=config.norm_eps, dtype=dtype,
                              param_dtype=param_dtype)
    self.head = (vit.Dense(config.width, config.out_dim, ("embed", None), **kw)
                 if config.out_dim else None)

  @property
  def out_dim(self) -> int:
    return self.config.out_dim or self.config.width

  def __call__(self, tokens_bt: jax.Array) -> jax.Array:
    b, t = tokens_bt.shape
    if t > self.config.max_len:
      raise ValueError(f"text of {t} tokens is longer than the encoder's max_len "
                       f"{self.config.max_len}")
    valid_bt = tokens_bt != self.config.pad_id
    x = jnp.take(self.token_embed[...], tokens_bt, axis=0).astype(self.dtype)
    x = x + self.pos_embed[:t].astype(self.dtype)
    for block in self.blocks:
      x = block(x, valid_bt)
    pooled = self.norm(x[:, 0])
    return self.head(pooled) if self.head is not None else pooled
