r"""Patch-encoder throughput: the Flax ViT against timm's on the same weights and inputs.

  python -m benchmarks.patch_encoder [--models vit_small_patch16,vit_base_patch16] [--batch 32]
                                     [--repeats 5] [--threads N] [--extract_models M]

For each model, a timm ``VisionTransformer`` with random weights is built and converted with
``pathflip_jax.convert.timm_vit`` (so both compute the same function; the relative difference of
their outputs is printed). Both run the same float32 batch of 224-px images on the CPU:

* ``flax``  - ``jax.jit`` of the NNX forward (compilation excluded by a warm-up call);
* ``timm``  - ``model(x)`` under ``torch.inference_mode()`` (warm-up call excluded as well).

Both use ``--threads`` threads (default: all cores): torch through ``torch.set_num_threads``,
XLA:CPU, which sizes its thread pool from the CPUs the process may run on, by pinning the process
to that many CPUs before JAX starts. Timings alternate between the frameworks, repeat after repeat,
so drift in a shared machine's speed hits both; rates are medians.

Then the extraction job end to end (``data_prep.extract_features.run``: grain decode workers,
jitted forward, feature-shard writes, start-up and compilation included, the compilation cache
on) against a CLAM-style PyTorch loop (``DataLoader`` with as many workers, PIL decode, timm
forward, one ``.h5`` per slide), same weights, same 256-px patches.

**Accelerator case** (``--accelerator``; JAX's default device, not forced to the CPU):

  python -m benchmarks.patch_encoder --accelerator [--accelerator_models vit_base_patch16,...]
                                     [--accelerator_batches 256,512,1024] [--dtype bfloat16]
                                     [--attention cudnn]

ViT-B/16 and ViT-L/16 at UNI/CONCH shapes (224 px, patch 16; ViT-B 12 x 768, 12 heads, MLP
3072; ViT-L 24 x 1024, 16 heads, MLP 4096), random weights cast to ``--dtype`` as the
extraction job casts them, forward of a batch of random images, program as on an accelerator
(attention through ``jax.nn.dot_product_attention``, no CPU batch chunking). Columns:
``GFLOP/patch`` is the analytic count of :func:`vit_flops_per_image` (matmuls only, 2·m·n·k
each); ``XLA GFLOP/patch`` is ``compiled.cost_analysis()["flops"]`` over the batch and ``ratio``
their quotient (XLA also counts norms, softmax and GELU: slightly above 1); ``XLA temp MiB`` the
scratch memory XLA planned (``compiled.memory_analysis()``); ``patches/s`` the batch over the
median of ``--repeats`` forwards after a warm-up; ``MFU`` analytic FLOP/s over
``accelerators.peak_flops(device, dtype)``. On a CPU the programs are compiled from abstract
shapes only (``jax.ShapeDtypeStruct``: no weights, no images) and the row says "not timed on cpu".
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import numpy as np

# timm names of the benchmarked variants (224-px, ImageNet-sized heads dropped).
TIMM_NAMES = {
    "vit_tiny_test": None,
    "vit_small_patch16": "vit_small_patch16_224",
    "vit_base_patch16": "vit_base_patch16_224",
    "vit_large_patch16": "vit_large_patch16_224",
}


def import_timm():
  """timm, also where torchvision's compiled ops cannot load.

  The torchvision wheel available offline here is a CUDA build; next to CPU-only torch its op
  library fails to load, and ``import torchvision`` then dies registering fake kernels for the
  missing ops ("operator torchvision::nms does not exist"). timm needs only torchvision's Python
  parts, so in that case the registrations are skipped and the import retried.
  """
  try:
    import timm  # noqa: PLC0415
    return timm
  except RuntimeError as e:
    if "torchvision::" not in str(e):
      raise
  import torch.library  # noqa: PLC0415
  for name in [n for n in sys.modules if n.split(".")[0] in ("torchvision", "timm")]:
    del sys.modules[name]
  originals = {name: getattr(torch.library, name)
               for name in ("register_fake", "register_autograd")}

  def lenient(original):
    def register(op, *args, **kwargs):
      def decorator(fn):
        try:
          return original(op, *args, **kwargs)(fn)
        except RuntimeError:  # the op does not exist: nothing to register it for
          return fn
      return decorator
    return register

  try:
    for name, original in originals.items():
      setattr(torch.library, name, lenient(original))
    import timm  # noqa: PLC0415
  finally:
    for name, original in originals.items():
      setattr(torch.library, name, original)
  return timm


def _pin_threads(threads: int) -> None:
  """Restricts this process (XLA's thread pool, torch) to ``threads`` CPUs; call before JAX runs."""
  available = sorted(os.sched_getaffinity(0))
  if threads < len(available):
    os.sched_setaffinity(0, available[:threads])


def _time(fn, *args) -> float:
  # Idle threads of the framework that ran last (OpenMP, Eigen) spin for a while before sleeping;
  # a pause keeps them from competing with the next measurement.
  time.sleep(0.5)
  start = time.perf_counter()
  fn(*args)
  return time.perf_counter() - start


def forward_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
  """One row per (model, framework): median patches/s of a forward pass over ``args.batch``."""
  import jax  # noqa: PLC0415 - after _pin_threads
  import jax.numpy as jnp  # noqa: PLC0415
  import torch  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from pathflip_jax.convert import timm_vit  # noqa: PLC0415

  timm = import_timm()
  torch.set_num_threads(args.threads)
  rows = []
  for name in args.models.split(","):
    if TIMM_NAMES.get(name) is None:
      raise ValueError(f"--models: no timm counterpart for {name!r}; choose from "
                       f"{[k for k, v in TIMM_NAMES.items() if v]}")
    torch.manual_seed(0)
    reference = timm.create_model(TIMM_NAMES[name], pretrained=False, num_classes=0).eval()
    state_dict = {k: v.numpy() for k, v in reference.state_dict().items()}
    model = timm_vit.vit_from_timm(state_dict, timm_vit.infer_config(state_dict))
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))

    rng = np.random.default_rng(0)
    images = rng.standard_normal((args.batch, 224, 224, 3), np.float32)
    images_jax = jnp.asarray(images)
    images_torch = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())

    def run_flax():
      return forward(state, images_jax).block_until_ready()

    def run_timm():
      with torch.inference_mode():
        return reference(images_torch)

    ours, theirs = np.asarray(run_flax()), run_timm().numpy()  # warm-up (and compilation)
    difference = float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))
    seconds = {"flax": [], "timm": []}
    for r in range(args.repeats):
      order = (("flax", run_flax), ("timm", run_timm))
      for framework, fn in (order if r % 2 == 0 else order[::-1]):
        seconds[framework].append(_time(fn))
      print(f"{name}: repeat {r + 1}/{args.repeats}: flax {seconds['flax'][-1]:.2f} s, "
            f"timm {seconds['timm'][-1]:.2f} s", file=sys.stderr, flush=True)
    timm_rate = args.batch / statistics.median(seconds["timm"])
    for framework in ("flax", "timm"):
      rate = args.batch / statistics.median(seconds[framework])
      rows.append(dict(model=name, framework=framework, batch=args.batch, patches_per_s=rate,
                       ratio=rate / timm_rate, rel_difference=difference,
                       seconds=seconds[framework]))
  return rows


