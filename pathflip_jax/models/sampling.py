"""Sampling from a ``decoder.Decoder``: greedy, temperature + top-p, and beam search.

Prompts are **right-padded**: row ``i`` holds its ``lengths[i]`` tokens in slots 0..len-1, any
padding after. This keeps every row's cache contiguous (slot == position), so the decoder's
per-row end index is all the bookkeeping needed: the prefill advances row ``i`` to
``lengths[i]``, and each decode step writes the new token at the row's own end and uses it as the
RoPE position. Padding slots written by the prefill are hidden by causality and overwritten by
generated tokens.

Everything after the prefill runs in one ``jax.lax.while_loop`` under ``jax.jit`` with static
shapes (the cache holds ``prompt_len + max_new_tokens`` slots) and stops early once every row
has emitted a stop token. A row's output ends at its first stop token (included in its length);
later entries are ``pad_id``.

Einsum/shape letters: b batch, t prompt tokens, n new tokens, k beams, v vocab.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from pathflip_jax.models import decoder

Dtype = Any


def select_token(logits_bv: jax.Array, key: jax.Array | None, temperature: Any = 0.0,
                 top_p: Any = 1.0) -> jax.Array:
  """Next token ids [b]: argmax when ``temperature`` is the Python number 0, else a draw from
  the nucleus (``temperature`` and ``top_p`` may then be traced).

  Top-p keeps the most probable tokens whose cumulative probability, *before* each token, is
  below ``top_p``, so the most probable token always survives (p -> 0 is greedy).
  """
  if isinstance(temperature, (int, float)) and temperature == 0:
    return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  logits_bv = logits_bv.astype(jnp.float32) / temperature
  if not isinstance(top_p, (int, float)) or top_p < 1.0:
    sorted_bv = jnp.sort(logits_bv, axis=-1)[:, ::-1]
    probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
    mass_before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
    kept_b = jnp.maximum(jnp.sum(mass_before_bv < top_p, axis=-1), 1)
    threshold_b1 = jnp.take_along_axis(sorted_bv, kept_b[:, None] - 1, axis=-1)
    # top_p >= 1 keeps everything (cumulative sums can round to 1 before the last token).
    logits_bv = jnp.where((logits_bv >= threshold_b1) | (top_p >= 1.0), logits_bv, -jnp.inf)
  return jax.random.categorical(key, logits_bv, axis=-1).astype(jnp.int32)


def _prefill(model: decoder.Decoder, prompt_bt, lengths_b, embeddings_btd, cache_len: int,
             cache_dtype: Dtype):
  """Runs the prompts into a fresh cache; returns the logits after each row's last token."""
  b, t = prompt_bt.shape
  positions_bt = jnp.broadcast_to(jnp.arange(t), (b, t))
  valid_bt = positions_bt < lengths_b[:, None]
  cache = model.init_cache(b, cache_len, cache_dtype)
  logits_btv, cache = model(prompt_bt, positions_bt, valid_bt, cache, embeddings_btd)
  last_bv = jnp.take_along_axis(logits_btv, (lengths_b - 1)[:, None, None], axis=1)[:, 0]
  return last_bv, cache


def _stop_array(stop_tokens: Sequence[int]) -> jax.Array:
  # An array argument (not a static one), padded with -1 to at least one entry: calls with
  # different stop sets share one compilation.
  stop = [int(s) for s in stop_tokens]
  return jnp.asarray(stop + [-1] * (-len(stop) % 8 or (0 if stop else 8)), jnp.int32)


def _is_stop(tokens_b: jax.Array, stop_s: jax.Array) -> jax.Array:
  return jnp.any(tokens_b[..., None] == stop_s, axis=-1)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy", "pad_id",
                                             "cache_dtype"))
def _generate(graphdef, state, prompt_bt, lengths_b, key, embeddings_btd, stop_s, temperature,
              top_p, *, max_new_tokens: int, greedy: bool, pad_id: int, cache_dtype: Dtype):
  temperature = 0.0 if greedy else temperature
  model = nnx.merge(graphdef, state)
  b, t = prompt_bt.shape
  logits_bv, cache = _prefill(model, prompt_bt, lengths_b, embeddings_btd, t + max_new_tokens,
                              cache_dtype)

  def cond(carry):
    step, done_b = carry[0], carry[-1]
    return (step < max_new_tokens) & ~jnp.all(done_b)

  def body(carry):
    step, key, logits_bv, cache, out_bn, length_b, done_b = carry
    key, sub = jax.random.split(key)
    token_b = jnp.where(done_b, pad_id, select_token(logits_bv, sub, temperature, top_p))
    out_bn = jax.lax.dynamic_update_slice(out_bn, token_b[:, None], (0, step))
    length_b = length_b + (~done_b).astype(jnp.int32)
    done_b = done_b | _is_stop(token_b, stop_s)
    # Position of the new token = its slot = the row's end index (right padding).
    logits_b1v, cache = model(token_b[:, None], cache.end_index[:, None], None, cache)
    return step + 1, key, logits_b1v[:, 0], cache, out_bn, length_b, done_b

  carry = (jnp.int32(0), key, logits_bv, cache, jnp.full((b, max_new_tokens), pad_id, jnp.int32),
           jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool))
  carry = jax.lax.while_loop(cond, body, carry)
  return carry[4], carry[5]


