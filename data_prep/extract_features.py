"""Patch shards -> per-slide feature shards with a frozen ViT patch encoder.

  python -m data_prep.extract_features --patches D --output_dir F \
      [--config configs/extract_features.py[:key=value,...]] [--slides id1,id2] [--limit_slides N]

Reads the tiling job's patch shards with grain (JPEG decoded in worker processes), runs the encoder
jitted with the batch split over every local device (``data`` axis; bfloat16 on accelerators) and
writes one record per slide -- float16 features [N, D], level-0 coordinates [N, 2],
``patch_size_level0``, ``mpp``, encoder name and weights hash -- to ``F/features-*.array_record``
(layout: WORKSPACE.md, writer: ``pathflip_jax.data.feature_shards``).

Resumable: slides in a committed shard are skipped, so a killed run re-run completes without
duplicates. A slide with an unreadable patch is reported in ``failures.jsonl`` and skipped; the
rest of the job goes on.

Several processes (or machines) split the slides with ``--num_shards N --shard_index K`` (the
K-th of every N slides in slide-id order), all writing one output directory: each names its
shards with its part, and each leaves ``slides.jsonl`` listing every slide committed so far, so
the last to finish leaves the whole index; re-running with any split (or none) skips what is
done. ``--patches`` and ``--output_dir`` may be URLs (``s3://``, ``gs://``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Sequence

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from pathflip_jax import compilation_cache, config_args, input_pipeline, progress as progress_lib
from pathflip_jax import sharding, storage
from pathflip_jax.data import feature_shards, patch_shards, tiling
from pathflip_jax.models import vit

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "extract_features.py")
NORMALIZATION = {"imagenet": (vit.IMAGENET_MEAN, vit.IMAGENET_STD),
                 "openai_clip": (vit.OPENAI_CLIP_MEAN, vit.OPENAI_CLIP_STD)}


def _log(message: str) -> None:
  print(f"[extract_features] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the encoder


@dataclasses.dataclass
class Encoder:
  """A patch encoder ready to run: the module, its identity and its input convention."""

  model: vit.VisionTransformer
  name: str
  weights_hash: str
  weights_source: str
  image_size: int
  mean: tuple[float, float, float]
  std: tuple[float, float, float]

  @property
  def feature_dim(self) -> int:
    return self.model.out_dim


def build_encoder(config: ml_collections.ConfigDict, patch_size: int,
                  mesh: jax.sharding.Mesh | None = None) -> Encoder:
  """The encoder of an extract_features config, for patches of ``patch_size`` pixels, with its
  parameters placed on ``mesh`` (default: all local devices)."""
  mesh = mesh or sharding.make_mesh()
  if config.normalization not in NORMALIZATION:
    raise ValueError(f"config key 'normalization': {config.normalization!r} is not one of "
                     f"{sorted(NORMALIZATION)}")
  image_size = config.image_size or patch_size
  mean, std = NORMALIZATION[config.normalization]
  if config.checkpoint:
    if config.weights:
      raise ValueError("config keys 'checkpoint' and 'weights' are exclusive: give one encoder")
    # A patch_clip training run: its ViT, input size and normalisation come with it.
    from pathflip_jax import predict  # noqa: PLC0415
    model, clip_config, default_name = predict.load_image_encoder(config.checkpoint)
    name = config.name or default_name
    source = storage.absolute(config.checkpoint)
    weights_hash = feature_shards.weights_hash(_named_arrays(model))
    return Encoder(model, name, weights_hash, source, clip_config.vision.image_size,
                   tuple(clip_config.mean), tuple(clip_config.std))
  if config.weights:
    if not storage.exists(config.weights):
      raise FileNotFoundError(f"config key 'weights': {config.weights} does not exist (weights are "
                              "never downloaded from the internet; give the path or bucket URL "
                              "of a timm-format checkpoint you have)")
    from pathflip_jax.convert import timm_vit
    model, vit_config, weights_hash = timm_vit.load_timm_vit(
        storage.cache().local_copy(config.weights), config.variant, image_size=image_size,
        prefix=config.weights_prefix or None)
    source = storage.absolute(config.weights)
    name = config.name or f"{config.variant}"
  else:
    vit_config = vit.get_config(
        config.variant, image_size=image_size, pool=config.pool,
        num_registers=config.num_registers, layer_scale_init=config.layer_scale or None)
    # Initialised in one jitted program, already sharded (eager init compiles every op).
    model = sharding.create_sharded(
        lambda: vit.VisionTransformer(vit_config, rngs=nnx.Rngs(config.seed)), mesh)
    weights_hash = feature_shards.weights_hash(_named_arrays(model))
    source = f"random init (seed {config.seed})"
    name = config.name or f"{config.variant}-random-seed{config.seed}"
  return Encoder(model, name, weights_hash, source, image_size, tuple(mean), tuple(std))


# The keys of an extract_features config that decide the encoder (not how the job runs).
ENCODER_KEYS = ("variant", "weights", "weights_prefix", "checkpoint", "name", "seed",
                "image_size", "layer_scale", "num_registers", "pool", "normalization")


def encoder_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What rebuilds this encoder later (``features.json``'s ``encoder_config``: inference on a
  new slide embeds its patches as the features were), local paths made absolute."""
  out = {key: config[key] for key in ENCODER_KEYS}
  for key in ("weights", "checkpoint"):
    if out[key]:
      out[key] = storage.absolute(out[key])
  return out


