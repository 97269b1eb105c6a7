"""PathFLIP (Flax NNX): slide and region embeddings from patch features, text embeddings from
the Q-Former's text branch, and text-conditioned region embeddings (DESIGN.md section 2).

  patch features [b, n, f] --Q-Former (all patches)--------> slide token   [b, e]
                   region_index [b, m, p] --Q-Former (per region)--> region tokens [b, m, e]
  [slide; regions + 2-D position] --slide-context Transformer--> slide / region embeddings
  subcaption embedding [b, t, e] --attends over the slide's regions--> text-conditioned region
                                                                       embedding [b, t, e]

One set of Q-Former weights serves the slide, the regions and the text. Einsum letters: b slides,
n patches, m regions, p patches per region, t texts, e embedding width, w Q-Former width.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from pathflip_jax.models import layers, qformer as qformer_lib

Dtype = Any


@dataclasses.dataclass(frozen=True)
class PathFlipConfig:
  """Sizes and switches of the alignment model (paper values as defaults).

  Attributes:
    qformer: the shared Q-Former.
    embed_dim: width of the joint slide/region/text space (paper: 256).
    context_depth, context_heads: the slide-context Transformer over [slide; regions].
    region_heads: heads of the text-conditioned region attention (paper: 8).
    region_attention: False replaces the text-conditioned attention by the mean of the slide's
      region embeddings (the ablation "mean-pooled regions").
    region_qformer: False replaces the region Q-Former by a linear projection of the mean of
      each region's patch features (the ablation "no region Q-Former").
    slide_qformer: False replaces the slide Q-Former by the mean of the slide's region tokens
      (the ablation "no slide Q-Former").
    position_frequencies: sinusoid frequencies per axis of the 2-D region positions.
    region_init_scale, region_init_bias: initial logit scale (log space) and bias of the
      region-level sigmoid loss.
  """

  qformer: qformer_lib.QFormerConfig
  embed_dim: int = 256
  context_depth: int = 2
  context_heads: int = 8
  context_mlp_ratio: float = 4.0
  region_heads: int = 8
  region_attention: bool = True
  region_qformer: bool = True
  slide_qformer: bool = True
  position_frequencies: int = 16
  region_init_scale: float = math.log(1 / 0.07)
  region_init_bias: float = 0.0

  def __post_init__(self):
    for name, heads in (("context_heads", self.context_heads),
                        ("region_heads", self.region_heads)):
      if self.embed_dim % heads:
        raise ValueError(f"embed_dim {self.embed_dim} is not divisible by {name} {heads}")


def region_positions(pos_bm2: jax.Array, frequencies: int) -> jax.Array:
  """Integer region grid coordinates [..., 2] -> sinusoids [..., 4 * frequencies].

  Wavelengths from 2 to ~1000 regions, so neighbours and halves of a slide are both told apart
  whatever the slide's size (no learned table with a maximum grid).
  """
  scales = jnp.exp(jnp.linspace(0.0, math.log(500.0), frequencies)) / math.pi
  angles = pos_bm2.astype(jnp.float32)[..., None] / scales          # [..., 2, f]
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(
      *pos_bm2.shape[:-1], 4 * frequencies)


class ContextBlock(nnx.Module):
  """Pre-norm Transformer block over [slide; regions] with a token mask."""

  def __init__(self, config: PathFlipConfig, *, rngs: nnx.Rngs, dtype: Dtype,
               param_dtype: Dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    e = config.embed_dim
    self.norm1 = layers.LayerNorm(e, eps=1e-6, dtype=dtype, param_dtype=param_dtype)
    self.attention = layers.MultiHeadAttention(e, config.context_heads, **kw)
    self.norm2 = layers.LayerNorm(e, eps=1e-6, dtype=dtype, param_dtype=param_dtype)
    self.mlp = layers.Mlp(e, int(e * config.context_mlp_ratio), **kw)

  def __call__(self, x_bse: jax.Array, valid_bs: jax.Array) -> jax.Array:
    y = self.norm1(x_bse)
    x_bse = x_bse + self.attention(y, y, valid_bs)
    return x_bse + self.mlp(self.norm2(x_bse))


class RegionAttention(nnx.Module):
  """Text-conditioned region attention: texts [b, t, e] query the regions [b, m, e].

  Both sides are layer-normed. The texts arrive as unit vectors (entries ~ 1/sqrt(e)): without
  the query norm the attention logits start ~sqrt(e) times smaller than the keys' side allows,
  so the weights stay almost uniform, whatever the text, for a whole demo run; normed, each
  entry is ~1 as in any pre-norm Transformer."""

  def __init__(self, config: PathFlipConfig, *, rngs: nnx.Rngs, dtype: Dtype,
               param_dtype: Dtype):
    e = config.embed_dim
    self.text_norm = layers.LayerNorm(e, eps=1e-6, dtype=dtype, param_dtype=param_dtype)
    self.region_norm = layers.LayerNorm(e, eps=1e-6, dtype=dtype, param_dtype=param_dtype)
    self.attention = layers.MultiHeadAttention(e, config.region_heads, rngs=rngs, dtype=dtype,
                                               param_dtype=param_dtype)

  def __call__(self, text_bte: jax.Array, regions_bme: jax.Array, valid_bm: jax.Array
               ) -> jax.Array:
    return self.attention(self.text_norm(text_bte), self.region_norm(regions_bme), valid_bm)

  def head_weights(self, text_bte: jax.Array, regions_bme: jax.Array, valid_bm: jax.Array
                   ) -> jax.Array:
    """Attention of each text over the regions, per head: [b, h, t, m]."""
    return self.attention.weights(self.text_norm(text_bte), self.region_norm(regions_bme),
                                  valid_bm)

  def weights(self, text_bte: jax.Array, regions_bme: jax.Array, valid_bm: jax.Array
              ) -> jax.Array:
    """Attention of each text over the regions, averaged over heads: [b, t, m]."""
    return self.head_weights(text_bte, regions_bme, valid_bm).mean(1)


def uniform_weights(valid_bk: jax.Array) -> jax.Array:
  """Equal float32 weights over each row's valid entries [b, k], summing to 1 (0 if none)."""
  weights_bk = valid_bk.astype(jnp.float32)
  return weights_bk / jnp.maximum(weights_bk.sum(-1, keepdims=True), 1.0)


