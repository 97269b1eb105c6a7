"""Gemma-style decoder: masking, KV-cache decoding, GQA, full-size shapes, sharding."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pathflip_jax import sharding
from pathflip_jax.models import decoder

TINY = decoder.get_config("tiny")  # local/global layers, soft-caps, q/k norm, post-norms on


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, tokens, positions, mask=None, cache=None, embeddings=None):
  return nnx.merge(graphdef, state)(tokens, positions, mask, cache, embeddings)


def apply(model, tokens, positions=None, mask=None, cache=None, embeddings=None):
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  graphdef, state = nnx.split(model)
  return _apply(graphdef, state, tokens, positions, mask, cache, embeddings)


@functools.cache
def make(config=TINY, seed=0):
  """A shared model per config (tests that modify one take ``nnx.clone``)."""
  model = decoder.Decoder(config, rngs=nnx.Rngs(seed))
  # Gemma's norm scales start at 0; random ones make the tests see every norm.
  for path, param in nnx.iter_graph(model):
    if isinstance(param, nnx.Param) and path[-1] == "scale":
      param.set_value(jax.random.normal(jax.random.key(len(path)), param.shape) * 0.3)
  return model


def tokens(batch=2, t=10, seed=1, vocab=TINY.vocab_size):
  return jax.random.randint(jax.random.key(seed), (batch, t), 0, vocab)


def test_shapes_and_config_helpers():
  model = make()
  logits, cache = apply(model, tokens())
  assert logits.shape == (2, 10, TINY.vocab_size) and logits.dtype == jnp.float32
  assert cache is None
  assert np.all(np.abs(logits) <= TINY.final_logit_softcap)
  assert TINY.layer_types == ("local", "global")
  assert decoder.get_config("gemma3_1b").layer_types[:7] == ("local",) * 5 + ("global", "local")
  assert decoder.count_params(model) == decoder.expected_params(TINY)
  with pytest.raises(ValueError, match="gemma_2b"):
    decoder.get_config("gemma_7b")
  with pytest.raises(ValueError, match="multiple"):
    decoder.get_config("tiny", num_kv_heads=3)
  with pytest.raises(ValueError, match="sliding_window"):
    decoder.get_config("tiny", sliding_window=None)


def test_causal_and_embeddings_input():
  model = make()
  x = tokens()
  logits, _ = apply(model, x)
  changed = x.at[:, 6].set((x[:, 6] + 1) % TINY.vocab_size)
  logits2, _ = apply(model, changed)
  np.testing.assert_allclose(logits2[:, :6], logits[:, :6], atol=1e-6)
  assert np.abs(logits2[:, 6:] - logits[:, 6:]).max() > 1e-3
  # Precomputed (spliced) embeddings are the same path as token ids.
  embeds = model.embed(x)
  np.testing.assert_allclose(embeds, model.embedding[...][x] * np.sqrt(TINY.width), rtol=1e-6)
  logits3, _ = apply(model, None, jnp.broadcast_to(jnp.arange(10), x.shape), embeddings=embeds)
  np.testing.assert_allclose(logits3, logits, atol=1e-5)


def test_padding_mask_left_padded_matches_unpadded():
  model = make()
  x = tokens(batch=1, t=7)
  # Right-padded to the padded width (causal: the padding cannot reach the 7 real tokens), so
  # this and the unmasked run below share one compilation.
  alone = apply(model, jnp.pad(x, ((0, 0), (0, 3))))[0][:, :7]
  pad = 3
  padded = jnp.concatenate([jnp.zeros((1, pad), x.dtype), x], axis=1)
  positions = jnp.maximum(jnp.arange(7 + pad) - pad, 0)[None]
  valid = (jnp.arange(7 + pad) >= pad)[None]
  got, _ = apply(model, padded, positions, valid)
  np.testing.assert_allclose(got[:, pad:], alone, atol=1e-5)
  # Without the mask the padding leaks into the real tokens.
  leaked, _ = apply(model, padded, positions)
  assert np.abs(leaked[:, pad:] - alone).max() > 1e-3
  # A full [b, t, s] mask equal to causal & valid gives the same result.
  full = (jnp.arange(10)[:, None] >= jnp.arange(10)) & valid[:, None, :]
  got_full, _ = apply(model, padded, positions, full)
  np.testing.assert_allclose(got_full[:, pad:], alone, atol=1e-5)


def test_sliding_window_limits_context():
  """In a model of local layers only, a token > window * depth back cannot matter."""
  config = decoder.get_config("tiny", attention_pattern=("local",), sliding_window=3)
  model = make(config)
  x = tokens(batch=1, t=12)
  logits, _ = apply(model, x)
  changed, _ = apply(model, x.at[0, 0].set((x[0, 0] + 1) % config.vocab_size))
  # Receptive field: depth * (window - 1) = 4 tokens back from each query.
  np.testing.assert_allclose(changed[:, 5:], logits[:, 5:], atol=1e-6)
  assert np.abs(changed[:, 4] - logits[:, 4]).max() > 1e-4


@pytest.mark.parametrize("prefill", [1, 3])
def test_cached_decoding_matches_full_forward(prefill):
  """Token-by-token decoding past the sliding window equals one full pass (soft-caps on)."""
  model = make()
  x = tokens(batch=2, t=10)
  full, _ = apply(model, x)
  cache = model.init_cache(2, 12, jnp.float32)
  positions = jnp.broadcast_to(jnp.arange(10), x.shape)
  logits, cache = apply(model, x[:, :prefill], positions[:, :prefill], cache=cache)
  steps = [logits]
  for i in range(prefill, 10):
    logits, cache = apply(model, x[:, i:i + 1], positions[:, i:i + 1], cache=cache)
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5)
  np.testing.assert_array_equal(cache.end_index, [10, 10])
  assert cache.layers[0].k.shape == (2, 12, TINY.num_kv_heads, TINY.head_dim)


def test_cache_rows_of_different_lengths():
  """Right-padded prefill: each row's end index is its length; decoding continues per row."""
  model = make()
  x = tokens(batch=2, t=8)
  lengths = jnp.array([8, 5])
  valid = jnp.arange(8)[None] < lengths[:, None]
  positions = jnp.broadcast_to(jnp.arange(8), x.shape)
  _, cache = apply(model, x, positions, valid, cache=model.init_cache(2, 10))
  np.testing.assert_array_equal(cache.end_index, lengths)
  nxt = jnp.array([[3], [7]])
  logits, cache = apply(model, nxt, lengths[:, None], cache=cache)
  np.testing.assert_array_equal(cache.end_index, lengths + 1)
  for row in range(2):
    seq = jnp.concatenate([x[row, :lengths[row]], nxt[row]])[None]
    # Right-padded to one width (one compilation for both rows; causality hides the padding).
    alone, _ = apply(model, jnp.pad(seq, ((0, 0), (0, 10 - seq.shape[1]))))
    np.testing.assert_allclose(logits[row, 0], alone[0, seq.shape[1] - 1], atol=1e-5)


