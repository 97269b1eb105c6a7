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
pre-norm by default (``norm_position="pre"``): the demo trains from scratch on a few dozen
slides, where pre-norm trains stably without warm-up tricks. ``norm_position="post"`` computes
what BERT computes (a LayerNorm after each residual sum, one after the embeddings, none at the
end), so BERT-family weights import into the text branch and self-attention
(``convert/bert.py``); as in BLIP-2, the learned queries pass through the embedding LayerNorm too.

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

from pathflip_jax.models import layers

Dtype = Any


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
    norm_eps: LayerNorm epsilon (BERT checkpoints: their ``layer_norm_eps``, 1e-12).
    norm_position: "pre" (x + f(norm(x)), a final norm) or "post" (norm(x + f(x)), BERT's,
      with a norm after the embeddings and none at the end).
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
  norm_position: str = "pre"

  def __post_init__(self):
    if self.norm_position not in ("pre", "post"):
      raise ValueError(f"qformer norm_position must be 'pre' or 'post', got "
                       f"{self.norm_position!r}")
    if self.width % self.num_heads:
      raise ValueError(f"qformer width {self.width} is not divisible by num_heads "
                       f"{self.num_heads}")
    if self.cross_attention_every < 1:
      raise ValueError(f"cross_attention_every must be >= 1, got {self.cross_attention_every}")

  def has_cross_attention(self, layer: int) -> bool:
    return layer % self.cross_attention_every == 0


