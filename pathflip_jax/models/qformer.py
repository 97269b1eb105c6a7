"""BLIP-2-style Q-Former (Flax NNX): learned queries read a set of patch features; its text
branch, which shares the self-attention layers, is the text encoder.

PathFLIP uses one Q-Former twice: as the *slide* Q-Former (queries over all N patches of a slide)
and as the *region* Q-Former (the same queries over each region's patches). Layers:

  query branch   x_q = queries            text branch   x_t = token + position embeddings
    self-attention over the queries         self-attention over the tokens (padding masked)
    cross-attention into the patches        (no cross-attention)
      (every ``cross_attention_every``-th layer, from layer 0)
    query MLP                               text MLP

Self-attention weights are shared by both branches, MLPs are not (as in BLIP-2). Blocks are
pre-norm rather than BERT's post-norm: the demo trains from scratch on a few dozen slides, where
pre-norm trains stably without warm-up tricks (BERT weights are not imported here).

Cross-attention over patches is computed in chunks of ``kv_chunk`` keys with a running softmax
(the keys and values of a chunk are projected inside the loop and rematerialised for the backward
pass), so a slide's memory grows linearly with N at a small constant: 100k patches fit on a laptop.

Einsum letters: b batch (slides or regions), n patches, q queries, t text tokens, h heads,
c head channels, d width.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pathflip_jax.models import vit

Dtype = Any
_NEG = -1e30


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
  """Sizes of the Q-Former (paper: BERT-base sizes, 8 queries, 512-d CONCH features).

  Attributes:
    feature_dim: width of the input patch features (D_in).
    width, depth, num_heads, mlp_ratio: Transformer sizes.
    num_queries: learned query tokens.
    cross_attention_every: cross-attention into the patches in layers 0, k, 2k, ...
    vocab_size, max_text_len, pad_id: the text branch's embeddings and padding token.
    kv_chunk: patch keys per chunk of the cross-attention (memory per chunk, not per slide).
  """

  feature_dim: int = 512
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  num_queries: int = 8
  cross_attention_every: int = 2
  vocab_size: int = 30522
  max_text_len: int = 512
  pad_id: int = 0
  kv_chunk: int = 2048
  norm_eps: float = 1e-6

  def __post_init__(self):
    if self.width % self.num_heads:
      raise ValueError(f"qformer width {self.width} is not divisible by num_heads "
                       f"{self.num_heads}")
    if self.cross_attention_every < 1:
      raise ValueError(f"cross_attention_every must be >= 1, got {self.cross_attention_every}")

  def has_cross_attention(self, layer: int) -> bool:
    return layer % self.cross_attention_every == 0


class Attention(nnx.Module):
  """Multi-head attention with separate q/k/v/o projections, kernels [d, h, c] / [h, c, d]."""

  def __init__(self, width: int, num_heads: int, *, rngs: nnx.Rngs, dtype: Dtype,
               param_dtype: Dtype, kv_width: int | None = None):
    kv_width = kv_width or width
    head_dim = width // num_heads
    self.num_heads, self.head_dim, self.dtype = num_heads, head_dim, dtype
    init = nnx.initializers.normal(0.02)
    zeros = nnx.initializers.zeros_init()

    def kernel(d_in, axes):
      return vit._param(rngs.params(), init, (d_in, num_heads, head_dim), axes, param_dtype)

    self.q_kernel = kernel(width, ("embed", "heads", "kv"))
    self.k_kernel = kernel(kv_width, ("embed", "heads", "kv"))
    self.v_kernel = kernel(kv_width, ("embed", "heads", "kv"))
    self.q_bias, self.k_bias, self.v_bias = (
        vit._param(None, zeros, (num_heads, head_dim), ("heads", "kv"), param_dtype)
        for _ in range(3))
    self.o_kernel = vit._param(rngs.params(), init, (num_heads, head_dim, width),
                               ("heads", "kv", "embed"), param_dtype)
    self.o_bias = vit._param(None, zeros, (width,), ("embed",), param_dtype)

  def project(self, x: jax.Array, which: str) -> jax.Array:
    """[..., d] -> [..., h, c] with the q, k or v projection (one 2-D matmul: see vit.Dense)."""
    kernel = getattr(self, f"{which}_kernel")[...].astype(self.dtype)
    bias = getattr(self, f"{which}_bias")[...].astype(self.dtype)
    d = kernel.shape[0]
    y = x.astype(self.dtype).reshape(-1, d) @ kernel.reshape(d, -1) + bias.reshape(-1)
    return y.reshape(*x.shape[:-1], self.num_heads, self.head_dim)

  def output(self, attended_bqhc: jax.Array) -> jax.Array:
    b, q, h, c = attended_bqhc.shape
    kernel = self.o_kernel[...].astype(self.dtype).reshape(h * c, -1)
    out = attended_bqhc.reshape(b * q, h * c) @ kernel + self.o_bias[...].astype(self.dtype)
    return out.reshape(b, q, -1)

  def __call__(self, x_bqd: jax.Array, kv_bkd: jax.Array, valid_bk: jax.Array | None = None
               ) -> jax.Array:
    """Full (unchunked) attention of x over kv, keys masked by ``valid_bk``."""
    return self.attend(self.weights(x_bqd, kv_bkd, valid_bk), kv_bkd)

  def attend(self, weights_bhqk: jax.Array, kv_bkd: jax.Array) -> jax.Array:
    """The output for given attention weights [b, h, q, k]: their mix of the projected values
    of ``kv_bkd``, through the output projection (for callers that need the weights too)."""
    v_bhkc = self.project(kv_bkd, "v").transpose(0, 2, 1, 3)
    attended = jnp.einsum("bhqk,bhkc->bhqc", weights_bhqk.astype(self.dtype), v_bhkc)
    return self.output(attended.transpose(0, 2, 1, 3))

  def weights(self, x_bqd: jax.Array, kv_bkd: jax.Array, valid_bk: jax.Array | None = None
              ) -> jax.Array:
    """Softmax attention weights [b, h, q, k] (float32).

    Computed in the (batch, heads, tokens, channels) layout, the fastest on XLA:CPU
    (NOTES-dependencies.md, item 15).
    """
    q_bhqc = self.project(x_bqd, "q").transpose(0, 2, 1, 3)
    k_bhkc = self.project(kv_bkd, "k").transpose(0, 2, 1, 3)
    logits = jnp.einsum("bhqc,bhkc->bhqk", q_bhqc, k_bhkc).astype(jnp.float32)
    logits = logits * self.head_dim ** -0.5
    if valid_bk is not None:
      logits = jnp.where(valid_bk[:, None, None, :], logits, _NEG)
    return jax.nn.softmax(logits, axis=-1)

  def chunked(self, x_bqd: jax.Array, kv_bnd: jax.Array, valid_bn: jax.Array,
              chunk: int) -> jax.Array:
    """The same as ``__call__``, with keys in chunks of ``chunk`` and a running softmax.

    Keys/values are projected chunk by chunk inside a ``lax.scan`` whose body is rematerialised
    for the backward pass, so nothing of size N x width per layer is kept; the query side (a few
    tokens) is tiny. Fully masked rows give zeros, not NaN.
    """
    b, n, d = kv_bnd.shape
    if n <= chunk:
      return self(x_bqd, kv_bnd, valid_bn)
    pad = -n % chunk
    if pad:
      kv_bnd = jnp.pad(kv_bnd, ((0, 0), (0, pad), (0, 0)))
      valid_bn = jnp.pad(valid_bn, ((0, 0), (0, pad)))
    num_chunks = (n + pad) // chunk
    kv_sbnd = kv_bnd.reshape(b, num_chunks, chunk, d).swapaxes(0, 1)
    valid_sbn = valid_bn.reshape(b, num_chunks, chunk).swapaxes(0, 1)
    q = self.project(x_bqd, "q")
    qlen = q.shape[1]
    h, c = self.num_heads, self.head_dim

    @jax.checkpoint
    def step(carry, inputs):
      max_bhq, sum_bhq, acc_bqhc = carry
      kv, valid = inputs
      k = self.project(kv, "k")
      v = self.project(kv, "v")
      logits = jnp.einsum("bqhc,bkhc->bhqk", q, k).astype(jnp.float32) * c ** -0.5
      logits = jnp.where(valid[:, None, None, :], logits, _NEG)
      new_max = jnp.maximum(max_bhq, logits.max(axis=-1))
      correction = jnp.exp(max_bhq - new_max)
      p = jnp.exp(logits - new_max[..., None]) * valid[:, None, None, :]
      sum_bhq = sum_bhq * correction + p.sum(axis=-1)
      acc_bqhc = (acc_bqhc * correction.transpose(0, 2, 1)[..., None]
                  + jnp.einsum("bhqk,bkhc->bqhc", p, v.astype(jnp.float32)))
      return (new_max, sum_bhq, acc_bqhc), None

    init = (jnp.full((b, h, qlen), _NEG, jnp.float32), jnp.zeros((b, h, qlen), jnp.float32),
            jnp.zeros((b, qlen, h, c), jnp.float32))
    (_, sum_bhq, acc_bqhc), _ = jax.lax.scan(step, init, (kv_sbnd, valid_sbn))
    attended = acc_bqhc / jnp.maximum(sum_bhq.transpose(0, 2, 1)[..., None], 1e-30)
    return self.output(attended.astype(self.dtype))


class Mlp(nnx.Module):

  def __init__(self, width: int, hidden: int, *, rngs: nnx.Rngs, dtype: Dtype,
               param_dtype: Dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.fc1 = vit.Dense(width, hidden, ("embed", "mlp"), **kw)
    self.fc2 = vit.Dense(hidden, width, ("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class Layer(nnx.Module):
  """Shared self-attention, optional cross-attention (queries only), per-branch MLPs."""

  def __init__(self, config: QFormerConfig, cross: bool, *, rngs: nnx.Rngs, dtype: Dtype,
               param_dtype: Dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    norm = lambda: vit.LayerNorm(config.width, eps=config.norm_eps, dtype=dtype,
                                 param_dtype=param_dtype)
    hidden = int(config.width * config.mlp_ratio)
    self.self_norm = norm()
    self.self_attention = Attention(config.width, config.num_heads, **kw)
    self.cross_norm = norm() if cross else None
    self.cross_attention = Attention(config.width, config.num_heads, **kw) if cross else None
    self.query_mlp_norm = norm()
    self.query_mlp = Mlp(config.width, hidden, **kw)
    self.text_mlp_norm = norm()
    self.text_mlp = Mlp(config.width, hidden, **kw)

  def queries(self, x_bqd, patches_bnd, valid_bn, chunk: int) -> jax.Array:
    y = self.self_norm(x_bqd)
    x_bqd = x_bqd + self.self_attention(y, y)
    if self.cross_attention is not None:
      x_bqd = x_bqd + self.cross_attention.chunked(self.cross_norm(x_bqd), patches_bnd,
                                                   valid_bn, chunk)
    return x_bqd + self.query_mlp(self.query_mlp_norm(x_bqd))

  def text(self, x_btd, valid_bt, first_only: bool = False) -> jax.Array:
    """The text branch; ``first_only`` returns just the first (CLS) row, [b, 1, d]: the last
    layer's other rows feed nothing, and skipping them saves a third of the text encoder."""
    y = self.self_norm(x_btd)
    if first_only:
      x_btd = x_btd[:, :1] + self.self_attention(y[:, :1], y, valid_bt)
    else:
      x_btd = x_btd + self.self_attention(y, y, valid_bt)
    return x_btd + self.text_mlp(self.text_mlp_norm(x_btd))


