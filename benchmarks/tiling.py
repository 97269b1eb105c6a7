r"""Tiling throughput: this project's tiler against a CLAM-style loop and the file's ceiling.

  python -m benchmarks.tiling [--repeats 5] [--large_side 20480] [--workers 1,2] [--quick]

For each slide, on the same patch coordinates and in the same process:

* ``pathflip_jax``  - tiling.read_batch over every batch of the plan: one region read per block of
                      patches through large_image, cut, JPEG-encoded (imagecodecs, q90); with
                      passthrough, native JPEG tiles are copied without decoding.
* ``CLAM-style``    - the usual loop: ``openslide.OpenSlide.read_region`` per patch, RGB conversion,
                      JPEG encode (same encoder and quality, so only the reading differs).
* ``ceiling``       - the file's raw tile decode (tifffile bytes + imagecodecs JPEG decode of each
                      needed tile once) plus the JPEG encode of the same number of patches.

Planning (thumbnail, tissue mask) is timed apart and not in the rates: the other two columns are
handed the coordinates for free. Rates are medians over ``--repeats`` runs with fresh slide handles
and cleared caches. The Beam section runs the whole job (planning, staging, packing, Beam start-up
included) on copies of the large slide with 1, 2, ... DirectRunner worker processes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import imagecodecs
import large_image.cache_util
import numpy as np
import openslide
import tifffile

from pathflip_jax.data import slides, tiling
from pathflip_jax.data.pyramid_tiff import write_pyramidal_tiff

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CMU = os.path.join(REPO, "tests", "testdata", "cmu_small_region.svs")


def make_large_slide(path: str, side: int) -> str:
  """A side x side slide at 0.5 µm/px with 256-px JPEG tiles: tissue texture in an ellipse."""
  if os.path.exists(path):
    return path
  from tests import synthetic  # noqa: PLC0415 - the tests' generator, reused
  texture, _ = synthetic.tissue_image(2048, 2048, seed=7, ellipses=[(0.5, 0.5, 0.9, 0.9)])
  reps = -(-side // 2048)
  image = np.tile(texture, (reps, reps, 1))[:side, :side]
  yy, xx = np.ogrid[:side, :side]
  outside = ((yy / side - 0.5) / 0.45) ** 2 + ((xx / side - 0.5) / 0.38) ** 2 >= 1
  image[np.broadcast_to(outside, (side, side))] = 245
  write_pyramidal_tiff(path, image, mpp=0.5, tile_size=256, quality=90)
  return path


def _median_rate(count: int, seconds: list[float]) -> float:
  return count / statistics.median(seconds)


def bench_ours(path: str, params: tiling.TilingParams, repeats: int):
  seconds, plan_seconds = [], []
  for _ in range(repeats):
    large_image.cache_util.cachesClear()
    start = time.perf_counter()
    with slides.Slide(path) as slide:
      plan, _ = tiling.plan_slide(slide, "bench", params)
    plan_seconds.append(time.perf_counter() - start)
    large_image.cache_util.cachesClear()
    start = time.perf_counter()
    with slides.Slide(path) as slide:
      count = sum(len(tiling.read_batch(slide, plan, b, params)) for b in range(plan.num_batches))
    seconds.append(time.perf_counter() - start)
  return plan, count, seconds, plan_seconds


def bench_clam(path: str, plan: tiling.SlidePlan, quality: int, repeats: int) -> list[float]:
  coords = plan.coords_level0()
  size = plan.patch_size
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    with openslide.OpenSlide(path) as osr:
      level = osr.get_best_level_for_downsample(plan.step_level0 / size + 1e-6)
      for x, y in coords:
        patch = osr.read_region((int(x), int(y)), level, (size, size)).convert("RGB")
        imagecodecs.jpeg8_encode(np.asarray(patch), level=quality)
    seconds.append(time.perf_counter() - start)
  return seconds


def bench_ceiling(path: str, plan: tiling.SlidePlan, quality: int, repeats: int) -> list[float]:
  """Decode every native tile the patches touch, once, then encode as many patches."""
  with tifffile.TiffFile(path) as tif:
    page = next(p for p in tif.pages if p.is_tiled and p.shape[1] == round(
        plan.width * plan.mpp / plan.level_mpp))
    tw, th = page.tilewidth, page.tilelength
    across = -(-page.shape[1] // tw)
    ds = plan.level_mpp / plan.mpp
    needed = set()
    for x, y in plan.coords_level0():
      x0, y0 = int(x / ds), int(y / ds)
      x1, y1 = x0 + plan.patch_size - 1, y0 + plan.patch_size - 1
      for ty in range(y0 // th, y1 // th + 1):
        for tx in range(x0 // tw, x1 // tw + 1):
          needed.add(ty * across + tx)
    fh = tif.filehandle
    raw = []
    for index in sorted(needed):
      fh.seek(page.dataoffsets[index])
      raw.append(fh.read(page.databytecounts[index]))
    tables = page.jpegtables
    rgb = page.photometric == 2
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    decoded = [imagecodecs.jpeg8_decode(b, tables=tables, colorspace=2 if rgb else None)
               for b in raw]
    patch = np.ascontiguousarray(
        np.tile(decoded[0], (2, 2, 1))[:plan.patch_size, :plan.patch_size])
    for _ in range(plan.num_patches):
      imagecodecs.jpeg8_encode(patch, level=quality)
    seconds.append(time.perf_counter() - start)
  return seconds


def bench_slide(name: str, path: str, params: tiling.TilingParams, repeats: int) -> list[dict]:
  rows = []
  plan, count, ours, plan_s = bench_ours(path, params, repeats)
  clam = bench_clam(path, plan, params.jpeg_quality, repeats)
  ceiling = bench_ceiling(path, plan, params.jpeg_quality, repeats)
  base = _median_rate(count, clam)
  ceil = _median_rate(count, ceiling)
  mode = "passthrough" if plan.passthrough else "decode+encode"
  for method, seconds in (("pathflip_jax " + mode, ours), ("CLAM-style loop", clam),
                          ("ceiling (tile decode + encode)", ceiling)):
    rate = _median_rate(count, seconds)
    rows.append({"slide": name, "method": method, "patches": count,
                 "patches_per_s": rate, "vs_clam": rate / base, "vs_ceiling": rate / ceil,
                 "plan_s": statistics.median(plan_s) if method.startswith("pathflip") else None})
  return rows


def bench_beam(path: str, copies: int, workers: list[int]) -> list[dict]:
  from data_prep import tile_slides  # noqa: PLC0415
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    manifest = os.path.join(tmp, "manifest.jsonl")
    with open(manifest, "w") as f:
      for i in range(copies):
        f.write(json.dumps({"slide_id": f"copy{i}", "path": path}) + "\n")
    for count in workers:
      out = os.path.join(tmp, f"out{count}")
      start = time.perf_counter()
      summary = tile_slides.run(["--manifest", manifest, "--output_dir", out, "--no_passthrough",
                                 f"--direct_num_workers={count}", "--progress_interval=0"])
      seconds = time.perf_counter() - start
      rows.append({"workers": count, "patches": summary["patches"], "seconds": seconds,
                   "patches_per_s": summary["patches"] / seconds})
  for row in rows:
    row["speedup"] = row["patches_per_s"] / rows[0]["patches_per_s"]
  return rows


def print_tables(slide_rows: list[dict], beam_rows: list[dict]) -> None:
  print("\n| slide | method | patches | patches/s (median) | x CLAM-style | % of ceiling | "
        "plan s |")
  print("|---|---|---:|---:|---:|---:|---:|")
  for r in slide_rows:
    plan = f"{r['plan_s']:.2f}" if r["plan_s"] is not None else ""
    print(f"| {r['slide']} | {r['method']} | {r['patches']} | {r['patches_per_s']:,.0f} | "
          f"{r['vs_clam']:.2f} | {100 * r['vs_ceiling']:.0f}% | {plan} |")
  if beam_rows:
    print("\n| Beam DirectRunner workers | patches | wall s | patches/s | speed-up |")
    print("|---:|---:|---:|---:|---:|")
    for r in beam_rows:
      print(f"| {r['workers']} | {r['patches']} | {r['seconds']:.1f} | "
            f"{r['patches_per_s']:,.0f} | {r['speedup']:.2f} |")
  print(f"\n(cores: {os.cpu_count()}; rates are per process except the Beam table)")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--large_side", type=int, default=20480)
  parser.add_argument("--workers", default="1,2")
  parser.add_argument("--beam_copies", type=int, default=4)
  parser.add_argument("--cache_dir", default=os.path.join(tempfile.gettempdir(), "pathflip_bench"))
  parser.add_argument("--quick", action="store_true", help="small slide, 2 repeats, no Beam")
  args = parser.parse_args(argv)
  if args.quick:
    args.repeats, args.large_side, args.workers = 2, 4096, ""
  os.makedirs(args.cache_dir, exist_ok=True)
  large = make_large_slide(os.path.join(args.cache_dir, f"large_{args.large_side}.tif"),
                           args.large_side)
  rows = []
  # The real slide has only a few dozen tissue patches: more repeats for a stable median.
  small_repeats = args.repeats * 4
  rows += bench_slide("CMU-1 region (real, 240-px tiles)", CMU,
                      tiling.TilingParams(passthrough=False), small_repeats)
  rows += bench_slide("CMU-1 region, 240-px patches", CMU,
                      tiling.TilingParams(patch_size=240, passthrough=True), small_repeats)
  side = f"{args.large_side}x{args.large_side}"
  rows += bench_slide(f"generated {side}", large, tiling.TilingParams(passthrough=False),
                      args.repeats)
  rows += bench_slide(f"generated {side}", large, tiling.TilingParams(passthrough=True),
                      args.repeats)
  workers = [int(w) for w in args.workers.split(",") if w]
  beam_rows = bench_beam(large, args.beam_copies, workers) if workers else []
  print_tables(rows, beam_rows)


if __name__ == "__main__":
  sys.exit(main())
