r"""Slide-encoder time and memory over N patches: the chunked Q-Former against unchunked peers.

  python -m benchmarks.slide_encoder [--sizes 1000,10000,100000] [--repeats 5]
                                     [--large_repeats 3] [--skip torch,unchunked] [--threads N]
                                     [--json PATH]
  python -m benchmarks.slide_encoder --sizes '' --train_throughput [--steps 50]
                                     [--features_dir runs/demo/features]

**Slide encoder.** The slide Q-Former's query branch over all N patches of one slide, i.e. what
``PathFlip.encode_slides`` computes for the slide token,
``qformer.encode_patches(qformer.project_features(features_1nd), valid_1n)``, with the paper's
sizes (``configs/pathflip_paper.py``: width 768, 12 layers, 12 heads, cross-attention into the
patches in every 2nd layer, 8 queries, ``kv_chunk`` 2048) in float32 on the CPU, for one slide of
N random D=512 features. Three implementations, each (implementation, N) in a fresh subprocess:

* ``jax``        - this project's model (``align.model_config`` of the paper config; random
                   weights drawn with numpy as its initialisers would, which is faster than nnx's
                   own initialisation): cross-attention over chunks of 2048 keys with a running
                   softmax (a ``lax.scan``; the worker checks that the lowered program holds the
                   loop exactly when N > 2048; N is padded up to a multiple of 2048);
* ``unchunked``  - the same model with ``kv_chunk`` >= N (``dataclasses.replace``): one
                   softmax over all N keys per layer. Against ``jax`` it isolates what chunking
                   buys;
* ``torch``      - a plain PyTorch reference of the same computation as one would usually write
                   it (BLIP-2's Q-Former style: feature projection + LayerNorm, learned queries,
                   per layer self-attention over the queries, cross-attention as an explicit
                   softmax(QK^T)V over all N keys at once, query MLP; random weights), under
                   ``torch.inference_mode()`` with ``torch.set_num_threads(--threads)``.

Per row: ``compile s`` (JAX: tracing + XLA compilation, ahead of time; torch has none),
``forward s`` (median of ``--repeats`` calls after a warm-up call; ``--large_repeats`` for
N >= 50,000), ``peak RSS delta`` (the child's peak resident memory,
``getrusage(RUSAGE_SELF).ru_maxrss``, after the calls, minus its RSS right before the first call:
parameters, the input features and the imported libraries are in that baseline; for JAX the
compilation happened before it and its own peak is cleared by resetting the kernel's high-water
mark, ``/proc/self/clear_refs``) and ``XLA temp`` (``compiled.memory_analysis()``: the scratch
buffers XLA planned for the program, exact, unlike RSS). ``time vs torch`` and ``memory vs
torch`` divide a row's forward time and RSS delta by the torch row's at the same N (below 1:
faster, smaller). Below the table, the memory growth from the second-largest to the largest N per
implementation: memory that grows linearly in N grows by the ratio of the Ns (10x for 10k ->
100k). The attention here is 8 queries over N keys, so every variant is linear in N; what the
chunks change is the constant. Unchunked, XLA keeps the keys and values of all 6 cross-attention
layers alive together (they depend only on the patches, not on the queries): its temp is about
2 x 6 arrays of N x 768 floats, where eager PyTorch frees each layer's before the next and the
chunked scan holds one chunk's. At N <= 2048 ``jax`` runs unchunked (one chunk), so growth from
a size below 2048 to one above mixes the two. At small N the RSS deltas are allocator noise (a few
MiB); read XLA temp there.

**Training throughput** (``--train_throughput``): the demo config (``configs/pathflip_demo.py``,
``features_dir=--features_dir``) trained as ``pathflip_jax/train.py`` does (``AlignTask``,
``create_train_state``, ``make_train_step``, ``optim.make_optimizer``, the mesh of all devices)
on real batches from ``input_pipeline.train_iterator`` (``worker_count=0``: batches are drawn in
the timed loop, as a single-process run of the trainer would). After 2 warm-up steps,
``--steps`` steps are timed in 5 windows; steps/s and slides/s are medians over the windows,
``input ms`` is the median time per step spent drawing and placing the batch. No PyTorch peer for
this part (there is no reference PathFLIP training loop in PyTorch to run on the same data).

**Whole slide on an accelerator** (``--whole_slide``; JAX's default device, not forced to the
CPU):

  python -m benchmarks.slide_encoder --sizes '' --whole_slide [--whole_slide_sizes 100000,1000000]
                                     [--whole_slide_dtype bfloat16]

The same slide Q-Former (``kv_chunk`` 2048) over all patches of a 20x slide (100,000) and of a
40x one (1,000,000) in one forward pass, compute in ``--whole_slide_dtype`` (the paper config's
bfloat16), parameters and features float32. Columns: ``GFLOP`` analytic (:func:`qformer_flops`,
matmuls only, 2·m·n·k each), ``XLA GFLOP`` ``compiled.cost_analysis()["flops"]`` (XLA counts a
``lax.scan`` body once, not once per chunk, so it is far below the analytic count for a chunked
program), ``XLA temp MiB`` the scratch memory XLA planned (``compiled.memory_analysis()``),
``forward s`` the median of ``--large_repeats`` forwards after a warm-up, ``peak device MiB``
the allocator's high-water mark after the size's calls (``accelerators.peak_memory_bytes``;
sizes run in increasing order, so it is the largest size's own peak: parameters, features and
the forward together) and ``MFU`` analytic FLOP/s over ``accelerators.peak_flops``. On a CPU the
programs are compiled from abstract shapes only and the rows say "not timed on cpu" (the
timed 100k CPU row is the table above).

**Backward pass beside the PyTorch reference** (``--backward``; float32 on the CPU):

  python -m benchmarks.slide_encoder --sizes '' --backward [--backward_sizes 4096,16384]

What an align step differentiates: loss = the sum of the slide Q-Former's query outputs over N
patches, its gradient with respect to every parameter the query branch reads. ``jax``:
``jax.jit(jax.value_and_grad(...))`` of this project's model (chunked cross-attention, the
chunk body rematerialised); ``torch``: the PyTorch reference above, ``loss.backward()`` after
``zero_grad``. Both in one process with ``--threads`` threads, timed alternately repeat after
repeat after a warm-up (JAX's compilation is the ``compile s`` column); ``step s`` are medians of
``--repeats`` and ``JAX / torch`` their ratio (below 1: JAX is faster). Random weights on both
sides, not the same ones: the columns compare time, not values.

This machine is shared and noisy: compare ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.metadata
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

from benchmarks.patch_encoder import _pin_threads

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_CONFIG = os.path.join(REPO, "configs", "pathflip_paper.py")
DEMO_CONFIG = os.path.join(REPO, "configs", "pathflip_demo.py")
FEATURE_DIM = 512         # CONCH v1 features, as the paper
IMPLS = ("torch", "unchunked", "jax")
LARGE_N = 50_000          # from here on, --large_repeats (one 100k forward takes tens of seconds)
_RESULT = "SLIDE_ENCODER_RESULT "
TEXT_BRANCH = {"text_embed", "text_mlp", "text_mlp_norm"}  # QFormer attributes


# --------------------------------------------------------------------------- memory


def _rss_mib() -> float:
  """Current resident memory of this process (Linux)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  raise RuntimeError("no VmRSS in /proc/self/status")


