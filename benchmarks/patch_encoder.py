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
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
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