def generate(model: decoder.Decoder, prompt_bt: jax.Array, lengths_b: jax.Array, *,
             max_new_tokens: int, key: jax.Array | None = None, temperature: float = 0.0,
             top_p: float = 1.0, stop_tokens: Sequence[int] = (), pad_id: int = 0,
             embeddings_btd: jax.Array | None = None,
             cache_dtype: Dtype = jnp.float32) -> tuple[jax.Array, jax.Array]:
  """Greedy (``temperature == 0``) or temperature/top-p sampling from right-padded prompts.

  Args:
    prompt_bt: token ids, row i real in ``[:lengths[i]]`` (every length >= 1).
    lengths_b: prompt lengths.
    key: PRNG key (needed when ``temperature > 0``); the same key gives the same samples.
    stop_tokens: ids that end a row (the stop token is kept and counted in its length).
    embeddings_btd: prompt input embeddings (``model.embed`` output with e.g. image features
      spliced in) used instead of ``prompt_bt``'s embeddings.

  Returns:
    ids [b, max_new_tokens] (``pad_id`` after a row's end) and lengths [b].
  """
  if temperature > 0.0 and key is None:
    raise ValueError("sampling with temperature > 0 needs a PRNG key")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  key = jax.random.key(0) if key is None else key
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, jnp.asarray(prompt_bt, jnp.int32),
                   jnp.asarray(lengths_b, jnp.int32), key, embeddings_btd,
                   _stop_array(stop_tokens), jnp.float32(max(temperature, 1e-6)),
                   jnp.float32(top_p), max_new_tokens=max_new_tokens,
                   greedy=temperature == 0.0, pad_id=int(pad_id), cache_dtype=cache_dtype)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "beams", "pad_id",
                                             "cache_dtype"))
def _beam_search(graphdef, state, prompt_bt, lengths_b, embeddings_btd, stop_s, length_penalty,
                 *, max_new_tokens: int, beams: int, pad_id: int, cache_dtype: Dtype):
  model = nnx.merge(graphdef, state)
  b, t = prompt_bt.shape
  k = beams
  logits_bv, cache = _prefill(model, prompt_bt, lengths_b, embeddings_btd, t + max_new_tokens,
                              cache_dtype)
  v = logits_bv.shape[-1]
  # Beams share the prompt: copy the prefilled cache k times (row r*k + j is beam j of row r).
  cache = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), cache)
  logits_bkv = jnp.repeat(logits_bv[:, None], k, axis=1)
  # Only beam 0 is live at first, so the first step does not pick k copies of one token.
  score_bk = jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf) * jnp.ones((b, 1))
  rows_b1 = jnp.arange(b)[:, None]

  def cond(carry):
    step, done_bk = carry[0], carry[-1]
    return (step < max_new_tokens) & ~jnp.all(done_bk)

  def body(carry):
    step, logits_bkv, cache, score_bk, out_bkn, length_bk, done_bk = carry
    logp_bkv = jax.nn.log_softmax(logits_bkv.astype(jnp.float32), axis=-1)
    # A finished beam continues only with pad_id at no cost, so it keeps its score.
    finished_bkv = jnp.where(jnp.arange(v) == pad_id, 0.0, -jnp.inf)
    logp_bkv = jnp.where(done_bk[..., None], finished_bkv, logp_bkv)
    cand_bkv = score_bk[..., None] + logp_bkv
    score_bk, flat_bk = jax.lax.top_k(cand_bkv.reshape(b, k * v), k)
    parent_bk, token_bk = flat_bk // v, (flat_bk % v).astype(jnp.int32)
    out_bkn = out_bkn[rows_b1, parent_bk]
    out_bkn = jax.lax.dynamic_update_slice(out_bkn, token_bk[..., None], (0, 0, step))
    was_done_bk = done_bk[rows_b1, parent_bk]
    length_bk = length_bk[rows_b1, parent_bk] + (~was_done_bk).astype(jnp.int32)
    done_bk = was_done_bk | _is_stop(token_bk, stop_s)
    rows_flat = (rows_b1 * k + parent_bk).reshape(-1)
    cache = jax.tree.map(lambda x: x[rows_flat], cache)
    logits_n1v, cache = model(token_bk.reshape(-1, 1), cache.end_index[:, None], None, cache)
    return (step + 1, logits_n1v.reshape(b, k, v), cache, score_bk, out_bkn, length_bk,
            done_bk)

  carry = (jnp.int32(0), logits_bkv, cache, score_bk,
           jnp.full((b, k, max_new_tokens), pad_id, jnp.int32),
           jnp.zeros((b, k), jnp.int32), jnp.zeros((b, k), bool))
  _, _, _, score_bk, out_bkn, length_bk, _ = jax.lax.while_loop(cond, body, carry)
  normalised_bk = score_bk / jnp.maximum(length_bk, 1).astype(jnp.float32) ** length_penalty
  best_b = jnp.argmax(normalised_bk, axis=-1)
  pick = lambda x: jnp.take_along_axis(x, best_b.reshape((b,) + (1,) * (x.ndim - 1)), axis=1)[:, 0]
  return pick(out_bkn), pick(length_bk), pick(score_bk)