def _peak_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _reset_peak() -> bool:
  """Resets the peak RSS to the current RSS (Linux >= 4.0), so that an earlier peak (XLA's
  compilation) does not mask the forward's; False where the kernel does not allow it."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
  except OSError:
    return False
  return _peak_mib() <= _rss_mib() + 1


# --------------------------------------------------------------------------- workers


def _paper_model_config(impl: str, n: int):
  """The paper config's PathFlipConfig (through ``align.model_config``), unchunked if asked."""
  from pathflip_jax import config_args  # noqa: PLC0415
  from pathflip_jax.tasks import align  # noqa: PLC0415
  config = config_args.load_config(PAPER_CONFIG)
  model_config = align.model_config(config, config.vocab_size, 0, FEATURE_DIM)
  if impl == "unchunked":
    # MultiHeadAttention.chunked runs the plain softmax whenever the keys fit in one chunk.
    qformer_config = dataclasses.replace(model_config.qformer,
                                         kv_chunk=max(n, model_config.qformer.kv_chunk))
    model_config = dataclasses.replace(model_config, qformer=qformer_config)
  return model_config


def _random_weights(abstract_state: Any, seed: int = 0) -> Any:
  """Concrete weights for an abstract ``nnx.State``, distributed as the model's initialisers:
  LayerNorm scales 1, biases 0, every other array normal(0, 0.02); zeros for the text branch's
  weights, which the query branch never reads (drawing them would double the set-up time)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    names = [getattr(k, "key", None) for k in path if hasattr(k, "key")]
    name = names[-1]
    if TEXT_BRANCH & set(names) or str(name).endswith("bias"):
      value = np.zeros(leaf.shape, leaf.dtype)
    elif name == "scale":
      value = np.ones(leaf.shape, leaf.dtype)
    else:
      value = (rng.standard_normal(leaf.shape, np.float32) * 0.02).astype(leaf.dtype)
    return jnp.asarray(value)

  return jax.tree_util.tree_map_with_path(fill, abstract_state)


def _time_calls(run, repeats: int) -> tuple[float, list[float], Any]:
  """(first call s, repeat s, last output): a warm-up call, then ``repeats`` timed calls."""
  start = time.perf_counter()
  out = run()
  first = time.perf_counter() - start
  seconds = []
  for r in range(repeats):
    start = time.perf_counter()
    out = run()
    seconds.append(time.perf_counter() - start)
    print(f"  repeat {r + 1}/{repeats}: {seconds[-1]:.2f} s", file=sys.stderr, flush=True)
  return first, seconds, out


def jax_worker(impl: str, n: int, repeats: int) -> dict[str, Any]:
  import jax  # noqa: PLC0415 - after _pin_threads
  import jax.numpy as jnp  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from pathflip_jax.models import pathflip  # noqa: PLC0415

  model_config = _paper_model_config(impl, n)
  chunk = model_config.qformer.kv_chunk
  # The model's structure (traced without memory) with weights drawn by numpy: nnx's own
  # initialisation of 180 M parameters took 30-60 s per worker on a 2-core machine.
  graphdef, abstract = nnx.split(nnx.eval_shape(
      lambda: pathflip.PathFlip(model_config, rngs=nnx.Rngs(0), dtype=jnp.float32).qformer))
  state = _random_weights(abstract)

  def encode(state, features_bnf, valid_bn):
    qformer = nnx.merge(graphdef, state)
    return qformer.encode_patches(qformer.project_features(features_bnf), valid_bn)

  # Inputs made on the device directly: no host copy of N x 512 floats left in the baseline.
  features = jax.random.normal(jax.random.key(1), (1, n, FEATURE_DIM), jnp.float32)
  valid = jnp.ones((1, n), bool)
  features.block_until_ready()

  start = time.perf_counter()
  lowered = jax.jit(encode).lower(state, features, valid)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  scan = "stablehlo.while" in lowered.as_text()
  if scan != (n > chunk):
    raise AssertionError(f"{impl} at N={n}, kv_chunk={chunk}: the lowered program "
                         f"{'has' if scan else 'has no'} scan loop")
  temp_mib = None
  try:
    analysis = compiled.memory_analysis()
    if analysis is not None:
      temp_mib = analysis.temp_size_in_bytes / 2**20
  except (AttributeError, NotImplementedError, RuntimeError):
    pass  # not every backend/version reports it
  del lowered

  def run():
    return compiled(state, features, valid).block_until_ready()

  gc.collect()
  peak_reset = _reset_peak()
  baseline = _rss_mib()
  first_s, seconds, output = _time_calls(run, repeats)
  peak = _peak_mib()
  output = np.asarray(output, np.float32)
  return dict(compile_s=compile_s, first_s=first_s, seconds=seconds, baseline_mib=baseline,
              peak_mib=peak, rss_delta_mib=peak - baseline, peak_reset=peak_reset,
              xla_temp_mib=temp_mib, kv_chunk=chunk, chunks=math.ceil(n / chunk) if scan else 1,
              output=output.ravel().tolist())


def _torch_model(width: int, depth: int, heads: int, mlp_ratio: float, queries: int,
                 cross_every: int, feature_dim: int, eps: float):
  """A plain PyTorch slide Q-Former (query branch only), pre-norm as ours."""
  import torch  # noqa: PLC0415
  from torch import nn  # noqa: PLC0415

  class Attention(nn.Module):

    def __init__(self):
      super().__init__()
      self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x_bqd, kv_bnd, valid_bn=None):
      b, q, _ = x_bqd.shape
      n, c = kv_bnd.shape[1], width // heads
      query = self.q(x_bqd).view(b, q, heads, c).transpose(1, 2)
      key = self.k(kv_bnd).view(b, n, heads, c).transpose(1, 2)
      value = self.v(kv_bnd).view(b, n, heads, c).transpose(1, 2)
      scores = query @ key.transpose(-1, -2) * c ** -0.5          # [b, h, q, n]
      if valid_bn is not None:
        scores = scores.masked_fill(~valid_bn[:, None, None, :], float("-inf"))
      attended = scores.softmax(-1) @ value
      return self.o(attended.transpose(1, 2).reshape(b, q, width))

  class Layer(nn.Module):

    def __init__(self, cross: bool):
      super().__init__()
      hidden = int(width * mlp_ratio)
      self.self_norm = nn.LayerNorm(width, eps=eps)
      self.self_attention = Attention()
      self.cross_norm = nn.LayerNorm(width, eps=eps) if cross else None
      self.cross_attention = Attention() if cross else None
      self.mlp_norm = nn.LayerNorm(width, eps=eps)
      self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x, patches, valid):
      y = self.self_norm(x)
      x = x + self.self_attention(y, y)
      if self.cross_attention is not None:
        x = x + self.cross_attention(self.cross_norm(x), patches, valid)
      return x + self.mlp(self.mlp_norm(x))

  class SlideQFormer(nn.Module):

    def __init__(self):
      super().__init__()
      self.feature_proj = nn.Linear(feature_dim, width)
      self.feature_norm = nn.LayerNorm(width, eps=eps)
      self.queries = nn.Parameter(torch.randn(queries, width) * 0.02)
      self.layers = nn.ModuleList([Layer(i % cross_every == 0) for i in range(depth)])
      self.norm = nn.LayerNorm(width, eps=eps)

    def forward(self, features_bnf, valid_bn):
      patches = self.feature_norm(self.feature_proj(features_bnf))
      x = self.queries.expand(features_bnf.shape[0], -1, -1)
      for layer in self.layers:
        x = layer(x, patches, valid_bn)
      return self.norm(x)

  return SlideQFormer()


def torch_worker(n: int, repeats: int, threads: int) -> dict[str, Any]:
  import torch  # noqa: PLC0415
  torch.set_num_threads(threads)
  q = _paper_model_config("torch", n).qformer
  torch.manual_seed(0)
  model = _torch_model(q.width, q.depth, q.num_heads, q.mlp_ratio, q.num_queries,
                       q.cross_attention_every, q.feature_dim, q.norm_eps).eval()
  features = torch.randn(1, n, FEATURE_DIM)
  valid = torch.ones(1, n, dtype=torch.bool)

  def run():
    with torch.inference_mode():
      return model(features, valid)

  gc.collect()
  peak_reset = _reset_peak()
  baseline = _rss_mib()
  first_s, seconds, _ = _time_calls(run, repeats)
  peak = _peak_mib()
  return dict(compile_s=None, first_s=first_s, seconds=seconds, baseline_mib=baseline,
              peak_mib=peak, rss_delta_mib=peak - baseline, peak_reset=peak_reset,
              xla_temp_mib=None, kv_chunk=None, chunks=1, output=None)


def worker_main(args: argparse.Namespace) -> None:
  _pin_threads(args.threads)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  print(f"[{args.worker} N={args.n}]", file=sys.stderr, flush=True)
  if args.worker == "torch":
    result = torch_worker(args.n, args.repeats, args.threads)
  else:
    result = jax_worker(args.worker, args.n, args.repeats)
  print(_RESULT + json.dumps(result), flush=True)


# --------------------------------------------------------------------------- slide encoder


def _repeats(args: argparse.Namespace, n: int) -> int:
  return args.repeats if n < LARGE_N else min(args.repeats, args.large_repeats)


def run_worker(impl: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
  """One (implementation, N) in a fresh interpreter: its peak memory is its own."""
  command = [sys.executable, "-m", "benchmarks.slide_encoder", "--worker", impl, "--n", str(n),
             "--repeats", str(_repeats(args, n)), "--threads", str(args.threads)]
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  start = time.perf_counter()
  done = subprocess.run(command, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True,
                        check=False)
  wall = time.perf_counter() - start
  lines = [x for x in done.stdout.splitlines() if x.startswith(_RESULT)]
  if done.returncode or not lines:
    # E.g. killed for memory (-9): the row says so and the other rows still run.
    return dict(impl=impl, n=n, error=f"worker exited with {done.returncode}", wall_s=wall)
  result = json.loads(lines[-1][len(_RESULT):])
  result.update(impl=impl, n=n, wall_s=wall, forward_s=statistics.median(result["seconds"]))
  return result


def slide_encoder_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
  sizes = [int(s) for s in args.sizes.split(",") if s]
  skip = {s for s in args.skip.split(",") if s}
  unknown = skip - set(IMPLS)
  if unknown:
    raise ValueError(f"--skip: unknown {sorted(unknown)}; choose from {IMPLS}")
  impls = [i for i in IMPLS if i not in skip]
  rows = []
  for n in sizes:
    by_impl = {}
    for impl in impls:
      row = run_worker(impl, n, args)
      by_impl[impl] = row
      rows.append(row)
    peer = by_impl.get("torch")
    for row in by_impl.values():
      ok = "error" not in row and peer is not None and "error" not in peer
      row["time_ratio"] = row["forward_s"] / peer["forward_s"] if ok else None
      row["memory_ratio"] = (row["rss_delta_mib"] / peer["rss_delta_mib"]
                             if ok and peer["rss_delta_mib"] > 0 else None)
    if "jax" in by_impl and "unchunked" in by_impl and not any(
        "error" in by_impl[i] for i in ("jax", "unchunked")):
      ours, theirs = (np.asarray(by_impl[i]["output"]) for i in ("jax", "unchunked"))
      by_impl["jax"]["rel_difference_vs_unchunked"] = float(
          np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))
  return rows


def _label(row: dict[str, Any]) -> str:
  if row["impl"] == "torch":
    return "PyTorch reference (unchunked)"
  if row["impl"] == "unchunked":
    return "pathflip_jax, unchunked"
  chunks = row.get("chunks")
  detail = f", {chunks} chunks" if chunks and chunks > 1 else ", 1 chunk: no scan"
  return f"pathflip_jax, kv_chunk {row.get('kv_chunk', '?')}{detail}"


def _num(value: float | None, fmt: str) -> str:
  return "-" if value is None else format(value, fmt)


def print_slide_table(rows: list[dict[str, Any]]) -> None:
  print("| N | impl | compile s | forward s (median) | peak RSS delta MiB | XLA temp MiB | "
        "time vs torch | memory vs torch |")
  print("|---:|---|---:|---:|---:|---:|---:|---:|")
  for row in rows:
    if "error" in row:
      print(f"| {row['n']:,} | {row['impl']} | {row['error']} | | | | | |")
      continue
    print(f"| {row['n']:,} | {_label(row)} | {_num(row['compile_s'], '.1f')} | "
          f"{row['forward_s']:.3f} | {row['rss_delta_mib']:,.0f} | "
          f"{_num(row['xla_temp_mib'], ',.0f')} | {_num(row['time_ratio'], '.2f')} | "
          f"{_num(row['memory_ratio'], '.2f')} |")
  if any(not row.get("peak_reset", True) for row in rows if "error" not in row):
    print("(peak RSS could not be reset in some workers: their deltas include JAX compilation)")
  for row in rows:
    if "rel_difference_vs_unchunked" in row:
      print(f"N={row['n']:,}: chunked vs unchunked outputs differ by "
            f"{row['rel_difference_vs_unchunked']:.1e} (relative L2)")
  sizes = sorted({row["n"] for row in rows})
  if len(sizes) >= 2:
    small, large = sizes[-2], sizes[-1]
    print(f"\nMemory growth N={large:,} / N={small:,} (N grows {large / small:.1f}x; linear "
          "memory grows as much):")
    for impl in IMPLS:
      pair = {row["n"]: row for row in rows if row["impl"] == impl and "error" not in row}
      if small not in pair or large not in pair:
        continue
      a, b = pair[small], pair[large]
      rss = (f"{b['rss_delta_mib'] / a['rss_delta_mib']:.1f}x" if a["rss_delta_mib"] > 0
             else "-")
      temp = (f", XLA temp {b['xla_temp_mib'] / a['xla_temp_mib']:.1f}x"
              if a.get("xla_temp_mib") and b.get("xla_temp_mib") else "")
      print(f"  {impl}: peak RSS delta {rss}{temp}")


# --------------------------------------------------------------------------- whole slide


def qformer_flops(q: Any, n: int) -> float:
  """Analytic forward FLOPs of the slide Q-Former's query branch (a ``QFormerConfig``) over
  ``n`` patches of one slide, 2·m·n·k per matmul. With F feature width, D width, H MLP width,
  Q queries:

    feature projection   2·N·F·D
    every layer          self-attention over the queries: 2·Q·D·3D q,k,v + 2·Q·D·D output
                         + 2·2·Q·Q·D scores and values; query MLP 2·Q·D·H·2
    cross-attention      2·Q·D·D q + 2·N·D·D·2 k,v + 2·2·Q·N·D scores and values
      layers             + 2·Q·D·D output

  The chunked program also projects the padding up to a multiple of ``kv_chunk`` (not counted:
  model FLOPs). Norms, softmax and GELU are left out.
  """
  d, h, queries = q.width, int(q.width * q.mlp_ratio), q.num_queries
  cross_layers = sum(q.has_cross_attention(i) for i in range(q.depth))
  per_layer = 2 * queries * d * 4 * d + 4 * queries * queries * d + 4 * queries * d * h
  cross = 2 * queries * d * d * 2 + 4 * n * d * d + 4 * queries * n * d
  return float(2 * n * q.feature_dim * d + q.depth * per_layer + cross_layers * cross)


def compile_slide_encoder(n: int, dtype: Any, abstract: bool = True
                          ) -> tuple[Any, Any, Any, Any, Any]:
  """(compiled, weights, features, valid, QFormerConfig): the paper-size slide Q-Former's query
  branch over one slide of ``n`` patches (``kv_chunk`` 2048), compute in ``dtype``.

  ``abstract``: weights and inputs are ``jax.ShapeDtypeStruct`` (nothing allocated); otherwise
  random weights (``_random_weights``) and features made on the default device.
  """
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from pathflip_jax.models import pathflip  # noqa: PLC0415

  model_config = _paper_model_config("jax", n)
  graphdef, state = nnx.split(nnx.eval_shape(
      lambda: pathflip.PathFlip(model_config, rngs=nnx.Rngs(0), dtype=dtype).qformer))
  if abstract:
    features = jax.ShapeDtypeStruct((1, n, FEATURE_DIM), jnp.float32)
    valid = jax.ShapeDtypeStruct((1, n), jnp.bool_)
  else:
    state = _random_weights(state)
    features = jax.random.normal(jax.random.key(1), (1, n, FEATURE_DIM), jnp.float32)
    valid = jnp.ones((1, n), bool)

  def encode(state, features_bnf, valid_bn):
    qformer = nnx.merge(graphdef, state)
    return qformer.encode_patches(qformer.project_features(features_bnf), valid_bn)

  compiled = jax.jit(encode).lower(state, features, valid).compile()
  return compiled, state, features, valid, model_config.qformer


def whole_slide_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
  """One row per N: analytic and XLA FLOPs, XLA temp, and off the CPU time, peak memory, MFU."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from benchmarks import accelerators  # noqa: PLC0415

  device = jax.devices()[0]
  timed = device.platform != "cpu"
  dtype = jnp.dtype(args.whole_slide_dtype)
  peak = accelerators.peak_flops(device, dtype) if timed else None
  return [_whole_slide_row(n, dtype, args.large_repeats, device, peak)
          for n in sorted(int(x) for x in args.whole_slide_sizes.split(",") if x)]