def test_grouped_query_attention_equals_tiled_multi_head():
  """kv heads 1 and 2 run; tiling their k/v kernels over the groups gives the MHA model."""
  x = tokens()
  ref_config = decoder.get_config("tiny", num_kv_heads=4)
  for kv_heads in (1, 2):
    config = decoder.get_config("tiny", num_kv_heads=kv_heads)
    model = make(config)
    logits, _ = apply(model, x)
    mha = nnx.clone(make(ref_config))
    nnx.update(mha, nnx.state(model))  # same shapes except k/v kernels, fixed below
    for src, dst in zip(model.layers, mha.layers):
      for name in ("k_kernel", "v_kernel"):
        kernel = getattr(src.attention, name)[...]
        getattr(dst.attention, name).set_value(jnp.repeat(kernel, 4 // kv_heads, axis=1))
    np.testing.assert_allclose(apply(mha, x)[0], logits, atol=1e-5)


# Published totals, tied embedding counted once. Gemma/Gemma 2 papers give embedding +
# non-embedding counts with a 256,128-row table (524,550,144 + 1,981,884,416 and
# 590,118,912 + 2,024,517,888); our 256,000-row table is 128 * width smaller. Gemma 3 paper,
# Table 1: 1B = 302M + 698M; 4B = 675M + 3,209M (its 417M vision encoder is not built here).
@pytest.mark.parametrize("name,published", [
    ("gemma_2b", 2_506_434_560),
    ("gemma2_2b", 2_614_636_800),
    ("gemma3_1b", 1_000e6),
    ("gemma3_4b", 3_884e6),
    # Model cards: SmolLM2-135M 135M, Llama 3.2 1B 1.23B, Qwen3 0.6B 0.6B (0.44B non-embedding).
    ("smollm2_135m", 134.5e6),
    ("llama3_1b", 1.236e9),
    ("qwen3_0_6b", 0.596e9),
])
def test_full_size_shapes_and_param_counts(name, published):
  config = decoder.get_config(name)
  model = nnx.eval_shape(lambda: decoder.Decoder(config, rngs=nnx.Rngs(0)))
  count = decoder.count_params(model)
  assert count == decoder.expected_params(config)
  assert abs(count - published) / published < 0.02, count
  assert model.layers[0].attention.q_kernel.shape == (config.width, config.num_heads,
                                                       config.head_dim)
  out = nnx.eval_shape(lambda m: m(jnp.zeros((1, 4), jnp.int32),
                                   jnp.zeros((1, 4), jnp.int32))[0], model)
  assert out.shape == (1, 4, config.vocab_size)


def test_sharded_forward_matches_unsharded():
  model = make()
  x = tokens(batch=4, t=10)
  want, _ = apply(model, x)
  mesh = sharding.make_mesh(data=2, fsdp=2, model=2)
  sharded = sharding.shard_module(nnx.clone(model), mesh)
  q_kernel = sharded.layers[0].attention.q_kernel.get_value()
  assert q_kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "model", None)
  assert sharded.embedding.get_value().sharding.spec == \
      jax.sharding.PartitionSpec("model", "fsdp")
  x = jax.device_put(x, sharding.batch_sharding(mesh, 2))
  got, _ = apply(sharded, x, jax.device_put(jnp.broadcast_to(jnp.arange(10), x.shape),
                                            sharding.batch_sharding(mesh, 2)))
  assert len(got.sharding.device_set) == 8
  np.testing.assert_allclose(got, want, atol=1e-5)