class Layer(nnx.Module):
  """Shared self-attention, optional cross-attention (queries only), per-branch MLPs; each
  sub-block pre-norm (x + f(norm(x))) or post-norm (norm(x + f(x))) by ``norm_position``."""

  def __init__(self, config: QFormerConfig, cross: bool, *, rngs: nnx.Rngs, dtype: Dtype,
               param_dtype: Dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    norm = lambda: layers.LayerNorm(config.width, eps=config.norm_eps, dtype=dtype,
                                 param_dtype=param_dtype)
    hidden = int(config.width * config.mlp_ratio)
    self.post_norm = config.norm_position == "post"
    self.self_norm = norm()
    self.self_attention = layers.MultiHeadAttention(config.width, config.num_heads, **kw)
    self.cross_norm = norm() if cross else None
    self.cross_attention = (layers.MultiHeadAttention(config.width, config.num_heads, **kw)
                            if cross else None)
    self.query_mlp_norm = norm()
    self.query_mlp = layers.Mlp(config.width, hidden, **kw)
    self.text_mlp_norm = norm()
    self.text_mlp = layers.Mlp(config.width, hidden, **kw)

  def _residual(self, x, f, norm) -> jax.Array:
    return norm(x + f(x)) if self.post_norm else x + f(norm(x))

  def self_attend(self, x_bqd, valid_bq=None, first_only: bool = False) -> jax.Array:
    """The shared self-attention sub-block; ``first_only``: just the first row's output."""
    y = x_bqd if self.post_norm else self.self_norm(x_bqd)
    first = x_bqd[:, :1] if first_only else x_bqd
    out = first + self.self_attention(y[:, :1] if first_only else y, y, valid_bq)
    return self.self_norm(out) if self.post_norm else out

  def cross_input(self, x_bqd) -> jax.Array:
    """What the cross-attention's queries read (normed first in pre-norm blocks)."""
    return x_bqd if self.post_norm else self.cross_norm(x_bqd)

  def queries(self, x_bqd, patches_bnd, valid_bn, chunk: int) -> jax.Array:
    x_bqd = self.self_attend(x_bqd)
    if self.cross_attention is not None:
      x_bqd = x_bqd + self.cross_attention.chunked(self.cross_input(x_bqd), patches_bnd,
                                                   valid_bn, chunk)
      if self.post_norm:
        x_bqd = self.cross_norm(x_bqd)
    return self._residual(x_bqd, self.query_mlp, self.query_mlp_norm)

  def text(self, x_btd, valid_bt, first_only: bool = False) -> jax.Array:
    """The text branch; ``first_only`` returns just the first (CLS) row, [b, 1, d]: the last
    layer's other rows feed nothing, and skipping them saves a third of the text encoder."""
    x_btd = self.self_attend(x_btd, valid_bt, first_only)
    return self._residual(x_btd, self.text_mlp, self.text_mlp_norm)


class QFormer(nnx.Module):
  """Patch features [b, n, feature_dim] -> query outputs; token ids [b, t] -> text CLS."""

  def __init__(self, config: QFormerConfig, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32):
    self.config, self.dtype = config, dtype
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    norm_kw = dict(eps=config.norm_eps, dtype=dtype, param_dtype=param_dtype)
    self.feature_proj = layers.Dense(config.feature_dim, config.width, (None, "embed"), **kw)
    self.feature_norm = layers.LayerNorm(config.width, **norm_kw)
    self.query_tokens = layers.param(rngs.params(), nnx.initializers.normal(0.02),
                                   (config.num_queries, config.width), (None, "embed"),
                                   param_dtype)
    self.text_embed = layers.TokenEmbedding(config.vocab_size, config.max_text_len,
                                            config.width, config.pad_id, **kw)
    post = config.norm_position == "post"
    # Post-norm (BERT): a norm after the embeddings (the text's and the queries'), none at the
    # end; pre-norm: the reverse.
    self.embed_norm = layers.LayerNorm(config.width, **norm_kw) if post else None
    self.layers = nnx.List([Layer(config, config.has_cross_attention(i), **kw)
                            for i in range(config.depth)])
    self.norm = None if post else layers.LayerNorm(config.width, **norm_kw)

  def _embedded(self, x: jax.Array) -> jax.Array:
    return x if self.embed_norm is None else self.embed_norm(x)

  def _final(self, x: jax.Array) -> jax.Array:
    return x if self.norm is None else self.norm(x)

  def _query_tokens(self, b: int) -> jax.Array:
    x = jnp.broadcast_to(self.query_tokens[...].astype(self.dtype),
                         (b,) + self.query_tokens.shape)
    return self._embedded(x)

  def project_features(self, features_bnf: jax.Array) -> jax.Array:
    """Patch features -> the Q-Former's width (once per slide; regions reuse the result)."""
    return self.feature_norm(self.feature_proj(features_bnf))

  def encode_patches(self, patches_bnd: jax.Array, valid_bn: jax.Array) -> jax.Array:
    """Projected patches [b, n, width] (``project_features``) -> query outputs [b, q, width].

    A set with no valid patch gives finite outputs (the queries' own path) that callers mask.
    """
    x = self._query_tokens(patches_bnd.shape[0])
    for layer in self.layers:
      x = layer.queries(x, patches_bnd, valid_bn, self.config.kv_chunk)
    return self._final(x)

  def patch_attention(self, patches_bnd: jax.Array, valid_bn: jax.Array) -> jax.Array:
    """Attention of the queries over the patches in the last cross-attention layer, averaged
    over heads and queries: [b, n], each row summing to 1 over valid patches (for heatmaps)."""
    x = self._query_tokens(patches_bnd.shape[0])
    last = max(i for i in range(self.config.depth) if self.config.has_cross_attention(i))
    for i, layer in enumerate(self.layers):
      if i == last:
        x = layer.self_attend(x)
        weights_bhqn = layer.cross_attention.weights(layer.cross_input(x), patches_bnd,
                                                     valid_bn)
        return weights_bhqn.mean(axis=(1, 2))
      x = layer.queries(x, patches_bnd, valid_bn, self.config.kv_chunk)
    raise AssertionError("unreachable: layer 0 always has cross-attention")

  def encode_text(self, tokens_bt: jax.Array) -> jax.Array:
    """Token ids [b, t] (BOS first, right-padded) -> the BOS token's output [b, width]."""
    x, valid_bt = self.text_embed(tokens_bt)
    x = self._embedded(x)
    for i, layer in enumerate(self.layers):
      x = layer.text(x, valid_bt, first_only=i == len(self.layers) - 1)
    return self._final(x[:, 0])

  def text_states(self, tokens_bt: jax.Array) -> list[jax.Array]:
    """Every row's hidden states [b, t, width] after the embeddings and after each layer (what
    BERT's ``hidden_states`` holds; the pre-norm final norm is not applied): for checks."""
    x, valid_bt = self.text_embed(tokens_bt)
    states = [self._embedded(x)]
    for layer in self.layers:
      states.append(layer.text(states[-1], valid_bt))
    return states