def _whole_slide_row(n: int, dtype: Any, repeats: int, device: Any, peak: Any
                     ) -> dict[str, Any]:
  # A function per size: its weights and features are freed before the next size's.
  from benchmarks import accelerators  # noqa: PLC0415
  from benchmarks.patch_encoder import xla_flops, xla_temp_bytes  # noqa: PLC0415

  timed = peak is not None
  start = time.perf_counter()
  compiled, state, features, valid, q = compile_slide_encoder(n, dtype, abstract=not timed)
  compile_s = time.perf_counter() - start
  flops = qformer_flops(q, n)
  row = dict(n=n, dtype=dtype.name, flops=flops, xla_flops=xla_flops(compiled),
             xla_temp_bytes=xla_temp_bytes(compiled), compile_s=compile_s,
             chunks=math.ceil(n / q.kv_chunk), forward_s=None, peak_bytes=None, mfu=None,
             device=device.device_kind, peak=None if peak is None else peak.name)
  if timed:
    _, seconds, _ = _time_calls(
        lambda: compiled(state, features, valid).block_until_ready(), repeats)
    forward_s = statistics.median(seconds)
    row.update(forward_s=forward_s, seconds=seconds,
               peak_bytes=accelerators.peak_memory_bytes(device),
               mfu=accelerators.mfu(flops, forward_s, peak))
  print(f"[whole slide N={n:,}] compiled in {compile_s:.1f} s", file=sys.stderr, flush=True)
  return row


