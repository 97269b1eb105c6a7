"""The shared layers (models/layers.py): one multi-head attention in its fused and separate
layouts, masking, the CPU batch chunking, and the norms, against plain NumPy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pathflip_jax.models import layers

FAST = {"xla_backend_optimization_level": 0}


def _numpy_attention(x, kv, wq, wk, wv, wo, bq, bk, bv, bo, valid=None):
  """softmax(q k^T / sqrt(c)) v, head by head, in float64."""
  heads, c = wq.shape[1], wq.shape[2]
  q = np.einsum("btd,dhc->bthc", x, wq) + bq
  k = np.einsum("bsd,dhc->bshc", kv, wk) + bk
  v = np.einsum("bsd,dhc->bshc", kv, wv) + bv
  logits = np.einsum("bthc,bshc->bhts", q, k) / np.sqrt(c)
  if valid is not None:
    logits = np.where(valid[:, None, None, :], logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  out = np.einsum("bhts,bshc->bthc", weights, v)
  return np.einsum("bthc,hcd->btd", out, wo) + bo, weights


def _random(attention, rng):
  """Random values for every parameter (biases too, so a bias bug shows)."""
  state = nnx.state(attention, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  new = [jnp.asarray(rng.normal(size=leaf.shape) * 0.3, jnp.float32) for leaf in leaves]
  nnx.update(attention, jax.tree.unflatten(treedef, new))
  return attention


def test_separate_projections_match_numpy_with_a_key_mask():
  rng = np.random.default_rng(0)
  attention = _random(layers.MultiHeadAttention(8, 2, kv_width=6, rngs=nnx.Rngs(0),
                                                dtype=jnp.float32, param_dtype=jnp.float32), rng)
  x, kv = rng.normal(size=(2, 3, 8)), rng.normal(size=(2, 5, 6))
  valid = np.array([[1, 1, 0, 1, 0], [0, 0, 0, 0, 1]], bool)
  got = nnx.jit(lambda m: m(jnp.asarray(x, jnp.float32), jnp.asarray(kv, jnp.float32),
                            jnp.asarray(valid)))(attention)
  p = {k: np.asarray(getattr(attention, k)[...], np.float64) for k in
       ("q_kernel", "k_kernel", "v_kernel", "o_kernel", "q_bias", "k_bias", "v_bias", "o_bias")}
  want, weights = _numpy_attention(x, kv, p["q_kernel"], p["k_kernel"], p["v_kernel"],
                                   p["o_kernel"], p["q_bias"], p["k_bias"], p["v_bias"],
                                   p["o_bias"], valid)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  got_weights = nnx.jit(lambda m: m.weights(jnp.asarray(x, jnp.float32),
                                            jnp.asarray(kv, jnp.float32), jnp.asarray(valid))
                        )(attention)
  np.testing.assert_allclose(got_weights, weights, rtol=1e-4, atol=1e-6)
  assert np.all(np.asarray(got_weights)[~np.broadcast_to(valid[:, None, None], weights.shape)]
                == 0)


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_fused_qkv_is_the_same_attention_as_separate_projections(qkv_bias):
  """timm's fused [d, 3, h, c] kernel computes what three [d, h, c] kernels do."""
  rng = np.random.default_rng(1)
  fused = _random(layers.MultiHeadAttention(8, 2, fused_qkv=True, qkv_bias=qkv_bias,
                                            rngs=nnx.Rngs(0), dtype=jnp.float32,
                                            param_dtype=jnp.float32), rng)
  x = rng.normal(size=(3, 4, 8))
  valid = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], bool)
  kernel = np.asarray(fused.qkv_kernel[...], np.float64)
  bias = (np.asarray(fused.qkv_bias[...], np.float64) if qkv_bias
          else np.zeros((3, 2, 4)))
  want, _ = _numpy_attention(x, x, kernel[:, 0], kernel[:, 1], kernel[:, 2],
                             np.asarray(fused.o_kernel[...], np.float64), bias[0], bias[1],
                             bias[2], np.asarray(fused.o_bias[...], np.float64), valid)
  got = nnx.jit(lambda m: m(jnp.asarray(x, jnp.float32), valid_bk=jnp.asarray(valid)))(fused)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert (fused.qkv_bias is None) == (not qkv_bias)


