"""LoRA (low-rank adapters) for the decoder's projections, named as Hugging Face/PEFT name them.

``decoder.Decoder(..., lora=LoraConfig(...))`` builds a :class:`LoraAdapter` beside every targeted
projection (``adapter``), at paths such as ``layers/0/attention/q_proj_lora/a``, so
``optim.trainable=("lora",)`` trains them alone. :func:`merge_lora` folds them into the kernels;
``convert/gemma_lora.py`` saves and loads them in PEFT's format.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pathflip_jax.models import layers

Dtype = Any

# The projections LoRA can adapt, by their Hugging Face / PEFT module names.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Low-rank adapters (LoRA): ``W x`` becomes ``W x + (alpha / rank) * B A dropout(x)``.

  Attributes:
    rank: inner dimension r of each adapter, >= 1.
    alpha: the update is scaled by ``alpha / rank`` (PEFT's ``lora_alpha``), > 0.
    dropout: dropout rate on the adapter's input (not the base projection's), in [0, 1); only
      applied when ``Decoder.__call__`` is given a ``dropout_rng``.
    targets: projections to adapt, named as in Hugging Face/PEFT (see ``LORA_TARGETS``); the
      default is PEFT's default for Gemma. gate_proj and up_proj get separate adapters although
      the decoder fuses their kernels.
  """

  rank: int
  alpha: float
  dropout: float = 0.0
  targets: tuple[str, ...] = ("q_proj", "v_proj")

  def __post_init__(self):
    if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
      raise ValueError(f"LoraConfig.rank must be an integer >= 1, got {self.rank!r}")
    if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) \
        or not math.isfinite(self.alpha) or self.alpha <= 0:
      raise ValueError(f"LoraConfig.alpha must be a finite number > 0, got {self.alpha!r}")
    if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
        or not 0 <= self.dropout < 1:
      raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
    if isinstance(self.targets, str):  # a bare string would be read letter by letter
      raise ValueError(f"LoraConfig.targets must be a sequence of names, got {self.targets!r}")
    targets = tuple(self.targets)
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown or not targets or len(set(targets)) != len(targets):
      raise ValueError(f"LoraConfig.targets {list(targets)} must be distinct names from "
                       f"{', '.join(LORA_TARGETS)}" + (f"; unknown: {unknown}" if unknown else ""))
    object.__setattr__(self, "targets", targets)  # a list from a config file is fine too

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def _lora_a_init(fan_in: int):
  # PEFT's default for A (torch's kaiming_uniform_ with a=sqrt(5), as nn.Linear): uniform in
  # +-1/sqrt(fan_in), std 1/sqrt(3 fan_in). Matching it lets learning rates and alpha tuned with
  # PEFT carry over, since A's scale sets how fast B (which starts at 0) moves the output.
  bound = fan_in ** -0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound,
                                                                  bound)


class LoraAdapter(nnx.Module):
  """The low-rank update ``scale * (dropout(x) @ a) @ b`` of one projection.

  ``a`` [in..., r] and ``b`` [r, out...] keep the adapted kernel's input and output axes and their
  logical names (the rank axis has none), so they shard like the kernel. ``b`` starts at zero: a
  fresh adapter leaves the model's output unchanged.
  """

  def __init__(self, target: str, in_shape: tuple[int, ...], in_axes: tuple[str | None, ...],
               out_shape: tuple[int, ...], out_axes: tuple[str | None, ...], lora: LoraConfig,
               *, key: jax.Array, dtype: Dtype, param_dtype: Dtype):
    self.target, self.dtype = target, dtype
    self.scale, self.dropout = lora.scale, lora.dropout
    r = lora.rank
    self.a = layers.param(key, _lora_a_init(math.prod(in_shape)), (*in_shape, r),
                        (*in_axes, None), param_dtype)
    self.b = layers.param(None, layers.zeros, (r, *out_shape), (None, *out_axes), param_dtype)

  def __call__(self, x_ni: jax.Array, rng: jax.Array | None) -> jax.Array:
    """[n, in] (input axes flattened) -> [n, out] (output axes flattened).

    ``rng`` is the layer's dropout key (None: no dropout); the target's index is folded in, so
    every adapter of a layer draws its own mask.
    """
    if rng is not None and self.dropout:
      keep = 1.0 - self.dropout
      mask_ni = jax.random.bernoulli(jax.random.fold_in(rng, LORA_TARGETS.index(self.target)),
                                     keep, x_ni.shape)
      x_ni = jnp.where(mask_ni, x_ni / jnp.asarray(keep, x_ni.dtype), 0).astype(x_ni.dtype)
    r = self.a.shape[-1]
    h_nr = x_ni @ self.a[...].astype(self.dtype).reshape(-1, r)
    h_nr = h_nr * jnp.asarray(self.scale, self.dtype)  # on the rank-wide activation: cheapest
    return h_nr @ self.b[...].astype(self.dtype).reshape(r, -1)