def print_whole_slide_table(rows: list[dict[str, Any]]) -> None:
  print("| N | dtype | chunks | GFLOP | XLA GFLOP | XLA temp MiB | compile s | forward s | "
        "peak device MiB | MFU |")
  print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
  for row in rows:
    xla = "-" if row["xla_flops"] is None else f"{row['xla_flops'] / 1e9:,.1f}"
    temp = "-" if row["xla_temp_bytes"] is None else f"{row['xla_temp_bytes'] / 2**20:,.0f}"
    forward = ("not timed on cpu" if row["forward_s"] is None else f"{row['forward_s']:.3f}")
    peak = "-" if row["peak_bytes"] is None else f"{row['peak_bytes'] / 2**20:,.0f}"
    mfu = "-" if row["mfu"] is None else f"{row['mfu']:.1%}"
    print(f"| {row['n']:,} | {row['dtype']} | {row['chunks']} | {row['flops'] / 1e9:,.1f} | "
          f"{xla} | {temp} | {row['compile_s']:.1f} | {forward} | {peak} | {mfu} |")
  if rows and rows[0]["peak"]:
    print(f"(MFU against {rows[0]['peak']}; {rows[0]['device']})")


# --------------------------------------------------------------------------- backward


def backward_rows(sizes: list[int], repeats: int, threads: int) -> list[dict[str, Any]]:
  """Forward + backward of the slide Q-Former's query branch (loss = sum of its outputs) in
  JAX (``value_and_grad`` of this project's model) and in the PyTorch reference, float32, on
  the CPU; one row per (N, framework) with median step seconds and the JAX / torch ratio."""
  import torch  # noqa: PLC0415 - after _pin_threads

  torch.set_num_threads(threads)
  return [row for n in sizes for row in _backward_pair(n, repeats)]


