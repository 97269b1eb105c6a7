"""Contrastive losses.

Called inside ``jax.jit`` on globally sharded arrays (pjit semantics), a loss over the whole
batch is computed over the *global* batch: XLA gathers what each device needs, so negatives come
from every device without explicit collectives.

:func:`gathered_contrastive_loss` and :func:`region_sigmoid_loss` (given a mesh) instead spell the
communication out with ``jax.shard_map``: every device all-gathers the (small) embeddings and
computes only its own rows, so no device ever holds the global ``B x B`` logits or the attention
of every slide. They return the same values as the global formulas.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from pathflip_jax import sharding

# attend(attend_params, text_bte, regions_bme, region_valid_bm) -> z_bte
AttendFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]


def contrastive_loss(image_bd: jax.Array, text_bd: jax.Array, scale: jax.Array,
                     text_ids_b: jax.Array | None = None, label_smoothing: float = 0.0
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Symmetric InfoNCE between unit-norm image and text embeddings (CLIP).

  ``text_ids_b`` marks pairs that share the same text: every image whose text is identical to
  text j counts text j as a positive (the target spreads evenly over them), instead of pushing
  away from its own caption's duplicates. Many demo patches share one region's sentence.

  Returns the loss and metrics: ``i2t_accuracy``/``t2i_accuracy`` (argmax hits a positive).
  """
  b = image_bd.shape[0]
  logits_bb = scale * (image_bd @ text_bd.T)
  if text_ids_b is None:
    positive_bb = jnp.eye(b, dtype=bool)
  else:
    positive_bb = text_ids_b[:, None] == text_ids_b[None, :]

  def targets(positive_xy: jax.Array) -> jax.Array:
    target_xy = positive_xy / positive_xy.sum(axis=1, keepdims=True)
    if not label_smoothing:
      return target_xy
    return (1.0 - label_smoothing) * target_xy + label_smoothing / b

  i2t = -jnp.sum(targets(positive_bb) * jax.nn.log_softmax(logits_bb, axis=1), axis=1)
  t2i = -jnp.sum(targets(positive_bb.T) * jax.nn.log_softmax(logits_bb, axis=0).T, axis=1)
  loss = 0.5 * (i2t.mean() + t2i.mean())
  hit_i2t = jnp.take_along_axis(positive_bb, jnp.argmax(logits_bb, axis=1)[:, None], 1)
  hit_t2i = jnp.take_along_axis(positive_bb.T, jnp.argmax(logits_bb, axis=0)[:, None], 1)
  return loss, {"i2t_accuracy": hit_i2t.mean(), "t2i_accuracy": hit_t2i.mean()}


def _batch_map(mesh: Mesh, fn: Callable[..., Any], in_specs: tuple[Any, ...]) -> Callable[..., Any]:
  """``shard_map`` of ``fn`` over the mesh's batch axes, returning replicated scalars.

  Only the batch axes are manual: the ``model`` axis stays automatic, so a tensor-parallel
  ``attend`` keeps its parameter layout inside.
  """
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=P(),
                       axis_names=frozenset(sharding.BATCH_AXES))


def _global_rows(local_size: int) -> jax.Array:
  """Global batch index of this device's rows (inside a batch-axes ``shard_map``)."""
  # axis_index over the tuple is row-major in the order of the tuple, the same order in which a
  # tiled all_gather over it concatenates the pieces and in which P(BATCH_AXES) lays them out.
  return jax.lax.axis_index(sharding.BATCH_AXES) * local_size + jnp.arange(local_size)