def adapter(lora: LoraConfig | None, target: str, key: jax.Array, in_shape: tuple[int, ...],
            in_axes: tuple[str | None, ...], out_shape: tuple[int, ...],
            out_axes: tuple[str | None, ...], **kw) -> LoraAdapter | None:
  """An adapter when ``lora`` targets ``target``, else None."""
  if lora is None or target not in lora.targets:
    return None
  # Folded, not split from the kernels' key: adding adapters leaves the base kernels' init as is.
  key = jax.random.fold_in(key, 1000 + LORA_TARGETS.index(target))
  return LoraAdapter(target, in_shape, in_axes, out_shape, out_axes, lora, key=key, **kw)


# Each LoRA target's sub-module, the kernel it adapts and, for the fused gate/up kernel, the index
# on that kernel's axis 1 (None: the whole kernel).
_LORA_KERNELS = {
    "q_proj": ("attention", "q_kernel", None), "k_proj": ("attention", "k_kernel", None),
    "v_proj": ("attention", "v_kernel", None), "o_proj": ("attention", "o_kernel", None),
    "gate_proj": ("mlp", "gate_up", 0), "up_proj": ("mlp", "gate_up", 1),
    "down_proj": ("mlp", "down", None),
}


def lora_adapters(model: nnx.Module) -> dict[tuple[int, str], LoraAdapter]:
  """The adapters of a ``decoder.Decoder`` by (layer index, target), in layer then
  ``LORA_TARGETS`` order."""
  adapters = {}
  for i, layer in enumerate(model.layers):
    for target in LORA_TARGETS:
      module = getattr(layer, _LORA_KERNELS[target][0])
      adapter = getattr(module, f"{target}_lora")
      if adapter is not None:
        adapters[i, target] = adapter
  return adapters


@functools.partial(jax.jit, static_argnums=2)
def _merged_kernels(kernels: dict[str, jax.Array], factors: dict[str, tuple[jax.Array, jax.Array]],
                    scale: float) -> dict[str, jax.Array]:
  """The adapted kernels plus ``scale * a @ b``, computed in float32, in one compilation.

  ``kernels`` maps "layer/module/kernel" to the kernel, ``factors`` "layer/target" to (a, b).
  """
  merged = {name: kernel.astype(jnp.float32) for name, kernel in kernels.items()}
  for name, (a, b) in factors.items():
    layer, target = name.split("/")
    module, kernel_name, half = _LORA_KERNELS[target]
    key = f"{layer}/{module}/{kernel_name}"
    r = a.shape[-1]
    # Full precision: the merged model should match the adapted one, not a bf16 matmul of it.
    delta = scale * jnp.matmul(a.astype(jnp.float32).reshape(-1, r),
                               b.astype(jnp.float32).reshape(r, -1),
                               precision=jax.lax.Precision.HIGHEST)
    if half is None:
      merged[key] = merged[key] + delta.reshape(merged[key].shape)
    else:  # gate or up: one half of the fused [d, 2, f] kernel
      merged[key] = merged[key].at[:, half].add(delta)
  return {name: merged[name].astype(kernel.dtype) for name, kernel in kernels.items()}


def merge_lora(model: nnx.Module) -> nnx.Module:
  """A copy of ``model`` (a ``decoder.Decoder``) without adapters, each adapted kernel replaced
  by ``W + scale * a @ b``.

  The merged model computes the same logits (to float rounding) at the cost of the base model,
  and has the parameters of ``Decoder(config, lora=None)``; ``model`` is left as it is (so both
  are in memory for a moment).
  """
  if model.lora is None:
    raise ValueError("merge_lora: the model has no LoRA adapters (built without lora=)")
  merged = nnx.clone(model)
  adapters = lora_adapters(merged)
  kernels, factors = {}, {}
  for (i, target), adapter in adapters.items():
    module, kernel_name, _ = _LORA_KERNELS[target]
    kernels[f"{i}/{module}/{kernel_name}"] = getattr(getattr(merged.layers[i], module),
                                                     kernel_name)[...]
    factors[f"{i}/{target}"] = (adapter.a[...], adapter.b[...])
  for name, value in _merged_kernels(kernels, factors, model.lora.scale).items():
    i, module, kernel_name = name.split("/")
    getattr(getattr(merged.layers[int(i)], module), kernel_name).set_value(value)
  for i, target in adapters:
    setattr(getattr(merged.layers[i], _LORA_KERNELS[target][0]), f"{target}_lora", None)
  merged.lora = None
  return merged