def _backward_pair(n: int, repeats: int) -> list[dict[str, Any]]:
  # A function per N: its models and inputs are freed before the next N's.
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import torch  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from benchmarks.patch_encoder import _time  # noqa: PLC0415
  from pathflip_jax.models import pathflip  # noqa: PLC0415

  model_config = _paper_model_config("jax", n)
  q = model_config.qformer
  # The text branch is split off: the query branch never reads it, and its gradient (zeros,
  # 25 M of them for the 32k vocabulary) is not part of the computation.
  text = nnx.Any(*(nnx.PathContains(name) for name in sorted(TEXT_BRANCH)))
  graphdef, frozen, params = nnx.split(nnx.eval_shape(
      lambda: pathflip.PathFlip(model_config, rngs=nnx.Rngs(0), dtype=jnp.float32).qformer),
      text, ...)
  frozen, params = _random_weights(frozen), _random_weights(params)
  features = jax.random.normal(jax.random.key(1), (1, n, FEATURE_DIM), jnp.float32)
  valid = jnp.ones((1, n), bool)

  def loss_fn(params, frozen, features_bnf, valid_bn):
    qformer = nnx.merge(graphdef, frozen, params)
    return qformer.encode_patches(qformer.project_features(features_bnf), valid_bn).sum()

  start = time.perf_counter()
  step = jax.jit(jax.value_and_grad(loss_fn)).lower(params, frozen, features, valid).compile()
  compile_s = time.perf_counter() - start

  def run_jax():
    return jax.block_until_ready(step(params, frozen, features, valid))

  torch.manual_seed(0)
  reference = _torch_model(q.width, q.depth, q.num_heads, q.mlp_ratio, q.num_queries,
                           q.cross_attention_every, q.feature_dim, q.norm_eps)
  features_torch = torch.randn(1, n, FEATURE_DIM)
  valid_torch = torch.ones(1, n, dtype=torch.bool)

  def run_torch():
    reference.zero_grad(set_to_none=True)
    loss = reference(features_torch, valid_torch).sum()
    loss.backward()
    return loss

  run_jax(), run_torch()   # warm-up
  seconds = {"jax": [], "torch": []}
  for r in range(repeats):
    order = (("jax", run_jax), ("torch", run_torch))
    for framework, fn in (order if r % 2 == 0 else order[::-1]):
      seconds[framework].append(_time(fn))
    print(f"[backward N={n:,}] repeat {r + 1}/{repeats}: jax {seconds['jax'][-1]:.2f} s, "
          f"torch {seconds['torch'][-1]:.2f} s", file=sys.stderr, flush=True)
  torch_s = statistics.median(seconds["torch"])
  rows = []
  for framework in ("jax", "torch"):
    median = statistics.median(seconds[framework])
    rows.append(dict(n=n, framework=framework, step_s=median, seconds=seconds[framework],
                     compile_s=compile_s if framework == "jax" else None,
                     ratio=median / torch_s,
                     gflop=3 * qformer_flops(q, n) / 1e9))
  return rows