def gathered_contrastive_loss(image_bd: jax.Array, text_bd: jax.Array, scale: jax.Array,
                              mesh: Mesh, *, text_ids_b: jax.Array | None = None,
                              label_smoothing: float = 0.0
                              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """:func:`contrastive_loss` with an explicit all-gather of the embeddings over the batch axes.

  Each device gathers every image and text embedding (``g`` = global batch) and computes the
  logits rows of its ``l`` local images (image-to-text) and of its ``l`` local texts
  (text-to-image) only: ``l x g`` logits per direction instead of ``g x g``. Per-row losses and
  hits are summed with ``psum`` and divided by ``g``. Same value, metric names and gradients as
  :func:`contrastive_loss` on the global batch.

  Call it inside ``jax.jit`` with ``image_bd``/``text_bd``/``text_ids_b`` laid out by
  ``sharding.batch_sharding`` (the global batch must divide by ``sharding.batch_shards(mesh)``);
  ``scale`` is replicated.
  """
  def local(image_ld, text_ld, scale, ids_l):
    l = image_ld.shape[0]
    # Tiled all_gather keeps its output "varying" under check_vma, and its transpose is a
    # reduce-scatter: each embedding's gradient sums the contributions of every device's rows.
    image_gd = jax.lax.all_gather(image_ld, sharding.BATCH_AXES, tiled=True)
    text_gd = jax.lax.all_gather(text_ld, sharding.BATCH_AXES, tiled=True)
    if ids_l is None:
      ids_l = _global_rows(l)
      ids_g = jnp.arange(image_gd.shape[0])
    else:
      ids_g = jax.lax.all_gather(ids_l, sharding.BATCH_AXES, tiled=True)
    g = image_gd.shape[0]
    # The same id comparison serves both directions: text j is a positive of image i (and vice
    # versa) when their ids match, so local-row x global-column blocks of one matrix.
    positive_lg = ids_l[:, None] == ids_g[None, :]
    count_l = positive_lg.sum(axis=1)  # texts sharing each local image's id
    # The reference's t2i targets are columns of the row-normalised i2t targets: they divide by
    # the count of the *image* in the column, a global quantity.
    count_g = jax.lax.all_gather(count_l, sharding.BATCH_AXES, tiled=True)

    def smooth(targets):
      if label_smoothing:
        return (1.0 - label_smoothing) * targets + label_smoothing / g
      return targets

    i2t_logits_lg = scale * (image_ld @ text_gd.T)
    i2t_targets_lg = smooth(positive_lg / count_l[:, None])
    i2t_l = -jnp.sum(i2t_targets_lg * jax.nn.log_softmax(i2t_logits_lg, axis=1), axis=1)
    t2i_logits_lg = scale * (text_ld @ image_gd.T)
    t2i_targets_lg = smooth(positive_lg / count_g[None, :])
    t2i_l = -jnp.sum(t2i_targets_lg * jax.nn.log_softmax(t2i_logits_lg, axis=1), axis=1)
    hit_i2t_l = jnp.take_along_axis(positive_lg, jnp.argmax(i2t_logits_lg, axis=1)[:, None], 1)
    hit_t2i_l = jnp.take_along_axis(positive_lg, jnp.argmax(t2i_logits_lg, axis=1)[:, None], 1)
    sums = jax.lax.psum({"loss": 0.5 * (i2t_l.sum() + t2i_l.sum()),
                         "i2t_accuracy": hit_i2t_l.sum(dtype=jnp.float32),
                         "t2i_accuracy": hit_t2i_l.sum(dtype=jnp.float32)},
                        sharding.BATCH_AXES)
    sums = jax.tree.map(lambda x: x / g, sums)
    loss = sums.pop("loss")
    return loss, sums

  batch = P(sharding.BATCH_AXES)
  scale = jnp.asarray(scale, jnp.result_type(image_bd))
  if text_ids_b is None:
    fn = _batch_map(mesh, lambda i, t, s: local(i, t, s, None), (batch, batch, P()))
    return fn(image_bd, text_bd, scale)
  return _batch_map(mesh, local, (batch, batch, P(), batch))(image_bd, text_bd, scale, text_ids_b)


def _l2_normalize(x: jax.Array) -> jax.Array:
  # Clamped so that zero padding (invalid subcaptions) normalises to zero with finite gradients.
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


def _pair_sums(positive: jax.Array, negative: jax.Array, logits: jax.Array
               ) -> dict[str, jax.Array]:
  """Sigmoid-loss sums over (text, embedding) pairs of any shape: the loss of the positive
  (label +1) and negative (-1) pairs, and the counts, hits and logit sums behind the region
  metrics."""
  label = jnp.where(positive, 1.0, -1.0).astype(logits.dtype)
  nll = -jax.nn.log_sigmoid(label * logits)
  f32 = jnp.float32
  return {
      "loss": jnp.sum(jnp.where(positive | negative, nll, 0.0)),
      "positive_count": positive.sum(dtype=f32),
      "negative_count": negative.sum(dtype=f32),
      "positive_hits": (positive & (logits > 0)).sum(dtype=f32),
      "negative_hits": (negative & (logits < 0)).sum(dtype=f32),
      "positive_logit": jnp.sum(jnp.where(positive, logits, 0.0)).astype(f32),
      "negative_logit": jnp.sum(jnp.where(negative, logits, 0.0)).astype(f32),
  }


def _region_terms(attend: AttendFn, attend_params: Any, regions_bme: jax.Array,
                  region_valid_bm: jax.Array, sub_bke: jax.Array, sub_valid_bk: jax.Array,
                  picked_ce: jax.Array, picked_valid_c: jax.Array, slide_ids_b: jax.Array,
                  scale: jax.Array, bias: jax.Array) -> dict[str, jax.Array]:
  """Sums (not means) of the region loss and metrics over slides ``b`` against picks ``c``."""
  b, k, e = sub_bke.shape
  c = picked_ce.shape[0]
  slide_valid_b = region_valid_bm.any(axis=1)
  # A slide without any valid region is dropped from the loss, but attend still runs on it; an
  # all-masked softmax is NaN and a NaN forward poisons gradients even behind jnp.where, so let
  # such slides attend over their (padding) regions instead.
  region_valid_bm = region_valid_bm | ~slide_valid_b[:, None]
  text_bte = jnp.concatenate([sub_bke, jnp.broadcast_to(picked_ce[None], (b, c, e))], axis=1)
  z_bte = attend(attend_params, text_bte, regions_bme, region_valid_bm)
  cos_bt = jnp.einsum("bte,bte->bt", _l2_normalize(text_bte), _l2_normalize(z_bte))
  logits_bt = scale * cos_bt + bias
  positive_bt = jnp.concatenate([sub_valid_bk, jnp.zeros((b, c), bool)], axis=1)
  # A slide's own pick duplicates one of its positives: not a negative for itself.
  negative_bc = picked_valid_c[None, :] & (slide_ids_b[:, None] != jnp.arange(c)[None, :])
  negative_bt = jnp.concatenate([jnp.zeros((b, k), bool), negative_bc], axis=1)
  positive_bt &= slide_valid_b[:, None]
  negative_bt &= slide_valid_b[:, None]
  return _pair_sums(positive_bt, negative_bt, logits_bt)


def _region_metrics(sums: dict[str, jax.Array], num_slides: int
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
  pos = jnp.maximum(sums["positive_count"], 1.0)
  neg = jnp.maximum(sums["negative_count"], 1.0)
  return sums["loss"] / num_slides, {
      "region_positive_accuracy": sums["positive_hits"] / pos,
      "region_negative_accuracy": sums["negative_hits"] / neg,
      "region_positive_logit": sums["positive_logit"] / pos,
      "region_negative_logit": sums["negative_logit"] / neg,
  }


def region_sigmoid_loss(attend: AttendFn, attend_params: Any, regions_bme: jax.Array,
                        region_valid_bm: jax.Array, sub_bke: jax.Array, sub_valid_bk: jax.Array,
                        negative_pick_b: jax.Array, scale: jax.Array, bias: jax.Array,
                        mesh: Mesh | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Sigmoid (SigLIP) loss between subcaptions and their text-conditioned region embeddings.

  Shape letters: ``b`` slides (the global batch when ``mesh`` is None, a device's slides inside
  the ``shard_map``), ``m`` regions per slide, ``k`` subcaptions per slide, ``c`` picked negative
  subcaptions (one per slide of the global batch), ``t = k + c`` texts attended per slide,
  ``e`` embedding width.

  For slide b, every text t in [b's k own subcaptions ; the c picked subcaptions
  ``sub_bke[c, negative_pick_b[c]]``] is attended over b's regions,
  ``z_bte = attend(attend_params, text_bte, regions_bme, region_valid_bm)``, and scored with
  ``logit = scale * cos(t, z) + bias`` (``scale`` already exponentiated). Own valid subcaptions
  are positives (label +1), the picks of the other slides negatives (-1); b's own pick, invalid
  subcaptions (``sub_valid_bk`` False, also as a pick) and slides without a valid region are left
  out. Loss: ``-sum log_sigmoid(label * logit)`` over the kept pairs, divided by the global
  number of slides.

  ``attend`` must be a pure function of its arguments (an NNX module split by the caller, or a
  text-independent pooling for the ablation). It also runs on slides without a valid region, with
  their padding regions unmasked (so a -inf mask gives no NaN); those outputs are discarded. With
  ``mesh`` the computation runs in a
  ``jax.shard_map`` over the batch axes: slides, subcaptions, masks and picks are split (lay them
  out with ``sharding.batch_sharding``), ``attend_params``/``scale``/``bias`` replicated, the
  picked subcaptions all-gathered; the result equals ``mesh=None`` on the same global batch.

  Metrics: ``region_positive_accuracy`` (kept positives with logit > 0),
  ``region_negative_accuracy`` (kept negatives with logit < 0), ``region_positive_logit`` and
  ``region_negative_logit`` (mean logits); 0 when there is no such pair.
  """
  def picks(sub_bke, sub_valid_bk, negative_pick_b):
    rows = jnp.arange(sub_bke.shape[0])
    return sub_bke[rows, negative_pick_b], sub_valid_bk[rows, negative_pick_b]

  regions_bme, region_valid_bm, sub_bke, sub_valid_bk, negative_pick_b = map(
      jnp.asarray, (regions_bme, region_valid_bm, sub_bke, sub_valid_bk, negative_pick_b))
  dtype = jnp.result_type(sub_bke)
  scale = jnp.asarray(scale, dtype)
  bias = jnp.asarray(bias, dtype)
  num_slides = regions_bme.shape[0]
  if mesh is None:
    picked_ce, picked_valid_c = picks(sub_bke, sub_valid_bk, negative_pick_b)
    sums = _region_terms(attend, attend_params, regions_bme, region_valid_bm, sub_bke,
                         sub_valid_bk, picked_ce, picked_valid_c, jnp.arange(num_slides),
                         scale, bias)
    return _region_metrics(sums, num_slides)

  def local(attend_params, regions_lme, region_valid_lm, sub_lke, sub_valid_lk, pick_l, scale,
            bias):
    # Only the picks travel: one subcaption per slide, not the slides' regions.
    picked_ce, picked_valid_c = (jax.lax.all_gather(x, sharding.BATCH_AXES, tiled=True)
                                 for x in picks(sub_lke, sub_valid_lk, pick_l))
    sums = _region_terms(attend, attend_params, regions_lme, region_valid_lm, sub_lke,
                         sub_valid_lk, picked_ce, picked_valid_c,
                         _global_rows(regions_lme.shape[0]), scale, bias)
    return jax.lax.psum(sums, sharding.BATCH_AXES)

  batch = P(sharding.BATCH_AXES)
  fn = _batch_map(mesh, local, (P(), batch, batch, batch, batch, batch, P(), P()))
  sums = fn(attend_params, regions_bme, region_valid_bm, sub_bke, sub_valid_bk, negative_pick_b,
            scale, bias)
  return _region_metrics(sums, num_slides)
