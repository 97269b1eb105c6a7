"""The instruction-following model (DESIGN.md section 2.6): visual tokens -> projector -> decoder.

PathFLIP hands the slide token and the region tokens of the frozen alignment model, through one
linear projector, to a decoder-only language model, at the ``<image>`` placeholder of the
prompt. Here:

  visual tokens [b, v, e] (+ position features [b, v, p]) --projector--> [b, v, d]
  prompt ids [b, t] with v ``image_id`` slots --embed, splice--> input embeddings [b, t, d]
  --decoder--> next-token logits [b, t, vocab]

The projector also reads each visual token's place on the slide (is it the slide token; the
region's centre relative to the tissue's bounding box, with a few sinusoids), so the language
model can say where a finding lies ("in the upper left"): the region tokens carry absolute grid
positions from the slide-context Transformer, but a phrase like "upper left" is relative to the
slide's tissue, which the region tokens alone do not know.

Einsum letters: b batch, t tokens, v visual tokens, e visual width, p position features,
d decoder width.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pathflip_jax.models import decoder as decoder_lib, layers

Dtype = Any


def position_features(pos_bv3: jax.Array, frequencies: int) -> jax.Array:
  """(is_slide, x, y) with x, y in [0, 1] -> [..., 3 + 4 * frequencies] features."""
  xy = pos_bv3[..., 1:].astype(jnp.float32)
  k = jnp.arange(1, frequencies + 1, dtype=jnp.float32) * math.pi
  angles = xy[..., None] * k                                    # [..., 2, f]
  waves = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  return jnp.concatenate([pos_bv3.astype(jnp.float32),
                          waves.reshape(*pos_bv3.shape[:-1], 4 * frequencies)], axis=-1)


class InstructModel(nnx.Module):
  """Projector + decoder. Batch entries: ``tokens`` [b, t] with ``image_id`` at the visual
  slots (in order), ``visual`` [b, v, e], ``visual_pos`` [b, v, 3]."""

  def __init__(self, decoder_config: decoder_lib.DecoderConfig, visual_dim: int, image_id: int,
               *, rngs: nnx.Rngs, position_frequencies: int = 4,
               lora: Any = None, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
    self.image_id = int(image_id)
    self.position_frequencies = position_frequencies
    in_dim = visual_dim + (3 + 4 * position_frequencies if position_frequencies >= 0 else 0)
    self.projector = layers.Dense(in_dim, decoder_config.width, (None, "embed"), rngs=rngs,
                               dtype=dtype, param_dtype=param_dtype)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.decoder = (decoder_lib.Decoder(decoder_config, lora=lora, **kw) if lora is not None
                    else decoder_lib.Decoder(decoder_config, **kw))

  def project(self, visual_bve: jax.Array, pos_bv3: jax.Array) -> jax.Array:
    """Visual tokens -> the decoder's width [b, v, d]."""
    x = visual_bve.astype(jnp.float32)
    if self.position_frequencies >= 0:
      x = jnp.concatenate([x, position_features(pos_bv3, self.position_frequencies)], axis=-1)
    return self.projector(x)

  def input_embeddings(self, tokens_bt: jax.Array, visual_bve: jax.Array, pos_bv3: jax.Array
                       ) -> jax.Array:
    """Token embeddings with the i-th ``image_id`` slot of a row replaced by its i-th
    projected visual token: [b, t, d]."""
    is_image_bt = tokens_bt == self.image_id
    # The image id may lie past the embedding table (a tokenizer without an <image> piece).
    text_btd = self.decoder.embed(jnp.where(is_image_bt, 0, tokens_bt))
    visual_bvd = self.project(visual_bve, pos_bv3).astype(text_btd.dtype)
    rank_bt = jnp.clip(jnp.cumsum(is_image_bt, axis=1) - 1, 0, visual_bvd.shape[1] - 1)
    spliced_btd = jnp.take_along_axis(visual_bvd, rank_bt[..., None], axis=1)
    return jnp.where(is_image_bt[..., None], spliced_btd, text_btd)

  def __call__(self, tokens_bt: jax.Array, visual_bve: jax.Array, pos_bv3: jax.Array,
               valid_bt: jax.Array | None = None, dropout_rng: jax.Array | None = None
               ) -> jax.Array:
    """Next-token logits [b, t, vocab] of right-padded sequences (teacher forcing)."""
    embeddings_btd = self.input_embeddings(tokens_bt, visual_bve, pos_bv3)
    b, t = tokens_bt.shape
    positions_bt = jnp.broadcast_to(jnp.arange(t), (b, t))
    kwargs = {} if dropout_rng is None else {"dropout_rng": dropout_rng}
    logits_btv, _ = self.decoder(None, positions_bt, valid_bt, embeddings_btd=embeddings_btd,
                                 **kwargs)
    return logits_btv


def answer_loss(logits_btv: jax.Array, targets_bt: jax.Array, mask_bt: jax.Array
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean cross-entropy over the answer tokens of the batch, and their token accuracy."""
  logp_btv = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
  # Targets outside the answer may be image slots whose id lies past the vocabulary: clip them
  # and mask with where, not a product (0 * NaN is NaN).
  safe_bt = jnp.clip(targets_bt, 0, logits_btv.shape[-1] - 1)
  nll_bt = -jnp.take_along_axis(logp_btv, safe_bt[..., None], axis=-1)[..., 0]
  mask = mask_bt.astype(jnp.float32)
  count = jnp.maximum(mask.sum(), 1.0)
  loss = jnp.sum(jnp.where(mask_bt, nll_bt, 0.0)) / count
  correct = (jnp.argmax(logits_btv, axis=-1) == targets_bt).astype(jnp.float32)
  return loss, {"token_accuracy": jnp.sum(correct * mask) / count, "answer_tokens": mask.sum()}