def print_backward_table(rows: list[dict[str, Any]]) -> None:
  print("| N | framework | compile s | step s (median) | JAX / torch | ~GFLOP (3x forward) |")
  print("|---:|---|---:|---:|---:|---:|")
  for row in rows:
    name = ("pathflip_jax value_and_grad (kv_chunk 2048)" if row["framework"] == "jax"
            else "PyTorch reference, loss.backward()")
    print(f"| {row['n']:,} | {name} | {_num(row['compile_s'], '.1f')} | {row['step_s']:.2f} | "
          f"{row['ratio']:.2f} | {row['gflop']:,.0f} |")


# --------------------------------------------------------------------------- training


def train_throughput(args: argparse.Namespace) -> dict[str, Any]:
  """Steps/s and slides/s of the demo config's train step on real batches."""
  import jax  # noqa: PLC0415 - after _pin_threads
  from flax import nnx  # noqa: PLC0415

  from pathflip_jax import config_args, input_pipeline, optim, sharding, train  # noqa: PLC0415
  from pathflip_jax.tasks import align  # noqa: PLC0415

  config = config_args.load_config(f"{DEMO_CONFIG}:features_dir={args.features_dir}")
  mesh = sharding.make_mesh(**dict(config.mesh))
  input_pipeline.check_batch_divides_mesh(config.batch_size, mesh)
  with tempfile.TemporaryDirectory(prefix="bench_train_") as workdir:
    task = align.AlignTask(config, workdir)   # trains the demo tokenizer into workdir
    task.mesh = mesh
    batches = input_pipeline.train_iterator(
        task.train_source(), global_batch_size=config.batch_size, seed=0,
        transform=task.train_transform(), batch_fn=task.collate, worker_count=0)
    tx, schedule = optim.make_optimizer(config.optim, config.total_steps)
    graphdef, state, shardings = train.create_train_state(
        lambda: task.create_model(nnx.Rngs(config.seed)), tx, mesh)
    step_fn = jax.jit(train.make_train_step(graphdef, task.loss, tx, schedule, seed=config.seed),
                      donate_argnums=(0,), out_shardings=(shardings, None))

    def step(state):
      start = time.perf_counter()
      batch = input_pipeline.to_global(next(batches), mesh)
      drawn = time.perf_counter()
      state, metrics = step_fn(state, batch)
      # As the trainer: the metrics are fetched every step (which also waits for the step).
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      if not math.isfinite(metrics["loss"]):
        raise FloatingPointError(f"non-finite loss {metrics['loss']}")
      return state, drawn - start, time.perf_counter() - start, batch["features"].shape

    warmup = []
    for _ in range(2):   # the first compiles
      state, _, seconds, shape = step(state)
      warmup.append(seconds)
    shapes = {shape}
    windows = _windows(args.steps)
    window_s, input_s, recompiled = [], [], 0
    for size in windows:
      total = 0.0
      for _ in range(size):
        state, drawn, seconds, shape = step(state)
        recompiled += shape not in shapes  # a new padded length compiles inside the timing
        shapes.add(shape)
        total += seconds
        input_s.append(drawn)
      window_s.append(total)
      print(f"[train] window of {size} steps: {size / total:.2f} steps/s", file=sys.stderr,
            flush=True)
    if recompiled:
      print(f"[train] note: {recompiled} timed steps had a new batch shape (compiled in the "
            f"timing); shapes {sorted(shapes)}", file=sys.stderr)
  rates = [size / s for size, s in zip(windows, window_s)]
  steps_per_s = statistics.median(rates)
  return dict(config=f"pathflip_demo (features_dir={args.features_dir})",
              batch_size=config.batch_size, steps=args.steps, first_step_s=warmup[0],
              steps_per_s=steps_per_s, slides_per_s=steps_per_s * config.batch_size,
              input_ms=1000 * statistics.median(input_s), window_rates=rates,
              batch_shapes=sorted(str(s) for s in shapes), recompiled_steps=recompiled,
              devices=len(jax.devices()))