def test_cpu_batch_chunks_give_the_same_self_attention():
  """On CPU, 4 sequences at a time (the ViT's setting) give what the whole batch gives."""
  rng = np.random.default_rng(2)
  kw = dict(dtype=jnp.float32, param_dtype=jnp.float32, fused_qkv=True)
  whole = layers.MultiHeadAttention(16, 4, rngs=nnx.Rngs(3), **kw)
  chunked = layers.MultiHeadAttention(16, 4, cpu_batch_chunk=4, rngs=nnx.Rngs(3), **kw)
  x = jnp.asarray(rng.normal(size=(8, 10, 16)), jnp.float32)
  a, b = jax.jit(lambda m1, m2: (m1(x), m2(x)), compiler_options=FAST)(whole, chunked)
  assert jax.default_backend() == "cpu"
  np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_dot_product_attention_is_the_same_core(fused, monkeypatch):
  """jax.nn.dot_product_attention (the path off the CPU) computes what the einsum core does,
  masked keys and a fully masked row included, for self- and cross-attention."""
  rng = np.random.default_rng(4)
  kw = dict(dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(5))
  attention = _random(layers.MultiHeadAttention(16, 4, fused_qkv=fused,
                                                kv_width=None if fused else 12, **kw), rng)
  x = jnp.asarray(rng.normal(size=(3, 5, 16)), jnp.float32)
  kv = None if fused else jnp.asarray(rng.normal(size=(3, 7, 12)), jnp.float32)
  valid = jnp.asarray(rng.random((3, 5 if fused else 7)) < 0.6).at[1].set(False)

  def run(m):
    return m(x, kv, valid), m(x, kv)

  outputs = {}
  for use in (False, True):
    monkeypatch.setattr(layers, "DOT_PRODUCT_ATTENTION", use)
    assert layers.use_dot_product_attention() == use
    lowered = jax.jit(lambda s: run(nnx.merge(*nnx.split(attention)[:1], s))).lower(
        nnx.state(attention))
    outputs[use] = lowered.compile()(nnx.state(attention))
  for einsum_out, dpa_out in zip(outputs[False], outputs[True]):
    np.testing.assert_allclose(dpa_out, einsum_out, rtol=1e-6, atol=1e-6)
  assert np.all(np.isfinite(outputs[True][0]))


def test_fused_layout_is_self_attention_only():
  with pytest.raises(ValueError, match="kv_width"):
    layers.MultiHeadAttention(8, 2, kv_width=6, fused_qkv=True, rngs=nnx.Rngs(0),
                              dtype=jnp.float32, param_dtype=jnp.float32)
  with pytest.raises(ValueError, match="not divisible"):
    layers.MultiHeadAttention(9, 2, rngs=nnx.Rngs(0), dtype=jnp.float32,
                              param_dtype=jnp.float32)


def test_norms_and_mlp_match_numpy():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(3, 6)) * 5 + 2
  norm = layers.LayerNorm(6, eps=1e-6, dtype=jnp.float32, param_dtype=jnp.float32)
  centered = x - x.mean(-1, keepdims=True)
  np.testing.assert_allclose(norm(jnp.asarray(x, jnp.float32)),
                             centered / np.sqrt((centered ** 2).mean(-1, keepdims=True) + 1e-6),
                             rtol=1e-5, atol=1e-5)
  rms = layers.RMSNorm(6, "embed", eps=1e-6, dtype=jnp.float32, param_dtype=jnp.float32)
  rms.scale[...] = jnp.full((6,), 0.5)
  np.testing.assert_allclose(rms(jnp.asarray(x, jnp.float32)),
                             1.5 * x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6),
                             rtol=1e-5, atol=1e-5)
  mlp = layers.Mlp(6, 12, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
  h = x @ np.asarray(mlp.fc1.kernel[...]) + np.asarray(mlp.fc1.bias[...])
  gelu = 0.5 * h * (1 + np.vectorize(math.erf)(h / np.sqrt(2)))
  np.testing.assert_allclose(mlp(jnp.asarray(x, jnp.float32)),
                             gelu @ np.asarray(mlp.fc2.kernel[...]), rtol=1e-4, atol=1e-4)
  assert layers.count_params(mlp) == 6 * 12 + 12 + 12 * 6 + 6
