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

from pathflip_jax.models import qformer as qformer_lib, vit

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
    position_frequencies: sinusoid frequencies per axis of the 2-D region positions.
    region_init_scale, region_init_bias: initial logit scale (log space) and bias of the
      region-level sigmoid loss.
    feature_shortcut: not in the paper. Adds a linear map of the mean of a token's patch
      features to the slide token and to each region token, beside the Q-Former, whose own
      projection (and the region positions') then starts at zero: at initialisation the tokens
      are the shortcut alone. With ``text_init`` the shortcut starts as the patch encoder's image
      projection, so slide and region tokens start as that encoder's own joint image-text
      embeddings (what CONCH features bring the paper's model) and the Q-Former learns what to
      add to them. Heatmaps weigh a region's patches by both poolings
      (:meth:`PathFlip.region_patch_weights`).
    slide_shortcut: with ``feature_shortcut``, whether the slide token gets the shortcut too
      (False: the regions only; the slide token is the Q-Former's alone, as in the paper).
    identity_region_values: not in the paper. The text-conditioned attention's value and
      output projections start as the identity, so the text-conditioned region embedding
      starts as each head's attention-weighted mean of the (layer-normed) region embeddings.
    region_value_gate: not in the paper. Beside the value and output projections (at their
      random start, as in the paper), each head adds its attention-weighted mean of the
      layer-normed region embeddings (the identity path above) times a learned gate that
      starts at 0 (zero-initialised gating, as Flamingo's): the text-conditioned embedding
      starts as the paper's, and only the region loss can open the identity path.
    region_output_zero_init: not in the paper. The text-conditioned attention's output
      projection starts at 0 (the value projection stays at random): the text-conditioned
      embedding, and so the heatmap, start empty and hold only what the region loss puts in
      them, instead of a random mix of the regions that the loss must first undo. With
      ``region_value_gate`` both paths then open from 0 together.
    local_region_attention: not in the paper. The text-conditioned attention (and so the
      region loss, region scores and heatmaps) reads each region token as it enters the
      slide-context Transformer (its own patches and its position) instead of as it leaves it.
      Leaving it, a region also carries what the context told it about the rest of the slide, so
      the stroma beside a necrosis can answer a necrosis query as well as the necrosis itself.
      The context still makes the slide token.
    local_region_positions: with ``local_region_attention``, True: the tokens the attention
      reads carry their region's position embedding, as the context's inputs do; False (not in
      the paper): they are the region's own pooled patches only, so a text matches a region by
      what it shows and not by where it lies (docs/experiments/localization.md, "The match held
      at the identity").
    region_identity_qk: not in the paper. The text-conditioned attention's query and key
      projections start as the identity, so its logits start as the dot product of the
      layer-normed text and region embeddings (over 1/sqrt(head width)): with one region head,
      a cosine-like attention in the joint space, which points at the regions that the text
      already matches when both sides start in the patch encoder's joint space
      (``feature_shortcut``, ``local_region_attention`` and a text branch frozen at that
      encoder's text tower; docs/experiments/localization.md, "The joint space kept").
      configs/pathflip_demo.py holds them there (``HELD_MATCH``; docs/experiments/localization.md,
      "The match held at the identity").
  """

  qformer: qformer_lib.QFormerConfig
  embed_dim: int = 256
  context_depth: int = 2
  context_heads: int = 8
  context_mlp_ratio: float = 4.0
  region_heads: int = 8
  region_attention: bool = True
  position_frequencies: int = 16
  region_init_scale: float = math.log(1 / 0.07)
  region_init_bias: float = 0.0
  feature_shortcut: bool = False
  slide_shortcut: bool = True
  identity_region_values: bool = False
  region_value_gate: bool = False
  region_output_zero_init: bool = False
  local_region_attention: bool = False
  region_identity_qk: bool = False
  local_region_positions: bool = True

  def __post_init__(self):
    if self.identity_region_values and self.region_value_gate:
      raise ValueError("identity_region_values and region_value_gate are exclusive: the gate "
                       "adds the identity path to value projections that start at random")
    if self.identity_region_values and self.region_output_zero_init:
      raise ValueError("identity_region_values and region_output_zero_init are exclusive: "
                       "both set the output projection's start")
    if not self.local_region_positions and not self.local_region_attention:
      raise ValueError("local_region_positions=False needs local_region_attention=True: "
                       "after the slide context every region token holds positions")
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
    self.norm1 = vit.LayerNorm(e, eps=1e-6, dtype=dtype, param_dtype=param_dtype)
    self.attention = qformer_lib.Attention(e, config.context_heads, **kw)
    self.norm2 = vit.LayerNorm(e, eps=1e-6, dtype=dtype, param_dtype=param_dtype)
    self.mlp = qformer_lib.Mlp(e, int(e * config.context_mlp_ratio), **kw)

  def __call__(self, x_bse: jax.Array, valid_bs: jax.Array) -> jax.Array:
    y = self.norm1(x_bse)
    x_bse = x_bse + self.attention(y, y, valid_bs)
    return x_bse + self.mlp(self.norm2(x_bse))


class RegionAttention(nnx.Module):
  """Text-conditioned region attention: texts [b, t, e] query the regions [b, m, e].

  Both sides are layer-normed. The texts arrive as unit vectors (entries ~ 1/sqrt(e)): without
  the query norm the attention logits start ~sqrt(e) times smaller than the keys' side allows
  (std ~0.005 in the demo config), so the weights stay almost uniform, whatever the text, for a
  whole demo run; normed, each entry is ~1 as in any pre-norm Transformer."""

  def __init__(self, config: PathFlipConfig, *, rngs: nnx.Rngs, dtype: Dtype,
               param_dtype: Dtype):
    e = config.embed_dim
    self.text_norm = vit.LayerNorm(e, eps=1e-6, dtype=dtype, param_dtype=param_dtype)
    self.region_norm = vit.LayerNorm(e, eps=1e-6, dtype=dtype, param_dtype=param_dtype)
    self.attention = qformer_lib.Attention(e, config.region_heads, rngs=rngs, dtype=dtype,
                                           param_dtype=param_dtype)
    heads, head_dim = config.region_heads, e // config.region_heads
    shapes = {name: ((e, heads, head_dim), ("embed", "heads", "kv"))
              for name in ("q_kernel", "k_kernel", "v_kernel")}
    shapes["o_kernel"] = ((heads, head_dim, e), ("heads", "kv", "embed"))

    def restart(name, init):
      # Replaced after construction, so every other parameter draws the same random numbers.
      shape, axes = shapes[name]
      setattr(self.attention, name, vit._param(None, init, shape, axes, param_dtype))

    def identity(key, shape, dtype):
      del key
      return jnp.eye(e, dtype=dtype).reshape(shape)

    if config.identity_region_values:
      restart("v_kernel", identity)
      restart("o_kernel", identity)
    if config.region_identity_qk:
      restart("q_kernel", identity)
      restart("k_kernel", identity)
    if config.region_output_zero_init:
      restart("o_kernel", nnx.initializers.zeros_init())

    # Per head, how much of the identity path (attention-weighted mean of the normed regions)
    # joins the projected values: 0 at the start, so the gate opens only if a loss asks for it.
    self.value_gate = (vit._param(None, nnx.initializers.zeros_init(), (heads,),
                                  ("heads",), param_dtype)
                       if config.region_value_gate else None)

  def __call__(self, text_bte: jax.Array, regions_bme: jax.Array, valid_bm: jax.Array
               ) -> jax.Array:
    text_bte, keys_bme = self.text_norm(text_bte), self.region_norm(regions_bme)
    if self.value_gate is None:
      return self.attention(text_bte, keys_bme, valid_bm)
    weights_bhtm = self.attention.weights(text_bte, keys_bme, valid_bm)
    out_bte = self.attention.attend(weights_bhtm, keys_bme)
    gate_h = self.value_gate[...].astype(jnp.float32)
    identity_bthc = jnp.einsum("bhtm,bmhc,h->bthc", weights_bhtm,
                               self.split_heads(keys_bme), gate_h)
    return out_bte + identity_bthc.reshape(*out_bte.shape).astype(out_bte.dtype)

  def split_heads(self, x_bne: jax.Array) -> jax.Array:
    """[b, n, e] -> float32 [b, n, h, e / h]: each head's slice, what the gated identity path
    passes on for that head."""
    heads = self.attention.num_heads
    return x_bne.astype(jnp.float32).reshape(*x_bne.shape[:-1], heads, -1)

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
    shortcut = config.feature_shortcut
    self.vision_proj = vit.Dense(w, e, ("embed", None), zero_init=shortcut, **kw)
    self.text_proj = vit.Dense(w, e, ("embed", None), **kw)
    self.position_proj = vit.Dense(4 * config.position_frequencies, e, (None, None),
                                   zero_init=shortcut, **kw)
    self.feature_shortcut = (vit.Dense(config.qformer.feature_dim, e, (None, "embed"), **kw)
                             if shortcut else None)
    self.context = nnx.List([ContextBlock(config, **kw) for _ in range(config.context_depth)])
    self.context_norm = vit.LayerNorm(e, eps=1e-6, dtype=dtype, param_dtype=param_dtype)
    self.region_attention = (RegionAttention(config, **kw) if config.region_attention
                             else None)
    self.region_logit_scale = nnx.Param(jnp.full((), config.region_init_scale, param_dtype))
    self.region_logit_bias = nnx.Param(jnp.full((), config.region_init_bias, param_dtype))

  # ------------------------------------------------------------------------------ text
  def encode_texts(self, tokens_bt: jax.Array) -> jax.Array:
    """Token ids [b, t] -> unit-norm text embeddings [b, e] (float32)."""
    return unit(self.text_proj(self.qformer.encode_text(tokens_bt)))

  # ----------------------------------------------------------------------------- slides
  def _pooled_parts(self, patches_bnw: jax.Array, valid_bn: jax.Array,
                    features_bnf: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
    """The two poolings a token sums, per row: the Q-Former's mean query output, projected,
    and (``feature_shortcut`` only, else None) the shortcut of the mean of ``features_bnf``."""
    queries_bqw = self.qformer.encode_patches(patches_bnw, valid_bn)
    token_be = self.vision_proj(queries_bqw.astype(jnp.float32).mean(axis=1).astype(self.dtype))
    if self.feature_shortcut is None or features_bnf is None:
      return token_be, None
    mean_bf = jnp.einsum("bn,bnf->bf", uniform_weights(valid_bn),
                         features_bnf.astype(jnp.float32))
    return token_be, self.feature_shortcut(mean_bf.astype(self.dtype))

  @staticmethod
  def _sum_parts(parts: tuple[jax.Array, jax.Array | None]) -> jax.Array:
    token_be, shortcut_be = parts
    return token_be if shortcut_be is None else token_be + shortcut_be

  def _pooled(self, patches_bnw: jax.Array, valid_bn: jax.Array,
              features_bnf: jax.Array | None) -> jax.Array:
    """One token per row: the sum of :meth:`_pooled_parts`."""
    return self._sum_parts(self._pooled_parts(patches_bnw, valid_bn, features_bnf))

  def region_patch_weights(self, patches_bnw: jax.Array, batch: Mapping[str, jax.Array],
                           region_parts: tuple[jax.Array, jax.Array | None] | None = None
                           ) -> jax.Array:
    """How much each of a region's patches makes its token [b, m, p], summing to 1 over the
    region's valid patches: the region Q-Former's attention over them. With
    ``feature_shortcut`` the token also holds the plain mean of the patches, so the weights are
    the two poolings' mix, each by its share of the token (|Q-Former part| against |shortcut
    part|). ``region_parts``: the regions' :meth:`_pooled_parts` [b*m, e] when the caller has
    them already (``encode_slides(..., return_region_parts=True)``), else computed here."""
    b, m, p = batch["region_index"].shape
    gathered, valid_kp, features = self._region_inputs(patches_bnw, batch)
    attention_kp = self.qformer.patch_attention(gathered, valid_kp)
    if self.feature_shortcut is None:
      return attention_kp.reshape(b, m, p)
    token_ke, shortcut_ke = (region_parts if region_parts is not None
                             else self._pooled_parts(gathered, valid_kp, features))
    token_norm_k = jnp.linalg.norm(token_ke.astype(jnp.float32), axis=-1)
    shortcut_norm_k = jnp.linalg.norm(shortcut_ke.astype(jnp.float32), axis=-1)
    share_k1 = (token_norm_k / jnp.maximum(token_norm_k + shortcut_norm_k, 1e-12))[:, None]
    mixed_kp = share_k1 * attention_kp + (1.0 - share_k1) * uniform_weights(valid_kp)
    return mixed_kp.reshape(b, m, p)

  @staticmethod
  def region_patches(patches_bnw: jax.Array, index_bmp: jax.Array) -> jax.Array:
    """Each region's rows of the projected patches, flattened for the Q-Former: [b*m, p, w]."""
    b, m, p = index_bmp.shape
    gathered = jnp.take_along_axis(patches_bnw, index_bmp.reshape(b, m * p, 1), axis=1)
    return gathered.reshape(b * m, p, -1)

  def _region_inputs(self, patches_bnw: jax.Array, batch: Mapping[str, jax.Array]
                     ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """What the region Q-Former pools, one row per region: the projected patches [b*m, p, w],
    their validity [b*m, p] and (``feature_shortcut`` only, else None) the raw features."""
    index_bmp = batch["region_index"]
    b, m, p = index_bmp.shape
    features = (None if self.feature_shortcut is None
                else self.region_patches(batch["features"], index_bmp))
    return (self.region_patches(patches_bnw, index_bmp),
            batch["region_patch_valid"].reshape(b * m, p), features)

  def region_tokens(self, patches_bnw: jax.Array, batch: Mapping[str, jax.Array]) -> jax.Array:
    """The region Q-Former: each region's patches -> one token per region [b, m, e]."""
    b, m, _ = batch["region_index"].shape
    return self._pooled(*self._region_inputs(patches_bnw, batch)).reshape(b, m, -1)

  def encode_slides(self, batch: Mapping[str, jax.Array],
                    patches_bnw: jax.Array | None = None,
                    return_region_parts: bool = False) -> dict[str, Any]:
    """Slide embedding [b, e] (unit norm) and the region embeddings [b, m, e] the
    text-conditioned attention reads, and the instruct stage hands its decoder (contextualised,
    or the context's inputs with ``local_region_attention``, less their position embedding with
    ``local_region_positions=False``). ``patches_bnw``: the projected patch features, when the
    caller has them already.
    ``return_region_parts`` adds "region_parts", the region tokens' two poolings
    (:meth:`_pooled_parts`, [b*m, e] each), which :meth:`region_patch_weights` reuses."""
    if patches_bnw is None:
      patches_bnw = self.qformer.project_features(batch["features"])
    slide_be = self._pooled(patches_bnw, batch["patch_valid"],
                            batch["features"] if self.config.slide_shortcut else None)
    b, m, _ = batch["region_index"].shape
    region_parts = self._pooled_parts(*self._region_inputs(patches_bnw, batch))
    own_bme = self._sum_parts(region_parts).reshape(b, m, -1)
    positions = region_positions(batch["region_pos"], self.config.position_frequencies)
    regions_bme = own_bme + self.position_proj(positions)
    tokens = jnp.concatenate([slide_be[:, None], regions_bme], axis=1)
    region_valid = batch["region_valid"]
    valid = jnp.concatenate([jnp.ones_like(region_valid[:, :1]), region_valid], axis=1)
    for block in self.context:
      tokens = block(tokens, valid)
    tokens = self.context_norm(tokens)
    # "regions": what the text-conditioned attention reads (PathFlipConfig.local_region_attention
    # and local_region_positions).
    if not self.config.local_region_attention:
      read_bme = tokens[:, 1:]
    else:
      read_bme = regions_bme if self.config.local_region_positions else own_bme
    out = {"slide": unit(tokens[:, 0]), "regions": read_bme, "region_valid": region_valid}
    if return_region_parts:
      out["region_parts"] = region_parts
    return out

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

    The text-conditioned embedding is sum_m sum_h w[h, m] * o_h(v_h(region m)) + o_bias (plus
    gate[h] * w[h, m] * head h's slice of region m with ``region_value_gate``), so
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
    gate = self.region_attention.value_gate
    if gate is not None:  # the gated identity path: the region's own slice of each head
      split = self.region_attention.split_heads
      match_bthm = match_bthm + jnp.einsum("bmhc,bthc,h->bthm", split(keys_bme), split(text_be),
                                           gate[...].astype(jnp.float32))
    z_norm_bt = jnp.linalg.norm(
        self.text_conditioned_regions(text_bte, regions_bme, valid_bm).astype(jnp.float32),
        axis=-1)
    contribution_btm = jnp.einsum("bhtm,bthm->btm", weights_bhtm, match_bthm)
    return contribution_btm / jnp.maximum(z_norm_bt[..., None], 1e-6)

  def patch_heatmap(self, batch: Mapping[str, jax.Array], text_bte: jax.Array,
                    method: str = "attention") -> jax.Array:
    """Patch-level heatmap of each text [b, t, n] (DESIGN.md section 2.4): a score per region
    (``method`` "attention": the text-conditioned attention weights, averaged over heads;
    "contribution": :meth:`region_contributions`) times the region Q-Former's attention over
    that region's patches (relative to the region's mean; :meth:`region_patch_weights`, which
    with ``feature_shortcut`` mixes in the shortcut's uniform mean). Patches of no kept region
    score 0."""
    patches_bnw = self.qformer.project_features(batch["features"])
    encoded = self.encode_slides(batch, patches_bnw, return_region_parts=True)
    regions_bme, valid_bm = encoded["regions"], encoded["region_valid"]
    if method == "attention":
      region_btm = self.region_text_attention(text_bte, regions_bme, valid_bm)
    elif method == "contribution":
      region_btm = self.region_contributions(text_bte, regions_bme, valid_bm)
    else:
      raise ValueError(f"heatmap method {method!r}: expected 'attention' or 'contribution'")
    region_btm = jnp.where(valid_bm[:, None], region_btm, 0.0)
    index_bmp = batch["region_index"]
    b, m, p = index_bmp.shape
    patch_valid_bmp = batch["region_patch_valid"]
    within_bmp = self.region_patch_weights(patches_bnw, batch, encoded["region_parts"])
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