def _windows(steps: int, count: int = 5) -> list[int]:
  """``steps`` split into up to ``count`` windows of near-equal size."""
  count = max(1, min(count, steps))
  return [steps // count + (i < steps % count) for i in range(count)]


def print_train_table(row: dict[str, Any]) -> None:
  print(f"\n# training throughput: {row['config']}, batch {row['batch_size']} slides, "
        f"{row['devices']} device(s), {row['steps']} steps after 2 warm-up steps")
  print("| config | batch | first step s (compile) | steps/s (median) | slides/s | "
        "input ms/step |")
  print("|---|---:|---:|---:|---:|---:|")
  print(f"| pathflip_demo | {row['batch_size']} | {row['first_step_s']:.1f} | "
        f"{row['steps_per_s']:.2f} | {row['slides_per_s']:.1f} | {row['input_ms']:.0f} |")
  print("(no PyTorch peer for this part; input ms/step: drawing and placing a batch, inside the "
        "step time)")


# --------------------------------------------------------------------------- main


def _version(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="1000,10000,100000",
                      help="patches per slide, comma-separated ('' skips the slide encoder)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--large_repeats", type=int, default=3,
                      help=f"repeats at N >= {LARGE_N:,}")
  parser.add_argument("--skip", default="", help=f"implementations to leave out, of {IMPLS}")
  parser.add_argument("--threads", type=int, default=os.cpu_count(),
                      help="threads for both frameworks (default: all cores)")
  parser.add_argument("--json", default="", help="also write the rows here")
  parser.add_argument("--train_throughput", action="store_true",
                      help="also time training steps of configs/pathflip_demo.py")
  parser.add_argument("--steps", type=int, default=50, help="timed training steps")
  parser.add_argument("--features_dir", default="runs/demo/features")
  parser.add_argument("--whole_slide", action="store_true",
                      help="also the whole-slide case on JAX's default device (timed unless it "
                           "is a CPU)")
  parser.add_argument("--whole_slide_sizes", default="100000,1000000")
  parser.add_argument("--whole_slide_dtype", default="bfloat16")
  parser.add_argument("--backward", action="store_true",
                      help="also forward + backward against the PyTorch reference (CPU)")
  parser.add_argument("--backward_sizes", default="4096,16384")
  parser.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
  parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  if args.worker:
    worker_main(args)
    return
  _pin_threads(args.threads)  # the workers inherit it
  if not args.whole_slide:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # noqa: PLC0415 - after _pin_threads
  output: dict[str, Any] = {"jax": jax.__version__, "torch": _version("torch"),
                            "threads": args.threads, "argv": sys.argv[1:]}
  if args.sizes:
    print(f"# slide encoder (paper sizes: 12 layers, width 768, 8 queries), 1 slide of N x "
          f"{FEATURE_DIM} float32 features, CPU, {args.threads} threads, repeats {args.repeats} "
          f"({min(args.repeats, args.large_repeats)} at N >= {LARGE_N:,})", flush=True)
    rows = slide_encoder_rows(args)
    print_slide_table(rows)
    output["slide_encoder"] = [{k: v for k, v in row.items() if k != "output"} for row in rows]
  if args.whole_slide:
    device = jax.devices()[0]
    print(f"\n# whole slide: the slide Q-Former (paper sizes, kv_chunk 2048) over all N patches "
          f"in one forward, {args.whole_slide_dtype} compute, {device.platform} "
          f"({device.device_kind})" + (", compiled from abstract shapes only"
                                        if device.platform == "cpu" else
                                        f", {args.large_repeats} repeats"), flush=True)
    rows = whole_slide_rows(args)
    print_whole_slide_table(rows)
    output["whole_slide"] = rows
  if args.backward:
    sizes = [int(x) for x in args.backward_sizes.split(",") if x]
    print(f"\n# forward + backward (loss = sum of the query outputs), paper sizes, float32, "
          f"{jax.devices()[0].platform}, {args.threads} threads, {args.repeats} repeats",
          flush=True)
    rows = backward_rows(sizes, args.repeats, args.threads)
    print_backward_table(rows)
    output["backward"] = rows
  if args.train_throughput:
    row = train_throughput(args)
    print_train_table(row)
    output["train_throughput"] = row
  if args.json:
    with open(args.json, "w") as f:
      json.dump(output, f, indent=1)


if __name__ == "__main__":
  main()
