"""The layers every model family shares (Flax NNX): the parameter helper, Dense, LayerNorm,
RMSNorm, the GELU MLP and one multi-head attention.

Parameters are created by :func:`param` with logical axis names (metadata only:
``sharding.LOGICAL_RULES`` maps them to mesh axes), in ``param_dtype`` (float32); ``dtype`` is the
compute dtype (bfloat16 on GPU/TPU). Statistics, softmax and attention logits stay float32
whatever the compute dtype.

:class:`MultiHeadAttention` serves the ViT (timm's fused qkv layout, so timm weights import as
they are), the text tower (fused, padding masked) and the Q-Former and slide context (separate
q/k/v projections: cross-attention reads keys of another width; chunked keys with a running
softmax over a slide's patches). The decoder keeps its own attention (``decoder.Attention``):
grouped-query heads, RoPE, soft-capping, sliding windows and a KV cache share little with these.

Einsum letters: b batch, q query tokens, k key tokens, h heads, c head channels, d width.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from pathflip_jax import sharding

Dtype = Any
Initializer = Callable[..., jax.Array]

# timm's trunc_normal_(std=.02) truncates at +-2 absolute, i.e. +-100 std: a plain normal.
weight_init = nnx.initializers.normal(stddev=0.02)
zeros = nnx.initializers.zeros_init()
ones = nnx.initializers.ones_init()
# Finite, so a row whose keys are all masked gives a uniform softmax rather than NaN.
_MASKED = -1e30

# Whether the unchunked attention core runs through ``jax.nn.dot_product_attention`` (None: on
# every backend but the CPU). On XLA:CPU it ran 0.55-0.85x as fast as the (batch, heads, tokens,
# channels) einsums below (NOTES-dependencies.md, item 15); elsewhere it is the entry point to
# fused kernels. Read at trace time; tests set it to compare both paths.
DOT_PRODUCT_ATTENTION: bool | None = None
# Its ``implementation``: None lets JAX choose (jax 0.10.2 then always takes its XLA einsums;
# "cudnn" asks for cuDNN's fused kernel on NVIDIA GPUs, bf16/fp16 only).
DOT_PRODUCT_ATTENTION_IMPLEMENTATION: str | None = None


def use_dot_product_attention() -> bool:
  """Whether :class:`MultiHeadAttention` traces ``jax.nn.dot_product_attention`` now."""
  if DOT_PRODUCT_ATTENTION is None:
    return jax.default_backend() != "cpu"
  return DOT_PRODUCT_ATTENTION


def param(key: jax.Array | None, init: Initializer, shape: Sequence[int],
          axes: tuple[str | None, ...], param_dtype: Dtype) -> nnx.Param:
  """A parameter annotated with logical axis names (metadata only: no mesh needed).

  ``key`` is None for constant initialisers. Drawing keys only where needed matters under
  ``nnx.eval_shape``: every ``rngs.params()`` costs time proportional to everything traced so far
  (flax probes ``.sharding`` of the traced counter; jax-ml/jax#40041), quadratic over a deep model.
  """
  return nnx.Param(sharding.param_init(init, *axes)(key, tuple(shape), param_dtype))


def count_params(model: nnx.Module) -> int:
  """Number of parameters (works on abstract models from ``nnx.eval_shape``)."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, statistics in float32 (two-pass variance, as torch)."""

  def __init__(self, width: int, *, eps: float, dtype: Dtype, param_dtype: Dtype):
    self.eps, self.dtype = eps, dtype
    self.scale = param(None, ones, (width,), ("embed",), param_dtype)
    self.bias = param(None, zeros, (width,), ("embed",), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    mean = x.mean(axis=-1, keepdims=True)
    centered = x - mean
    var = jnp.mean(jnp.square(centered), axis=-1, keepdims=True)
    y = centered * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
    return y.astype(self.dtype)


class RMSNorm(nnx.Module):
  """x / rms(x) * (1 + scale), statistics in float32; scale starts at 0 (Gemma's form).

  ``plus_one=False`` is the plain form of Llama and Qwen, x / rms(x) * scale, scale starting at 1.
  """

  def __init__(self, width: int, axis_name: str | None, *, eps: float, dtype: Dtype,
               param_dtype: Dtype, plus_one: bool = True):
    self.eps, self.dtype, self.plus_one = eps, dtype, plus_one
    self.scale = param(None, zeros if plus_one else ones, (width,), (axis_name,), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
    scale = self.scale[...].astype(jnp.float32)
    return (y * (1.0 + scale if self.plus_one else scale)).astype(self.dtype)


class Dense(nnx.Module):
  """``x @ kernel + bias`` over the last axis; kernel [in, out] (torch Linear weight transposed)."""

  def __init__(self, d_in: int, d_out: int, axes: tuple[str | None, str | None], *,
               rngs: nnx.Rngs, dtype: Dtype, param_dtype: Dtype, zero_init: bool = False):
    self.dtype = dtype
    self.kernel = (param(None, zeros, (d_in, d_out), axes, param_dtype) if zero_init else
                   param(rngs.params(), weight_init, (d_in, d_out), axes, param_dtype))
    self.bias = param(None, zeros, (d_out,), (axes[1],), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    # As one 2-D matmul: XLA:CPU runs the backward pass of a [b, t, d] @ [d, o] product (the
    # kernel gradient contracts two batch dims) ~3x slower than of the flattened product.
    d_in, d_out = self.kernel.shape
    y = x.astype(self.dtype).reshape(-1, d_in) @ self.kernel[...].astype(self.dtype)
    return (y + self.bias[...].astype(self.dtype)).reshape(*x.shape[:-1], d_out)


class Mlp(nnx.Module):
  """fc1 -> exact (erf) GELU -> fc2 (timm's ``Mlp`` with ``nn.GELU()``, BERT's feed-forward)."""

  def __init__(self, width: int, hidden: int, *, rngs: nnx.Rngs, dtype: Dtype,
               param_dtype: Dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.fc1 = Dense(width, hidden, ("embed", "mlp"), **kw)
    self.fc2 = Dense(hidden, width, ("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class TokenEmbedding(nnx.Module):
  """Learned token and position embeddings of a BERT-like text encoder (the text tower, the
  Q-Former's text branch): token ids [b, t] (right-padded with ``pad_id``) -> the embedded
  tokens [b, t, d] and which of them are real [b, t]."""

  def __init__(self, vocab_size: int, max_len: int, width: int, pad_id: int, *,
               rngs: nnx.Rngs, dtype: Dtype, param_dtype: Dtype):
    self.max_len, self.pad_id, self.dtype = max_len, pad_id, dtype
    self.token_embed = param(rngs.params(), nnx.initializers.normal(0.02), (vocab_size, width),
                             ("vocab", "embed"), param_dtype)
    self.pos_embed = param(rngs.params(), nnx.initializers.normal(0.01), (max_len, width),
                           ("tokens", "embed"), param_dtype)

  def __call__(self, tokens_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    t = tokens_bt.shape[1]
    if t > self.max_len:
      raise ValueError(f"text of {t} tokens is longer than the text encoder's maximum "
                       f"length {self.max_len}")
    x = jnp.take(self.token_embed[...], tokens_bt, axis=0).astype(self.dtype)
    return x + self.pos_embed[:t].astype(self.dtype), tokens_bt != self.pad_id


class MultiHeadAttention(nnx.Module):
  """Multi-head attention; heads stay an axis of every kernel, for sharding over "heads".

  Parameters: ``fused_qkv`` (self-attention only): ``qkv_kernel`` [d, 3, h, c] and ``qkv_bias``
  [3, h, c] (timm's fused layout); otherwise ``q_kernel`` [d, h, c] and ``k_kernel`` /
  ``v_kernel`` [kv_width, h, c] with biases [h, c]. Always ``o_kernel`` [h, c, d], ``o_bias`` [d].

  Logits are q.k in the compute dtype, then float32 times 1/sqrt(c) (as
  ``jax.nn.dot_product_attention`` scales them); the core runs in the (batch, heads, tokens,
  channels) layout, the fastest on XLA:CPU (NOTES-dependencies.md, item 15). Off the CPU
  (``DOT_PRODUCT_ATTENTION``) the unchunked core is ``jax.nn.dot_product_attention``, the same
  computation (float32 softmax, masked keys at a large finite negative; its logits accumulate
  in float32 also for bfloat16 inputs).
  ``cpu_batch_chunk`` (self-attention on CPU only): the core runs that many sequences at a time,
  which XLA:CPU runs up to 3x faster once the [b, h, t, t] logits outgrow the cache (ViT
  patches); 0 = all at once.
  """

  def __init__(self, width: int, num_heads: int, *, rngs: nnx.Rngs, dtype: Dtype,
               param_dtype: Dtype, kv_width: int | None = None, fused_qkv: bool = False,
               qkv_bias: bool = True, cpu_batch_chunk: int = 0):
    if width % num_heads:
      raise ValueError(f"attention width {width} is not divisible by {num_heads} heads")
    if fused_qkv and kv_width not in (None, width):
      raise ValueError("fused_qkv is self-attention: kv_width must equal width")
    kv_width = kv_width or width
    h, c = num_heads, width // num_heads
    self.num_heads, self.head_dim, self.dtype = h, c, dtype
    self.fused_qkv, self.cpu_batch_chunk = fused_qkv, cpu_batch_chunk
    if fused_qkv:
      self.qkv_kernel = param(rngs.params(), weight_init, (width, 3, h, c),
                              ("embed", None, "heads", "kv"), param_dtype)
      self.qkv_bias = (param(None, zeros, (3, h, c), (None, "heads", "kv"), param_dtype)
                       if qkv_bias else None)
    else:
      def kernel(d_in):
        return param(rngs.params(), weight_init, (d_in, h, c), ("embed", "heads", "kv"),
                     param_dtype)

      def bias():
        return (param(None, zeros, (h, c), ("heads", "kv"), param_dtype) if qkv_bias
                else None)

      self.q_kernel, self.k_kernel, self.v_kernel = kernel(width), kernel(kv_width), \
          kernel(kv_width)
      self.q_bias, self.k_bias, self.v_bias = bias(), bias(), bias()
    self.o_kernel = param(rngs.params(), weight_init, (h, c, width), ("heads", "kv", "embed"),
                          param_dtype)
    self.o_bias = param(None, zeros, (width,), ("embed",), param_dtype)

  # ------------------------------------------------------------------ projections
  def project(self, x: jax.Array, which: str) -> jax.Array:
    """[..., d] -> [..., h, c] with the q, k or v projection, as one 2-D matmul (see Dense)."""
    if self.fused_qkv:
      index = "qkv".index(which)
      kernel = self.qkv_kernel[:, index]
      bias = None if self.qkv_bias is None else self.qkv_bias[index]
    else:
      kernel = getattr(self, f"{which}_kernel")[...]
      bias = getattr(self, f"{which}_bias")
      bias = None if bias is None else bias[...]
    d = kernel.shape[0]
    y = x.astype(self.dtype).reshape(-1, d) @ kernel.astype(self.dtype).reshape(d, -1)
    if bias is not None:
      y = y + bias.astype(self.dtype).reshape(-1)
    return y.reshape(*x.shape[:-1], self.num_heads, self.head_dim)

  def _qkv(self, x_btd: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Self-attention's q, k, v [b, t, h, c]; the fused kernel in one matmul."""
    if not self.fused_qkv:
      return self.project(x_btd, "q"), self.project(x_btd, "k"), self.project(x_btd, "v")
    d = x_btd.shape[-1]
    y = x_btd.astype(self.dtype).reshape(-1, d) @ self.qkv_kernel[...].astype(
        self.dtype).reshape(d, -1)
    if self.qkv_bias is not None:
      y = y + self.qkv_bias[...].astype(self.dtype).reshape(-1)
    y = y.reshape(*x_btd.shape[:-1], 3, self.num_heads, self.head_dim)
    return y[..., 0, :, :], y[..., 1, :, :], y[..., 2, :, :]

  def output(self, attended_bqhc: jax.Array) -> jax.Array:
    """[b, q, h, c] -> [b, q, d] through the output projection."""
    b, q, h, c = attended_bqhc.shape
    kernel = self.o_kernel[...].astype(self.dtype).reshape(h * c, -1)
    out = attended_bqhc.astype(self.dtype).reshape(b * q, h * c) @ kernel
    return (out + self.o_bias[...].astype(self.dtype)).reshape(b, q, -1)

  # ------------------------------------------------------------------ the core
  def _softmax(self, q_bqhc: jax.Array, k_bkhc: jax.Array, valid_bk: jax.Array | None
               ) -> jax.Array:
    """float32 attention weights [b, h, q, k]."""
    q_bhqc, k_bhkc = q_bqhc.transpose(0, 2, 1, 3), k_bkhc.transpose(0, 2, 1, 3)
    logits = jnp.einsum("bhqc,bhkc->bhqk", q_bhqc, k_bhkc).astype(jnp.float32)
    logits = logits * self.head_dim ** -0.5
    if valid_bk is not None:
      logits = jnp.where(valid_bk[:, None, None, :], logits, _MASKED)
    return jax.nn.softmax(logits, axis=-1)

  def _mix(self, weights_bhqk: jax.Array, v_bkhc: jax.Array) -> jax.Array:
    """The weights' mix of the values, [b, q, h, c] (before the output projection)."""
    attended = jnp.einsum("bhqk,bhkc->bhqc", weights_bhqk.astype(self.dtype),
                          v_bkhc.transpose(0, 2, 1, 3))
    return attended.transpose(0, 2, 1, 3)

  def _core(self, q_bqhc: jax.Array, k_bkhc: jax.Array, v_bkhc: jax.Array,
            valid_bk: jax.Array | None) -> jax.Array:
    """Unchunked attention, [b, q, h, c] (before the output projection)."""
    if use_dot_product_attention():
      mask = None if valid_bk is None else valid_bk[:, None, None, :]
      return jax.nn.dot_product_attention(q_bqhc, k_bkhc, v_bkhc, mask=mask,
                                          implementation=DOT_PRODUCT_ATTENTION_IMPLEMENTATION)
    return self._mix(self._softmax(q_bqhc, k_bkhc, valid_bk), v_bkhc)

  def weights(self, x_bqd: jax.Array, kv_bkd: jax.Array, valid_bk: jax.Array | None = None
              ) -> jax.Array:
    """Softmax attention weights of x over kv [b, h, q, k] (float32), keys masked by
    ``valid_bk`` (for heatmaps and the text-conditioned region attention)."""
    return self._softmax(self.project(x_bqd, "q"), self.project(kv_bkd, "k"), valid_bk)

  def attend(self, weights_bhqk: jax.Array, kv_bkd: jax.Array) -> jax.Array:
    """The output for given attention weights: their mix of the projected values of
    ``kv_bkd``, through the output projection (for callers that need the weights too)."""
    return self.output(self._mix(weights_bhqk, self.project(kv_bkd, "v")))

  def __call__(self, x_bqd: jax.Array, kv_bkd: jax.Array | None = None,
               valid_bk: jax.Array | None = None) -> jax.Array:
    """Attention of x over kv (None: self-attention), keys masked by ``valid_bk``."""
    if kv_bkd is not None:
      return self.output(self._core(self.project(x_bqd, "q"), self.project(kv_bkd, "k"),
                                    self.project(kv_bkd, "v"), valid_bk))
    q, k, v = self._qkv(x_bqd)
    b = x_bqd.shape[0]
    chunk = self.cpu_batch_chunk
    if (chunk and jax.default_backend() == "cpu" and b > chunk and b % chunk == 0
        and valid_bk is None):
      def core(qkv):
        return self._core(*qkv, None)
      groups = lambda t: t.reshape(b // chunk, chunk, *t.shape[1:])  # noqa: E731
      attended = jax.lax.map(core, (groups(q), groups(k), groups(v)))
      attended = attended.reshape(b, *attended.shape[2:])
    else:
      attended = self._core(q, k, v, valid_bk)
    return self.output(attended)

  def chunked(self, x_bqd: jax.Array, kv_bnd: jax.Array, valid_bn: jax.Array,
              chunk: int) -> jax.Array:
    """The same as ``__call__(x, kv, valid)``, with keys in chunks of ``chunk`` and a running
    softmax (flash-attention style).

    Keys/values are projected chunk by chunk inside a ``lax.scan`` whose body is rematerialised
    for the backward pass, so nothing of size N x width per layer is kept; the query side (a few
    tokens) is tiny. Fully masked rows give zeros, not NaN.
    """
    b, n, d = kv_bnd.shape
    if n <= chunk:
      return self(x_bqd, kv_bnd, valid_bn)
    pad = -n % chunk
    if pad:
      kv_bnd = jnp.pad(kv_bnd, ((0, 0), (0, pad), (0, 0)))
      valid_bn = jnp.pad(valid_bn, ((0, 0), (0, pad)))
    num_chunks = (n + pad) // chunk
    kv_sbnd = kv_bnd.reshape(b, num_chunks, chunk, d).swapaxes(0, 1)
    valid_sbn = valid_bn.reshape(b, num_chunks, chunk).swapaxes(0, 1)
    q = self.project(x_bqd, "q")
    qlen = q.shape[1]
    h, c = self.num_heads, self.head_dim

    @jax.checkpoint
    def step(carry, inputs):
      max_bhq, sum_bhq, acc_bqhc = carry
      kv, valid = inputs
      k = self.project(kv, "k")
      v = self.project(kv, "v")
      logits = jnp.einsum("bqhc,bkhc->bhqk", q, k).astype(jnp.float32) * c ** -0.5
      logits = jnp.where(valid[:, None, None, :], logits, _MASKED)
      new_max = jnp.maximum(max_bhq, logits.max(axis=-1))
      correction = jnp.exp(max_bhq - new_max)
      p = jnp.exp(logits - new_max[..., None]) * valid[:, None, None, :]
      sum_bhq = sum_bhq * correction + p.sum(axis=-1)
      acc_bqhc = (acc_bqhc * correction.transpose(0, 2, 1)[..., None]
                  + jnp.einsum("bhqk,bkhc->bqhc", p, v.astype(jnp.float32)))
      return (new_max, sum_bhq, acc_bqhc), None

    init = (jnp.full((b, h, qlen), _MASKED, jnp.float32), jnp.zeros((b, h, qlen), jnp.float32),
            jnp.zeros((b, qlen, h, c), jnp.float32))
    (_, sum_bhq, acc_bqhc), _ = jax.lax.scan(step, init, (kv_sbnd, valid_sbn))
    attended = acc_bqhc / jnp.maximum(sum_bhq.transpose(0, 2, 1)[..., None], 1e-30)
    return self.output(attended.astype(self.dtype))