def _named_arrays(model: nnx.Module):
  flat = nnx.state(model, nnx.Param).flat_state()
  return [(".".join(map(str, path)), np.asarray(leaf.get_value())) for path, leaf in flat]


def compute_dtype(name: str) -> jnp.dtype:
  if name == "auto":
    # bf16 halves memory traffic on GPU/TPU; XLA:CPU gains nothing from it (NOTES item 15).
    return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
  if name not in ("float32", "bfloat16"):
    raise ValueError(f"config key 'dtype': {name!r} is not auto, float32 or bfloat16")
  return jnp.dtype(name)


def make_embed_fn(encoder: Encoder, mesh: jax.sharding.Mesh, dtype: jnp.dtype):
  """A jitted ``uint8 [B, S, S, 3] -> float32 [B, D]`` with the batch split over the mesh."""
  model = sharding.shard_module(encoder.model, mesh)
  graphdef, state = nnx.split(model)
  if dtype != jnp.float32:
    state = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                         else x, state)
  state_sharding = sharding.state_shardings(model, mesh)
  images_sharding = sharding.batch_sharding(mesh, 4)
  size = encoder.image_size

  def embed(state, images_u8):
    model = nnx.merge(graphdef, state)
    images = vit.normalize(images_u8, encoder.mean, encoder.std, dtype)
    if images.shape[1:3] != (size, size):
      images = jax.image.resize(images, (images.shape[0], size, size, 3), "linear",
                                antialias=True)
    return model(images).astype(jnp.float32)

  jitted = jax.jit(embed, in_shardings=(state_sharding, images_sharding),
                   out_shardings=sharding.batch_sharding(mesh, 2))
  return lambda images: jitted(state, jax.device_put(images, images_sharding))


# --------------------------------------------------------------------------- the input pipeline


class PatchImages:
  """grain source: element i is the decoded image of one patch of the slides to do.

  A patch that cannot be read or decoded yields a black image and an error string (the slide is
  then failed as a whole), so one damaged record never stops the job.
  """

  def __init__(self, patches_dir: str, indices: np.ndarray, slide_of: np.ndarray,
               patch_size: int):
    self.source = patch_shards.PatchShards(patches_dir)
    self.indices, self.slide_of, self.patch_size = indices, slide_of, patch_size

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> dict[str, Any]:
    index = int(self.indices[i])
    try:
      record = self.source[index]
      image = tiling.decode_jpeg(record["jpeg"])
      if image.shape != (self.patch_size, self.patch_size, 3):
        raise ValueError(f"image is {image.shape}, expected ({self.patch_size}, "
                         f"{self.patch_size}, 3)")
      return {"image": image, "slide": self.slide_of[i], "x": record["x"], "y": record["y"],
              "error": ""}
    except Exception as e:  # noqa: BLE001 -- reported per slide, see class docstring
      return {"image": np.zeros((self.patch_size, self.patch_size, 3), np.uint8),
              "slide": self.slide_of[i], "x": -1, "y": -1,
              "error": f"patch {index}: {type(e).__name__}: {e}"}


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
  return {"images": np.stack([it["image"] for it in items]),
          "slides": np.array([it["slide"] for it in items], np.int64),
          "coords": np.array([(it["x"], it["y"]) for it in items], np.int64),
          "errors": [it["error"] for it in items]}


def make_loader(patches_dir: str, indices: np.ndarray, slide_of: np.ndarray, patch_size: int,
                batch_size: int, num_workers: int):
  dataset = grain.MapDataset.source(PatchImages(patches_dir, indices, slide_of, patch_size))
  dataset = dataset.batch(batch_size, batch_fn=collate).to_iter_dataset()
  if num_workers > 0:
    # Batches come back in order: worker k decodes batches k, k+W, ...
    dataset = input_pipeline.prefetch_in_workers(dataset, num_workers, buffer_size=2)
  return dataset


