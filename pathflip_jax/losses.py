"""Contrastive losses.

Called inside ``jax.jit`` on globally sharded arrays (pjit semantics), a loss over the whole
batch is computed over the *global* batch: XLA gathers what each device needs, so negatives come
from every device without explicit collectives.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
  targets_bb = positive_bb / positive_bb.sum(axis=1, keepdims=True)
  if label_smoothing:
    targets_bb = (1.0 - label_smoothing) * targets_bb + label_smoothing / b
  i2t = -jnp.sum(targets_bb * jax.nn.log_softmax(logits_bb, axis=1), axis=1)
  t2i = -jnp.sum(targets_bb.T * jax.nn.log_softmax(logits_bb, axis=0).T, axis=1)
  loss = 0.5 * (i2t.mean() + t2i.mean())
  hit_i2t = jnp.take_along_axis(positive_bb, jnp.argmax(logits_bb, axis=1)[:, None], 1)
  hit_t2i = jnp.take_along_axis(positive_bb.T, jnp.argmax(logits_bb, axis=0)[:, None], 1)
  return loss, {"i2t_accuracy": hit_i2t.mean(), "t2i_accuracy": hit_t2i.mean()}