def mean_regions(text_bte: jax.Array, regions_bme: jax.Array, valid_bm: jax.Array
                 ) -> jax.Array:
  """The ablation's stand-in for region attention: the mean of the valid regions, per text."""
  mean_be = jnp.einsum("bm,bme->be", uniform_weights(valid_bm), regions_bme.astype(jnp.float32))
  return jnp.broadcast_to(mean_be[:, None], text_bte.shape).astype(regions_bme.dtype)


def unit(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


class PathFlip(nnx.Module):
  """The alignment model. ``encode_slides(batch)`` reads these batch entries:

    features            [b, n, f]  patch features (padded)
    patch_valid         [b, n]     bool
    region_index        [b, m, p]  int32 rows of ``features`` forming each region (padded)
    region_patch_valid  [b, m, p]  bool
    region_valid        [b, m]     bool: the region exists
    region_pos          [b, m, 2]  int32 region grid (x, y)
  """

  def __init__(self, config: PathFlipConfig, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32):
    self.config, self.dtype = config, dtype
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    w, e = config.qformer.width, config.embed_dim
    self.qformer = qformer_lib.QFormer(config.qformer, **kw)
    self.vision_proj = layers.Dense(w, e, ("embed", None), **kw)
    self.text_proj = layers.Dense(w, e, ("embed", None), **kw)
    self.position_proj = layers.Dense(4 * config.position_frequencies, e, (None, None), **kw)
    self.context = nnx.List([ContextBlock(config, **kw) for _ in range(config.context_depth)])
    self.context_norm = layers.LayerNorm(e, eps=1e-6, dtype=dtype, param_dtype=param_dtype)
    self.region_attention = (RegionAttention(config, **kw) if config.region_attention
                             else None)
    self.region_logit_scale = nnx.Param(jnp.full((), config.region_init_scale, param_dtype))
    self.region_logit_bias = nnx.Param(jnp.full((), config.region_init_bias, param_dtype))
    # Created last, so that the paper's model draws the same initial parameters either way.
    self.region_feature_proj = (None if config.region_qformer else
                                layers.Dense(config.qformer.feature_dim, e, (None, "embed"), **kw))

  # ------------------------------------------------------------------------------ text
  def encode_texts(self, tokens_bt: jax.Array) -> jax.Array:
    """Token ids [b, t] -> unit-norm text embeddings [b, e] (float32)."""
    return unit(self.text_proj(self.qformer.encode_text(tokens_bt)))

  # ----------------------------------------------------------------------------- slides
  def _pooled(self, patches_bnw: jax.Array, valid_bn: jax.Array) -> jax.Array:
    """One token per row: the Q-Former's query outputs over the row's patches, mean-pooled and
    projected into the joint space [b, e]."""
    queries_bqw = self.qformer.encode_patches(patches_bnw, valid_bn)
    return self.vision_proj(queries_bqw.astype(jnp.float32).mean(axis=1).astype(self.dtype))

  @staticmethod
  def region_patches(patches_bnw: jax.Array, index_bmp: jax.Array) -> jax.Array:
    """Each region's rows of the projected patches, flattened for the Q-Former: [b*m, p, w]."""
    b, m, p = index_bmp.shape
    gathered = jnp.take_along_axis(patches_bnw, index_bmp.reshape(b, m * p, 1), axis=1)
    return gathered.reshape(b * m, p, -1)

  def region_patch_weights(self, patches_bnw: jax.Array, batch: Mapping[str, jax.Array]
                           ) -> jax.Array:
    """How much each of a region's patches makes its token [b, m, p], summing to 1 over the
    region's valid patches: the region Q-Former's attention over them (equal weights without a
    region Q-Former)."""
    b, m, p = batch["region_index"].shape
    if self.region_feature_proj is not None:
      return uniform_weights(batch["region_patch_valid"].reshape(b * m, p)).reshape(b, m, p)
    attention_kp = self.qformer.patch_attention(
        self.region_patches(patches_bnw, batch["region_index"]),
        batch["region_patch_valid"].reshape(b * m, p))
    return attention_kp.reshape(b, m, p)

  def region_tokens(self, patches_bnw: jax.Array, batch: Mapping[str, jax.Array]) -> jax.Array:
    """The region Q-Former: each region's patches -> one token per region [b, m, e] (without
    it: the projected mean of the region's patch features)."""
    b, m, p = batch["region_index"].shape
    valid_kp = batch["region_patch_valid"].reshape(b * m, p)
    if self.region_feature_proj is not None:
      features_kpf = self.region_patches(batch["features"], batch["region_index"])
      mean_kf = jnp.einsum("kp,kpf->kf", uniform_weights(valid_kp),
                           features_kpf.astype(jnp.float32))
      return self.region_feature_proj(mean_kf.astype(self.dtype)).reshape(b, m, -1)
    tokens_ke = self._pooled(self.region_patches(patches_bnw, batch["region_index"]), valid_kp)
    return tokens_ke.reshape(b, m, -1)

  def encode_slides(self, batch: Mapping[str, jax.Array],
                    patches_bnw: jax.Array | None = None) -> dict[str, Any]:
    """Slide embedding [b, e] (unit norm) and the contextualised region embeddings [b, m, e]
    that the text-conditioned attention reads and the instruct stage hands its decoder.
    ``patches_bnw``: the projected patch features, when the caller has them already."""
    if patches_bnw is None:
      patches_bnw = self.qformer.project_features(batch["features"])
    region_valid = batch["region_valid"]
    own_bme = self.region_tokens(patches_bnw, batch)
    if self.config.slide_qformer:
      slide_be = self._pooled(patches_bnw, batch["patch_valid"])
    else:   # the ablation: the mean of the region tokens stands for the slide
      slide_be = jnp.einsum("bm,bme->be", uniform_weights(region_valid),
                            own_bme.astype(jnp.float32)).astype(own_bme.dtype)
    positions = region_positions(batch["region_pos"], self.config.position_frequencies)
    regions_bme = own_bme + self.position_proj(positions)
    tokens = jnp.concatenate([slide_be[:, None], regions_bme], axis=1)
    valid = jnp.concatenate([jnp.ones_like(region_valid[:, :1]), region_valid], axis=1)
    for block in self.context:
      tokens = block(tokens, valid)
    tokens = self.context_norm(tokens)
    return {"slide": unit(tokens[:, 0]), "regions": tokens[:, 1:], "region_valid": region_valid}

  # ----------------------------------------------------------- text-conditioned regions
  def attend_fn(self):
    """(attend, params): the text-conditioned region embedding as a pure function
    ``attend(params, text_bte, regions_bme, valid_bm) -> z_bte`` (what the region loss calls,
    possibly inside ``shard_map``)."""
    if self.region_attention is None:
      return (lambda params, text, regions, valid: mean_regions(text, regions, valid)), {}
    graphdef, params = nnx.split(self.region_attention)

    def attend(params, text_bte, regions_bme, valid_bm):
      return nnx.merge(graphdef, params)(text_bte, regions_bme, valid_bm)

    return attend, params

  def text_conditioned_regions(self, text_bte: jax.Array, regions_bme: jax.Array,
                               valid_bm: jax.Array) -> jax.Array:
    attend, params = self.attend_fn()
    return attend(params, text_bte, regions_bme, valid_bm)

  def region_scores(self, text_bte: jax.Array, regions_bme: jax.Array, valid_bm: jax.Array
                    ) -> jax.Array:
    """cos(text, its text-conditioned region embedding) per slide and text: [b, t]."""
    z = unit(self.text_conditioned_regions(text_bte, regions_bme, valid_bm))
    return jnp.einsum("bte,bte->bt", unit(text_bte), z)

  def region_text_attention(self, text_bte: jax.Array, regions_bme: jax.Array,
                            valid_bm: jax.Array) -> jax.Array:
    """How much each text attends to each region [b, t, m] (uniform for the ablation)."""
    if self.region_attention is None:
      return jnp.broadcast_to(uniform_weights(valid_bm)[:, None],
                              text_bte.shape[:2] + valid_bm.shape[1:])
    return self.region_attention.weights(text_bte, regions_bme, valid_bm)

  def region_contributions(self, text_bte: jax.Array, regions_bme: jax.Array,
                           valid_bm: jax.Array) -> jax.Array:
    """Each region's share of cos(text, text-conditioned region embedding) [b, t, m].

    The text-conditioned embedding is sum_m sum_h w[h, m] * o_h(v_h(region m)) + o_bias, so
    <unit(text), it> splits exactly into one term per region (the bias aside): attention weight
    times how well that region's value matches the text. Unlike the weights alone it is signed
    and tells a region that is attended to but does not match (uniform for the ablation)."""
    if self.region_attention is None:
      return self.region_text_attention(text_bte, regions_bme, valid_bm)
    attention = self.region_attention.attention
    keys_bme = self.region_attention.region_norm(regions_bme)
    weights_bhtm = self.region_attention.head_weights(text_bte, regions_bme, valid_bm)
    v_bmhc = attention.project(keys_bme, "v").astype(jnp.float32)
    o_hce = attention.o_kernel[...].astype(jnp.float32)
    text_be = unit(text_bte)
    # Per region and head, the output projection of its value dotted with the text.
    match_bthm = jnp.einsum("bmhc,hce,bte->bthm", v_bmhc, o_hce, text_be)
    z_norm_bt = jnp.linalg.norm(
        self.text_conditioned_regions(text_bte, regions_bme, valid_bm).astype(jnp.float32),
        axis=-1)
    contribution_btm = jnp.einsum("bhtm,bthm->btm", weights_bhtm, match_bthm)
    return contribution_btm / jnp.maximum(z_norm_bt[..., None], 1e-6)

  def patch_heatmap(self, batch: Mapping[str, jax.Array], text_bte: jax.Array,
                    method: str = "contribution") -> jax.Array:
    """Patch-level heatmap of each text [b, t, n] (DESIGN.md section 2.4): a score per region
    (``method`` "contribution": :meth:`region_contributions`; "attention": the
    text-conditioned attention weights, averaged over heads) times the region Q-Former's
    attention over that region's patches (relative to the region's mean;
    :meth:`region_patch_weights`). Patches of no kept region score 0."""
    patches_bnw = self.qformer.project_features(batch["features"])
    encoded = self.encode_slides(batch, patches_bnw)
    regions_bme, valid_bm = encoded["regions"], encoded["region_valid"]
    if method == "attention":
      region_btm = self.region_text_attention(text_bte, regions_bme, valid_bm)
    elif method == "contribution":
      region_btm = self.region_contributions(text_bte, regions_bme, valid_bm)
    else:
      raise ValueError(f"heatmap method {method!r}: expected 'contribution' or 'attention'")
    region_btm = jnp.where(valid_bm[:, None], region_btm, 0.0)
    index_bmp = batch["region_index"]
    b, m, p = index_bmp.shape
    patch_valid_bmp = batch["region_patch_valid"]
    within_bmp = self.region_patch_weights(patches_bnw, batch)
    # Scaled to mean 1 over each region's patches: a patch scores its region's score, raised or
    # lowered by where the region Q-Former looks, and a region of 1 patch is not 4x brighter
    # than one of 4.
    count_bm1 = patch_valid_bmp.sum(-1, keepdims=True).astype(jnp.float32)
    within_bmp = jnp.where(patch_valid_bmp, within_bmp * count_bm1, 0.0)
    weight_btq = (region_btm[..., None] * within_bmp[:, None]).reshape(b, -1, m * p)
    n = batch["features"].shape[1]

    def scatter(weight_tq, index_q):  # padded slots carry weight 0, whatever their index
      return jax.ops.segment_sum(weight_tq.T, index_q, num_segments=n).T

    return jax.vmap(scatter)(weight_btq, index_bmp.reshape(b, m * p))

  def region_logit_params(self) -> tuple[jax.Array, jax.Array]:
    scale = jnp.exp(jnp.clip(self.region_logit_scale[...], 0.0, math.log(100.0)))
    return scale, self.region_logit_bias[...]