class QFormer(nnx.Module):
  """Patch features [b, n, feature_dim] -> query outputs; token ids [b, t] -> text CLS."""

  def __init__(self, config: QFormerConfig, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32):
    self.config, self.dtype = config, dtype
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    norm_kw = dict(eps=config.norm_eps, dtype=dtype, param_dtype=param_dtype)
    self.feature_proj = vit.Dense(config.feature_dim, config.width, (None, "embed"), **kw)
    self.feature_norm = vit.LayerNorm(config.width, **norm_kw)
    self.query_tokens = vit._param(rngs.params(), nnx.initializers.normal(0.02),
                                   (config.num_queries, config.width), (None, "embed"),
                                   param_dtype)
    self.token_embed = vit._param(rngs.params(), nnx.initializers.normal(0.02),
                                  (config.vocab_size, config.width), ("vocab", "embed"),
                                  param_dtype)
    self.pos_embed = vit._param(rngs.params(), nnx.initializers.normal(0.01),
                                (config.max_text_len, config.width), ("tokens", "embed"),
                                param_dtype)
    self.layers = nnx.List([Layer(config, config.has_cross_attention(i), **kw)
                            for i in range(config.depth)])
    self.norm = vit.LayerNorm(config.width, **norm_kw)

  def project_features(self, features_bnf: jax.Array) -> jax.Array:
    """Patch features -> the Q-Former's width (once per slide; regions reuse the result)."""
    return self.feature_norm(self.feature_proj(features_bnf))

  def encode_patches(self, patches_bnd: jax.Array, valid_bn: jax.Array) -> jax.Array:
    """Projected patches [b, n, width] (``project_features``) -> query outputs [b, q, width].

    A set with no valid patch gives finite outputs (the queries' own path) that callers mask.
    """
    b = patches_bnd.shape[0]
    x = jnp.broadcast_to(self.query_tokens[...].astype(self.dtype),
                         (b,) + self.query_tokens.shape)
    for layer in self.layers:
      x = layer.queries(x, patches_bnd, valid_bn, self.config.kv_chunk)
    return self.norm(x)

  def patch_attention(self, patches_bnd: jax.Array, valid_bn: jax.Array) -> jax.Array:
    """Attention of the queries over the patches in the last cross-attention layer, averaged
    over heads and queries: [b, n], each row summing to 1 over valid patches (for heatmaps)."""
    b = patches_bnd.shape[0]
    x = jnp.broadcast_to(self.query_tokens[...].astype(self.dtype),
                         (b,) + self.query_tokens.shape)
    last = max(i for i in range(self.config.depth) if self.config.has_cross_attention(i))
    for i, layer in enumerate(self.layers):
      if i == last:
        y = layer.self_norm(x)
        x = x + layer.self_attention(y, y)
        weights_bhqn = layer.cross_attention.weights(layer.cross_norm(x), patches_bnd, valid_bn)
        return weights_bhqn.mean(axis=(1, 2))
      x = layer.queries(x, patches_bnd, valid_bn, self.config.kv_chunk)
    raise AssertionError("unreachable: layer 0 always has cross-attention")

  def encode_text(self, tokens_bt: jax.Array) -> jax.Array:
    """Token ids [b, t] (BOS first, right-padded) -> the BOS token's output [b, width]."""
    t = tokens_bt.shape[1]
    if t > self.config.max_text_len:
      raise ValueError(f"text of {t} tokens is longer than the Q-Former's max_text_len "
                       f"{self.config.max_text_len}")
    valid_bt = tokens_bt != self.config.pad_id
    x = jnp.take(self.token_embed[...], tokens_bt, axis=0).astype(self.dtype)
    x = x + self.pos_embed[:t].astype(self.dtype)
    for i, layer in enumerate(self.layers):
      x = layer.text(x, valid_bt, first_only=i == len(self.layers) - 1)
    return self.norm(x[:, 0])
