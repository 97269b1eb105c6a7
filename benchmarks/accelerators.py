"""Peak matrix throughput of the device a benchmark runs on, for model FLOPs utilisation (MFU).

``peak_flops(device, dtype)`` looks the device up by ``device_kind`` in a table of published
dense (no sparsity) peaks; for a CPU, or a device the table lacks, it measures one: the best of
a few large matmuls in ``dtype`` (what XLA reaches on this machine, an upper bound in practice
rather than a datasheet figure). ``mfu(flops_per_step, seconds_per_step, peak)`` is their ratio.
``peak_memory_bytes(device)`` is the device's allocator high-water mark where the backend keeps
one (GPU, TPU), else None.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Dense peaks in FLOP/s (vendor datasheets): bfloat16 and float32 (TF32 tensor cores on GPU).
# device_kind substrings, most specific first: "H100 PCIe" before "H100".
PEAKS: tuple[tuple[str, str, float, float], ...] = (
    # (device_kind substring, name, bfloat16, float32)
    ("H100 PCIe", "NVIDIA H100 PCIe", 756e12, 378e12),
    ("H100 NVL", "NVIDIA H100 NVL", 835e12, 418e12),
    ("H100", "NVIDIA H100 SXM", 989e12, 495e12),
    ("H200", "NVIDIA H200 SXM", 989e12, 495e12),
    ("A100", "NVIDIA A100", 312e12, 156e12),
    ("TPU v4", "TPU v4", 275e12, 275e12 / 2),
    ("TPU v5 lite", "TPU v5e", 197e12, 197e12 / 2),
    ("TPU v5e", "TPU v5e", 197e12, 197e12 / 2),
    ("TPU v5p", "TPU v5p", 459e12, 459e12 / 2),
    ("TPU v5", "TPU v5p", 459e12, 459e12 / 2),
    ("TPU v6 lite", "TPU v6e", 918e12, 918e12 / 2),
)


@dataclasses.dataclass(frozen=True)
class Peak:
  name: str           # the device as the table (or "measured") names it
  flops: float        # FLOP/s
  source: str         # "datasheet" or "measured (N x N matmul)"


def _table(device_kind: str, dtype: Any) -> Peak | None:
  bf16 = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  for key, name, peak_bf16, peak_f32 in PEAKS:
    if key.lower() in device_kind.lower():
      return Peak(name, peak_bf16 if bf16 else peak_f32, "datasheet")
  return None


def measure_matmul_peak(device: Any = None, dtype: Any = jnp.float32, size: int = 2048,
                        repeats: int = 5) -> float:
  """FLOP/s of the best of ``repeats`` ``size`` x ``size`` matmuls on ``device`` (compiled once,
  warmed up)."""
  device = device or jax.devices()[0]
  a = jax.device_put(jnp.asarray(np.random.default_rng(0).standard_normal((size, size)),
                                 dtype), device)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * size ** 3 / best


def peak_flops(device: Any = None, dtype: Any = jnp.bfloat16) -> Peak:
  """The device's dense peak for ``dtype``: the datasheet table, else measured."""
  device = device or jax.devices()[0]
  found = _table(getattr(device, "device_kind", ""), dtype)
  if found is not None:
    return found
  size = 2048 if device.platform == "cpu" else 8192
  return Peak(f"{device.platform} ({device.device_kind})",
              measure_matmul_peak(device, dtype, size), f"measured ({size} x {size} matmul)")


def mfu(flops_per_step: float, seconds_per_step: float, peak: Peak) -> float:
  """Model FLOPs utilisation: achieved model FLOP/s over the peak."""
  return flops_per_step / seconds_per_step / peak.flops


def peak_memory_bytes(device: Any = None) -> int | None:
  """The device allocator's high-water mark (GPU/TPU), None where the backend keeps none."""
  device = device or jax.devices()[0]
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001 - backends without stats raise various errors
    return None
  return None if not stats else stats.get("peak_bytes_in_use")