# --------------------------------------------------------------------------- end to end


def _write_benchmark_patches(directory: str, num_slides: int, patches_per_slide: int,
                             size: int = 256) -> None:
  """A tiling output directory of H&E-like patches (the demo cohort's renderer), JPEG q90."""
  from pathflip_jax.data import patch_shards, records, synthetic_he as he, tiling  # noqa: PLC0415
  rng = np.random.default_rng(0)
  os.makedirs(directory, exist_ok=True)
  shard = patch_shards.shard_name(0, 1)
  rows, offset, side = [], 0, 4
  tissues = [he.STROMA, he.TUMOUR, he.LYMPHOCYTES, he.NECROSIS]
  with patch_shards.ShardWriter(os.path.join(directory, shard)) as writer:
    for s in range(num_slides):
      stain = he.Stain.random(rng)
      written = 0
      while written < patches_per_slide:
        h, e = he.render(tissues[written // (side * side) % len(tissues)],
                         (side * size, side * size), 0.5, rng)
        tile = he.to_rgb(h, e, stain)
        for k in range(min(side * side, patches_per_slide - written)):
          r, c = divmod(k, side)
          patch = tile[r * size:(r + 1) * size, c * size:(c + 1) * size]
          writer.write(records.encode({
              "schema_version": 1, "slide_id": f"bench{s}", "x": written * size, "y": 0,
              "col": written, "row": 0, "patch_size": size, "patch_size_level0": size,
              "mpp": 0.5, "patch_mpp": 0.5, "jpeg": tiling.encode_jpeg(patch, 90)},
              records.PATCH))
          written += 1
      rows.append({"slide_id": f"bench{s}", "path": "", "status": "ok", "patch_size": size,
                   "patch_size_level0": size, "mpp": 0.5, "patch_mpp": 0.5, "shard": shard,
                   "shard_offset": offset, "num_patches": patches_per_slide})
      offset += patches_per_slide
  patch_shards.write_jsonl(os.path.join(directory, patch_shards.SLIDES_FILE), rows)


class _TorchPatches:
  """A CLAM-style torch Dataset over the same patch shards: PIL decode, ToTensor, normalise."""

  def __init__(self, directory: str):
    from pathflip_jax.data import patch_shards  # noqa: PLC0415
    self.source = patch_shards.PatchShards(directory)

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int):
    import io  # noqa: PLC0415
    import torch  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415
    record = self.source[i]
    image = np.asarray(Image.open(io.BytesIO(record["jpeg"])).convert("RGB"), np.float32) / 255
    from pathflip_jax.models.vit import IMAGENET_MEAN, IMAGENET_STD  # noqa: PLC0415
    image = (image - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
    return (torch.from_numpy(image.transpose(2, 0, 1).copy()), record["slide_id"],
            torch.tensor([record["x"], record["y"]]))


def _clam_style_extract(model, patches_dir: str, out_dir: str, batch: int, workers: int) -> int:
  """CLAM's extract_features_fp loop: DataLoader -> model -> one .h5 per slide."""
  import h5py  # noqa: PLC0415
  import torch  # noqa: PLC0415
  loader = torch.utils.data.DataLoader(_TorchPatches(patches_dir), batch_size=batch,
                                       num_workers=workers, shuffle=False)
  os.makedirs(out_dir, exist_ok=True)
  features: dict[str, list] = {}
  coords: dict[str, list] = {}
  count, first = 0, None
  with torch.inference_mode():
    for images, slide_ids, xy in loader:
      out = model(images).numpy()
      if first is None:
        first = (time.perf_counter(), len(images))
      for j, slide_id in enumerate(slide_ids):
        features.setdefault(slide_id, []).append(out[j])
        coords.setdefault(slide_id, []).append(xy[j].numpy())
      count += len(images)
  for slide_id in features:
    with h5py.File(os.path.join(out_dir, f"{slide_id}.h5"), "w") as f:
      f.create_dataset("features", data=np.stack(features[slide_id]).astype(np.float16))
      f.create_dataset("coords", data=np.stack(coords[slide_id]))
  return count, (count - first[1]) / (time.perf_counter() - first[0])


def extraction_rows(args) -> list[dict[str, Any]]:
  """The extraction job end to end (grain decode + sharded jit forward + shard writes) against
  a CLAM-style PyTorch loop (DataLoader with the same worker count + timm + h5 per slide)."""
  import shutil  # noqa: PLC0415
  import tempfile  # noqa: PLC0415
  import torch  # noqa: PLC0415
  from data_prep import extract_features  # noqa: PLC0415
  from pathflip_jax import compilation_cache  # noqa: PLC0415
  timm = import_timm()
  torch.set_num_threads(args.threads)
  compilation_cache.enable()  # as the job's main() does: repeats do not recompile
  work = tempfile.mkdtemp(prefix="bench_extract_")
  patches_dir = os.path.join(work, "patches")
  _write_benchmark_patches(patches_dir, args.extract_slides, args.extract_patches)
  total = args.extract_slides * args.extract_patches
  rows = []
  try:
    for name in args.extract_models.split(","):
      model = timm.create_model(TIMM_NAMES[name], pretrained=False, num_classes=0,
                                img_size=256).eval()
      weights = os.path.join(work, f"{name}.safetensors")
      from safetensors.torch import save_file  # noqa: PLC0415
      save_file(model.state_dict(), weights)
      config = (f"{extract_features.DEFAULT_CONFIG}:variant={name},weights={weights},"
                f"batch_size={args.batch},num_workers={args.workers}")
      times = {"pathflip_jax extract_features": [], "CLAM-style loop (timm)": []}
      steady = {"pathflip_jax extract_features": [], "CLAM-style loop (timm)": []}
      for repeat in range(args.repeats):
        out = os.path.join(work, f"features-{name}-{repeat}")
        start = time.perf_counter()
        summary = extract_features.run(["--patches", patches_dir, "--output_dir", out,
                                        "--config", config, "--progress_interval", "0"])
        times["pathflip_jax extract_features"].append(time.perf_counter() - start)
        steady["pathflip_jax extract_features"].append(summary["steady_patches_per_s"])
        assert summary["patches"] == total, summary
        start = time.perf_counter()
        count, rate = _clam_style_extract(model, patches_dir, os.path.join(work, f"clam-{repeat}"),
                                          args.batch, args.workers)
        times["CLAM-style loop (timm)"].append(time.perf_counter() - start)
        steady["CLAM-style loop (timm)"].append(rate)
        assert count == total
        print(f"extraction {name}: repeat {repeat + 1}/{args.repeats}: "
              f"{ {k: round(v[-1], 1) for k, v in times.items()} } s", file=sys.stderr, flush=True)
      peer = total / statistics.median(times["CLAM-style loop (timm)"])
      peer_steady = statistics.median(steady["CLAM-style loop (timm)"])
      for pipeline, seconds in times.items():
        rate = total / statistics.median(seconds)
        rate_steady = statistics.median(steady[pipeline])
        rows.append({"model": name, "pipeline": pipeline, "patches": total,
                     "seconds": statistics.median(seconds), "patches_per_s": rate,
                     "ratio": rate / peer, "steady": rate_steady,
                     "steady_ratio": rate_steady / peer_steady})
  finally:
    shutil.rmtree(work, ignore_errors=True)
  return rows


# --------------------------------------------------------------------------- accelerator


def vit_flops_per_image(config: Any) -> float:
  """Analytic forward FLOPs of one image through a ``vit.ViTConfig`` model, 2·m·n·k per matmul.

  With P patches of p x p x 3 pixels, T = P + prefix tokens, width D, MLP width H, L layers:

    patch embedding   2·P·(3p²)·D          (the stride-p convolution as a matmul)
    per layer         2·T·D·3D  qkv  + 2·T·D·D  output projection  + 2·T·D·H·2  MLP
                      + 2·T·T·D  scores q·k  + 2·T·T·D  weights·v  (all heads together)
    head              2·D·out               (when the model has one)

  Norms, softmax, GELU and residual adds are left out: under 1% at ViT-B/L widths.
  """
  p, d, h = config.patch_size, config.width, config.mlp_hidden
  patches, tokens = config.num_patches, config.num_tokens
  embed = 2 * patches * (3 * p * p) * d
  per_layer = (2 * tokens * d * 3 * d + 2 * tokens * d * d + 2 * tokens * d * h * 2
               + 2 * 2 * tokens * tokens * d)
  head = 2 * d * config.head_dim if config.head_dim else 0
  return float(embed + config.depth * per_layer + head)


def compile_vit(config: Any, batch: int, dtype: Any, abstract: bool = True,
                attention: str | None = None) -> tuple[Any, Any, Any]:
  """(compiled forward, weights, images) of ``config`` at ``batch`` in ``dtype``.

  ``abstract``: weights and images are ``jax.ShapeDtypeStruct`` (nothing allocated; the program
  can be inspected, not run). The program is the accelerator's wherever it is compiled: the
  attention core through ``jax.nn.dot_product_attention`` (its ``implementation``:
  ``attention``; None lets JAX choose, which in jax 0.10.2 is always its XLA einsums) and no CPU
  batch chunking.
  """
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from pathflip_jax.models import layers, vit  # noqa: PLC0415

  def build():
    return vit.VisionTransformer(config, rngs=nnx.Rngs(0), dtype=dtype)

  model = nnx.eval_shape(build) if abstract else build()
  for _, module in nnx.iter_modules(model):
    if isinstance(module, layers.MultiHeadAttention):
      module.cpu_batch_chunk = 0
  graphdef, state = nnx.split(model)
  # Weights in the compute dtype, as data_prep/extract_features.py runs them.
  cast = (lambda x: jax.ShapeDtypeStruct(x.shape, dtype)) if abstract else (
      lambda x: x.astype(dtype))
  state = jax.tree.map(lambda x: cast(x) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
  shape = (batch, config.image_size, config.image_size, 3)
  images = (jax.ShapeDtypeStruct(shape, dtype) if abstract
            else jax.random.normal(jax.random.key(1), shape, dtype))
  forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
  saved = layers.DOT_PRODUCT_ATTENTION, layers.DOT_PRODUCT_ATTENTION_IMPLEMENTATION
  layers.DOT_PRODUCT_ATTENTION, layers.DOT_PRODUCT_ATTENTION_IMPLEMENTATION = True, attention
  try:   # both are read while tracing
    compiled = forward.lower(state, images).compile()
  finally:
    layers.DOT_PRODUCT_ATTENTION, layers.DOT_PRODUCT_ATTENTION_IMPLEMENTATION = saved
  return compiled, state, images


def xla_flops(compiled: Any) -> float | None:
  """``cost_analysis()["flops"]`` of a compiled program (a dict, or a list of one on older
  JAX); None where the backend reports none."""
  try:
    analysis = compiled.cost_analysis()
  except (NotImplementedError, RuntimeError):
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  return None if not analysis or "flops" not in analysis else float(analysis["flops"])


def xla_temp_bytes(compiled: Any) -> int | None:
  """The scratch memory XLA planned for a compiled program, None where unreported."""
  try:
    analysis = compiled.memory_analysis()
  except (AttributeError, NotImplementedError, RuntimeError):
    return None
  return None if analysis is None else int(analysis.temp_size_in_bytes)


def accelerator_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
  """One row per (model, batch): analytic and XLA FLOPs, and where the default device is not a
  CPU, patches/s and MFU."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from benchmarks import accelerators  # noqa: PLC0415
  from pathflip_jax.models import vit  # noqa: PLC0415

  device = jax.devices()[0]
  timed = device.platform != "cpu"
  dtype = jnp.dtype(args.dtype)
  peak = accelerators.peak_flops(device, dtype) if timed else None
  rows = []
  for name in args.accelerator_models.split(","):
    config = vit.get_config(name)
    flops = vit_flops_per_image(config)
    for batch in (int(b) for b in args.accelerator_batches.split(",")):
      start = time.perf_counter()
      compiled, state, images = compile_vit(config, batch, dtype, abstract=not timed,
                                            attention=args.attention or None)
      compile_s = time.perf_counter() - start
      counted = xla_flops(compiled)
      temp = xla_temp_bytes(compiled)
      row = dict(model=name, batch=batch, dtype=dtype.name, flops_per_patch=flops,
                 xla_flops_per_patch=None if counted is None else counted / batch,
                 xla_temp_bytes=temp, compile_s=compile_s, device=device.device_kind,
                 patches_per_s=None, mfu=None, peak=None if peak is None else peak.name)
      if timed:
        compiled(state, images).block_until_ready()   # warm-up
        seconds = []
        for _ in range(args.repeats):
          start = time.perf_counter()
          compiled(state, images).block_until_ready()
          seconds.append(time.perf_counter() - start)
        step = statistics.median(seconds)
        row.update(patches_per_s=batch / step, seconds=seconds,
                   mfu=accelerators.mfu(flops * batch, step, peak))
        del state, images
      print(f"{name} batch {batch}: compiled in {compile_s:.1f} s"
            + (f", {row['patches_per_s']:,.0f} patches/s" if timed else ""),
            file=sys.stderr, flush=True)
      rows.append(row)
  return rows


def print_accelerator_table(rows: list[dict[str, Any]], peak: str | None) -> None:
  print("| model | batch | dtype | GFLOP/patch | XLA GFLOP/patch | ratio | XLA temp MiB | "
        "compile s | patches/s | MFU |")
  print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
  for row in rows:
    counted = row["xla_flops_per_patch"]
    temp = row["xla_temp_bytes"]
    rate = ("not timed on cpu" if row["patches_per_s"] is None
            else _rate(row["patches_per_s"]))
    xla = "- | -" if counted is None else (
        f"{counted / 1e9:.2f} | {counted / row['flops_per_patch']:.3f}")
    temp = "-" if temp is None else f"{temp / 2**20:,.0f}"
    mfu = "-" if row["mfu"] is None else f"{row['mfu']:.1%}"
    print(f"| {row['model']} | {row['batch']} | {row['dtype']} | "
          f"{row['flops_per_patch'] / 1e9:.2f} | {xla} | {temp} | {row['compile_s']:.1f} | "
          f"{rate} | {mfu} |")
  if peak:
    print(f"(MFU against {peak})")


def _rate(value: float) -> str:
  return f"{value:,.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def print_table(rows: list[dict[str, Any]]) -> None:
  print("| model | framework | batch | patches/s (median) | ratio vs timm |")
  print("|---|---|---:|---:|---:|")
  for row in rows:
    print(f"| {row['model']} | {row['framework']} | {row['batch']} | "
          f"{_rate(row['patches_per_s'])} | {row['ratio']:.2f} |")
  for row in rows[::2]:
    print(f"{row['model']}: flax vs timm outputs differ by {row['rel_difference']:.1e} "
          "(relative L2)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="vit_small_patch16,vit_base_patch16",
                      help="comma-separated vit.VARIANTS names")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--threads", type=int, default=os.cpu_count(),
                      help="threads for both frameworks (default: all cores)")
  parser.add_argument("--extract_models", default="vit_small_patch16",
                      help="models for the end-to-end extraction comparison ('' to skip)")
  parser.add_argument("--extract_slides", type=int, default=2)
  parser.add_argument("--extract_patches", type=int, default=48, help="256-px patches a slide")
  parser.add_argument("--workers", type=int, default=2,
                      help="decode workers of both pipelines (grain / torch DataLoader)")
  parser.add_argument("--accelerator", action="store_true",
                      help="only the accelerator case, on JAX's default device (timed unless "
                           "it is a CPU)")
  parser.add_argument("--accelerator_models", default="vit_base_patch16,vit_large_patch16")
  parser.add_argument("--accelerator_batches", default="256,512,1024")
  parser.add_argument("--dtype", default="bfloat16", help="compute dtype of the accelerator case")
  parser.add_argument("--attention", default="", choices=("", "xla", "cudnn"),
                      help="jax.nn.dot_product_attention's implementation in the accelerator "
                           "case ('': JAX chooses)")
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  if args.accelerator:
    import jax  # noqa: PLC0415
    device = jax.devices()[0]
    print(f"# patch encoder forward on an accelerator: {args.dtype}, 224 px, patch 16, "
          f"{device.platform} ({device.device_kind}), jax {jax.__version__}"
          + (", compiled from abstract shapes only" if device.platform == "cpu" else
             f", {args.repeats} repeats"))
    rows = accelerator_rows(args)
    print_accelerator_table(rows, rows[0]["peak"] if rows else None)
    return
  _pin_threads(args.threads)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # noqa: PLC0415
  print(f"# patch encoder forward, float32, 224 px, {args.threads} threads, "
        f"{args.repeats} repeats, jax {jax.__version__} on {jax.devices()[0].platform}")
  if args.models:
    print_table(forward_rows(args))
  if args.extract_models:
    rows = extraction_rows(args)
    print(f"\n# extraction end to end: 256-px JPEG patches of H&E-like texture, decode + forward + "
          f"write, batch {args.batch}, {args.workers} decode workers, {args.repeats} repeats")
    print("| model | pipeline | patches | wall s | patches/s | ratio | patches/s after "
          "1st batch | ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
      print(f"| {row['model']} | {row['pipeline']} | {row['patches']} | {row['seconds']:.1f} | "
            f"{_rate(row['patches_per_s'])} | {row['ratio']:.2f} | {_rate(row['steady'])} | "
            f"{row['steady_ratio']:.2f} |")
    print("(wall s: start-up, compilation and worker start included; ratios vs the CLAM-style "
          "loop; medians)")


if __name__ == "__main__":
  main()
