"""Sampling from the decoder: cached greedy vs full passes, batching, stop tokens, top-p, beams."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pathflip_jax.models import decoder, sampling

CONFIG = decoder.get_config("tiny", vocab_size=16)  # few ids: stop tokens come up quickly
NEW = 6


@functools.cache
def model() -> decoder.Decoder:
  return decoder.Decoder(CONFIG, rngs=nnx.Rngs(3))


def prompts():
  """Right-padded prompts of lengths 5, 2 and 7 (padding id 0)."""
  lengths = np.array([5, 2, 7])
  ids = np.asarray(jax.random.randint(jax.random.key(4), (3, 7), 1, CONFIG.vocab_size))
  ids = np.where(np.arange(7) < lengths[:, None], ids, 0)
  return jnp.asarray(ids), jnp.asarray(lengths)


@functools.partial(jax.jit, static_argnums=0)
def _full(graphdef, state, seq, last):
  logits = nnx.merge(graphdef, state)(seq, jnp.arange(seq.shape[1])[None])[0]
  return logits[0, last]


def greedy_by_full_passes(prompt, steps):
  """Argmax at the last real position, appending one token at a time, no cache.

  Sequences are right-padded to one length (one compilation); causality hides the padding.
  """
  graphdef, state = nnx.split(model())
  seq = list(prompt)
  for _ in range(steps):
    padded = jnp.asarray([seq + [0] * (7 + NEW - len(seq))])
    seq.append(int(jnp.argmax(_full(graphdef, state, padded, len(seq) - 1))))
  return seq[len(prompt):]


def test_greedy_matches_full_passes_and_batch_matches_single_rows():
  ids, lengths = prompts()
  out, out_lengths = sampling.generate(model(), ids, lengths, max_new_tokens=NEW)
  assert out.shape == (3, NEW) and out.dtype == jnp.int32
  np.testing.assert_array_equal(out_lengths, [NEW] * 3)
  for row in range(3):
    prompt = ids[row, :lengths[row]]
    np.testing.assert_array_equal(out[row], greedy_by_full_passes(list(np.asarray(prompt)), NEW))
    # Alone in a batch of one (padded to the same width, so one compilation serves all rows).
    alone, _ = sampling.generate(model(), ids[row:row + 1], lengths[row:row + 1],
                                 max_new_tokens=NEW)
    np.testing.assert_array_equal(alone[0], out[row])


def test_stop_tokens_end_rows():
  ids, lengths = prompts()
  free, _ = sampling.generate(model(), ids, lengths, max_new_tokens=NEW)
  stop = int(free[0, 2])  # row 0 stops at step 2 (or earlier, if the id came before)
  out, out_lengths = sampling.generate(model(), ids, lengths, max_new_tokens=NEW,
                                       stop_tokens=(stop, 99), pad_id=0)
  for row in range(3):
    hits = np.flatnonzero(np.asarray(free[row]) == stop)
    n = hits[0] + 1 if hits.size else NEW
    assert out_lengths[row] == n
    np.testing.assert_array_equal(out[row, :n], free[row, :n])
    np.testing.assert_array_equal(out[row, n:], 0)
  assert out_lengths[0] <= 3


def test_top_p_to_zero_is_greedy_and_sampling_is_reproducible():
  ids, lengths = prompts()
  greedy, _ = sampling.generate(model(), ids, lengths, max_new_tokens=NEW)
  key = jax.random.key(7)
  nucleus, _ = sampling.generate(model(), ids, lengths, max_new_tokens=NEW, key=key,
                                 temperature=1.0, top_p=1e-6)
  np.testing.assert_array_equal(nucleus, greedy)
  a, _ = sampling.generate(model(), ids, lengths, max_new_tokens=NEW, key=key, temperature=2.0,
                           top_p=0.95)
  b, _ = sampling.generate(model(), ids, lengths, max_new_tokens=NEW, key=key, temperature=2.0,
                           top_p=0.95)
  c, _ = sampling.generate(model(), ids, lengths, max_new_tokens=NEW, key=jax.random.key(8),
                           temperature=2.0)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  with pytest.raises(ValueError, match="key"):
    sampling.generate(model(), ids, lengths, max_new_tokens=2, temperature=1.0)


def test_select_token_top_p_keeps_the_nucleus():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  # Jitted: an eager vmap compiles each of its ops separately.
  draws = jax.jit(jax.vmap(lambda k: sampling.select_token(logits, k, 1.0, 0.7)))(
      jax.random.split(jax.random.key(0), 400))
  # Mass before token 2 is 0.8 >= 0.7: only tokens 0 and 1 (0.5 : 0.3) can be drawn.
  assert set(np.unique(draws)) == {0, 1}
  assert 0.5 < float(np.mean(draws == 0)) < 0.75


def test_beam_search_width_one_is_greedy_and_wider_is_no_worse():
  ids, lengths = prompts()
  greedy, greedy_lengths = sampling.generate(model(), ids, lengths, max_new_tokens=NEW)
  one, one_lengths, one_score = sampling.beam_search(model(), ids, lengths,
                                                     max_new_tokens=NEW, beams=1)
  np.testing.assert_array_equal(one, greedy)
  np.testing.assert_array_equal(one_lengths, greedy_lengths)
  greedy_logp = sampling.sequence_log_prob(model(), ids, lengths, greedy, greedy_lengths)
  np.testing.assert_allclose(one_score, greedy_logp, atol=1e-4)
  best, best_lengths, best_score = sampling.beam_search(model(), ids, lengths,
                                                        max_new_tokens=NEW, beams=3)
  # The reported score is the sequence's log-probability, and it beats greedy's here (beam
  # search can in principle prune the greedy path; on this model it does not).
  np.testing.assert_allclose(
      sampling.sequence_log_prob(model(), ids, lengths, best, best_lengths), best_score,
      atol=1e-4)
  assert np.all(np.asarray(best_score) >= np.asarray(greedy_logp) - 1e-5)


def test_beam_search_stop_tokens():
  ids, lengths = prompts()
  best, _, _ = sampling.beam_search(model(), ids, lengths, max_new_tokens=NEW, beams=3)
  stop = int(best[1, 1])
  out, out_lengths, _ = sampling.beam_search(model(), ids, lengths, max_new_tokens=NEW, beams=3,
                                             stop_tokens=(stop,), length_penalty=0.5)
  for row in range(3):
    n = int(out_lengths[row])
    assert 1 <= n <= NEW
    assert n == NEW or out[row, n - 1] == stop
    assert stop not in np.asarray(out[row, :n - 1])
    np.testing.assert_array_equal(out[row, n:], 0)