# --------------------------------------------------------------------------- the job


class _SlideBuffer:
  def __init__(self, row: dict[str, Any], num: int, dim: int):
    self.row, self.num = row, num
    self.features = np.zeros((num, dim), np.float16)
    self.coords = np.zeros((num, 2), np.int64)
    self.filled = 0
    self.errors: list[str] = []


def _tiling_params(patches_dir: str) -> dict[str, Any]:
  path = storage.join(patches_dir, "tiling.json")
  if not storage.exists(path):
    return {}
  return json.loads(storage.read_text(path)).get("params", {})


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m data_prep.extract_features",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--patches", required=True, help="tiling output directory (patch shards)")
  parser.add_argument("--output_dir", required=True, help="feature directory to write")
  parser.add_argument("--config", default=DEFAULT_CONFIG,
                      help="configs/extract_features.py[:key=value,...]")
  parser.add_argument("--slides", default="", help="comma-separated slide ids (default: all)")
  parser.add_argument("--limit_slides", type=int, default=0,
                      help="stop after this many slides (0: all); a later run continues")
  parser.add_argument("--progress_interval", type=float, default=5.0,
                      help="seconds between progress lines (0: none)")
  parser.add_argument("--num_shards", type=int, default=1,
                      help="split the slides over this many processes (each runs the command "
                           "with its --shard_index)")
  parser.add_argument("--shard_index", type=int, default=0,
                      help="this process's part: the slides whose position in slide-id order "
                           "is this modulo --num_shards")
  args = parser.parse_args(argv)
  if args.num_shards < 1 or not 0 <= args.shard_index < args.num_shards:
    parser.error(f"--shard_index {args.shard_index} --num_shards {args.num_shards}: expected "
                 "0 <= shard_index < num_shards")
  return args


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the job; returns a summary (slides written/skipped/failed, patches, rate)."""
  args = _parse_args(argv)
  config = config_args.load_config(args.config)
  started = time.perf_counter()

  storage.check_reachable(args.patches, "--patches", must_exist=True)
  storage.check_reachable(args.output_dir, "--output_dir")
  rows = patch_shards.read_slide_index(args.patches)
  if args.num_shards > 1:
    rows = sorted(rows, key=lambda r: r["slide_id"])[args.shard_index::args.num_shards]
  if args.slides:
    wanted = set(args.slides.split(","))
    unknown = wanted - {r["slide_id"] for r in rows}
    if unknown:
      raise SystemExit(f"--slides: {sorted(unknown)} not tiled in {args.patches}"
                       + (" (or in another --shard_index)" if args.num_shards > 1 else ""))
    rows = [r for r in rows if r["slide_id"] in wanted]
  sizes = {r["patch_size"] for r in rows}
  if len(sizes) > 1:
    raise SystemExit(f"{args.patches}: slides tiled at different patch sizes {sorted(sizes)}")
  tiling_params = _tiling_params(args.patches)
  patch_size = sizes.pop() if sizes else int(tiling_params.get("patch_size", 256))

  mesh = sharding.make_mesh()
  encoder = build_encoder(config, patch_size, mesh)
  identity = {"source": "extract_features", "encoder": encoder.name,
              "weights_hash": encoder.weights_hash, "feature_dim": encoder.feature_dim,
              "image_size": encoder.image_size, "tiling": tiling_params,
              "encoder_config": encoder_config(config)}
  writer = feature_shards.FeatureWriter(
      args.output_dir, identity, slides_per_shard=config.slides_per_shard,
      max_shard_bytes=config.max_shard_mb << 20,
      part=args.shard_index if args.num_shards > 1 else None)
  todo = [r for r in rows if not writer.is_done(r["slide_id"])]
  if args.limit_slides:
    todo = todo[:args.limit_slides]
  _log(f"{len(rows)} slides in {args.patches}, {len(rows) - len(todo)} already done or "
       f"deferred, {len(todo)} to do -> {storage.absolute(args.output_dir)}"
       + (f" (part {args.shard_index} of {args.num_shards})" if args.num_shards > 1 else ""))
  _log(f"encoder {encoder.name} ({encoder.weights_source}), {encoder.feature_dim}-d, input "
       f"{encoder.image_size}px from {patch_size}px patches, weights sha256 "
       f"{encoder.weights_hash[:12]}")

  patches = patch_shards.PatchShards(args.patches)
  ranges = [patches.slide_range(r["slide_id"]) for r in todo]
  patches.close()
  indices = np.concatenate([np.arange(a, b) for a, b in ranges] or [np.zeros(0, np.int64)])
  slide_of = np.concatenate([np.full(b - a, k) for k, (a, b) in enumerate(ranges)]
                            or [np.zeros(0, np.int64)])

  devices = mesh.devices.size
  batch_size = -(-config.batch_size // devices) * devices
  dtype = compute_dtype(config.dtype)
  _log(f"{devices} {jax.default_backend()} device(s), batch {batch_size}, {jnp.dtype(dtype).name},"
       f" {config.num_workers} decode worker(s)")
  embed = make_embed_fn(encoder, mesh, dtype)

  buffers = {k: _SlideBuffer(r, b - a, encoder.feature_dim)
             for k, (r, (a, b)) in enumerate(zip(todo, ranges))}
  # The first batch pays for compilation and worker start-up: the rate is measured after it.
  progress = progress_lib.Progress(len(indices), "patches", "extract_features",
                                   args.progress_interval or None, skip_first=True)
  written, failed = [], []

  def finish(k: int) -> None:
    buffer = buffers.pop(k)
    slide_id = buffer.row["slide_id"]
    if buffer.errors:
      writer.fail(slide_id, "corrupt_patches",
                  f"{len(buffer.errors)} of {buffer.num} patches unreadable; first: "
                  f"{buffer.errors[0]}", path=buffer.row.get("path"))
      failed.append(slide_id)
      _log(f"slide {slide_id}: skipped, {buffer.errors[0]}")
      return
    writer.add({
        "slide_id": slide_id, "features": buffer.features, "coords": buffer.coords,
        "patch_size_level0": int(buffer.row["patch_size_level0"]),
        "mpp": float(buffer.row["mpp"]), "encoder": encoder.name,
        "weights_hash": encoder.weights_hash, "source": "extract_features",
        "patch_size": int(buffer.row["patch_size"]),
        "patch_mpp": float(buffer.row["patch_mpp"]),
        "mpp_source": str(buffer.row.get("mpp_source", "patches")),
        "coords_source": "patches",
    }, row=buffer.row)
    written.append(slide_id)

  def consume(batch: dict[str, Any], features: jax.Array) -> None:
    count = len(batch["slides"])
    features = np.asarray(features[:count]).astype(np.float16)
    for j, k in enumerate(batch["slides"]):
      buffer = buffers[k]
      buffer.features[buffer.filled] = features[j]
      buffer.coords[buffer.filled] = batch["coords"][j]
      if batch["errors"][j]:
        buffer.errors.append(batch["errors"][j])
      buffer.filled += 1
      if buffer.filled == buffer.num:
        finish(k)
    progress.update(progress.done + count, slides=f"{len(written) + len(failed)}/{len(todo)}")

  try:
    if len(indices):
      pending = None
      batches = iter(make_loader(args.patches, indices, slide_of, patch_size, batch_size,
                                 config.num_workers))
      for batch in batches:
        # A private copy, padded to one compiled shape: grain hands batches over in shared
        # memory that it frees when the batch is dropped, and a CPU device_put may alias it.
        images = np.zeros((batch_size, *batch["images"].shape[1:]), np.uint8)
        images[:len(batch["images"])] = batch["images"]
        batch["images"] = None
        features = embed(images)  # dispatched asynchronously ...
        if pending is not None:
          consume(*pending)         # ... while the previous batch is copied out and written
        pending = (batch, features)
      if pending is not None:
        consume(*pending)
      batches.close()  # stops grain's workers and frees their shared memory now
  finally:
    index_rows, failure_rows = writer.close(rows)
  elapsed = time.perf_counter() - started
  summary = {
      "slides_written": len(written), "slides_failed": len(failed),
      "slides_skipped": len(rows) - len(todo), "patches": progress.done,
      "patches_per_s": progress.rate(include_first=True) or 0.0,
      "steady_patches_per_s": progress.rate(),
      "seconds": elapsed, "shards": writer.written,
      "encoder": encoder.name, "feature_dim": encoder.feature_dim,
      "output_dir": storage.absolute(args.output_dir), "failures": failure_rows,
  }
  steady = summary["steady_patches_per_s"]
  steady = f", {steady:.1f} after the first batch" if steady else ""
  _log(f"done in {elapsed:.1f}s: {len(written)} slides written ({progress.done} patches, "
       f"{summary['patches_per_s']:.1f} patches/s{steady}), {len(failed)} failed, "
       f"{len(rows) - len(todo)} skipped -> {summary['output_dir']}")
  return summary


def main() -> None:
  compilation_cache.enable()
  summary = run()
  sys.exit(1 if summary["slides_failed"] else 0)


if __name__ == "__main__":
  # grain's worker processes unpickle PatchImages by module path: run through the importable
  # module, not __main__, so that they can find it.
  from data_prep import extract_features as _module
  _module.main()