def beam_search(model: decoder.Decoder, prompt_bt: jax.Array, lengths_b: jax.Array, *,
                max_new_tokens: int, beams: int = 4, length_penalty: float = 0.0,
                stop_tokens: Sequence[int] = (), pad_id: int = 0,
                embeddings_btd: jax.Array | None = None,
                cache_dtype: Dtype = jnp.float32) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Beam search over right-padded prompts; returns the best beam of each row.

  Beams are ranked by total log-probability while searching; a finished beam (stop token)
  stays in the beam with its score frozen. The final pick divides each beam's score by
  ``length ** length_penalty`` (0: raw log-probability; > 0 favours longer outputs).

  Returns:
    ids [b, max_new_tokens] (``pad_id`` after the end), lengths [b] (stop token included) and
    the best beams' total log-probabilities [b] (float32).
  """
  if beams < 1:
    raise ValueError(f"beams must be >= 1, got {beams}")
  graphdef, state = nnx.split(model)
  return _beam_search(graphdef, state, jnp.asarray(prompt_bt, jnp.int32),
                      jnp.asarray(lengths_b, jnp.int32), embeddings_btd,
                      _stop_array(stop_tokens), jnp.float32(length_penalty),
                      max_new_tokens=max_new_tokens, beams=beams, pad_id=int(pad_id),
                      cache_dtype=cache_dtype)


def sequence_log_prob(model: decoder.Decoder, prompt_bt: jax.Array, lengths_b: jax.Array,
                      ids_bn: jax.Array, gen_lengths_b: jax.Array) -> jax.Array:
  """Total log-probability [b] of the first ``gen_lengths`` generated ids after each prompt
  (one full forward pass; for checking samplers)."""
  graphdef, state = nnx.split(model)
  return _sequence_log_prob(graphdef, state, jnp.asarray(prompt_bt, jnp.int32),
                            jnp.asarray(lengths_b, jnp.int32), jnp.asarray(ids_bn, jnp.int32),
                            jnp.asarray(gen_lengths_b, jnp.int32))


@functools.partial(jax.jit, static_argnums=0)
def _sequence_log_prob(graphdef, state, prompt_bt, lengths_b, ids_bn, gen_lengths_b):
  model = nnx.merge(graphdef, state)
  b, t = prompt_bt.shape
  n = ids_bn.shape[1]
  # Splice the generated ids right after each row's prompt (right padding kept).
  seq_bs = jnp.concatenate([prompt_bt, jnp.zeros((b, n), prompt_bt.dtype)], axis=1)
  cols_bn = lengths_b[:, None] + jnp.arange(n)
  seq_bs = seq_bs.at[jnp.arange(b)[:, None], cols_bn].set(ids_bn)
  positions_bs = jnp.broadcast_to(jnp.arange(t + n), seq_bs.shape)
  logits_bsv, _ = model(seq_bs, positions_bs)
  logp_bsv = jax.nn.log_softmax(logits_bsv, axis=-1)
  logp_bnv = jnp.take_along_axis(logp_bsv, (cols_bn - 1)[..., None], axis=1)
  logp_bn = jnp.take_along_axis(logp_bnv, ids_bn[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(jnp.arange(n) < gen_lengths_b[:, None], logp_bn, 0.0), axis=-1)
