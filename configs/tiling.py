"""Tiling job defaults: 256-px patches at 0.5 µm/px ("20x"), as in the PathFLIP paper.

Launch (the config is optional; flags such as --target_mpp override it):

  python -m data_prep.tile_slides --manifest slides.jsonl --output_dir runs/patches \
      --config configs/tiling.py:target_mpp=0.5,patch_size=256

Expected: one shard of tissue patches, tiling.png and tissue GeoJSON per slide (the bundled
Aperio slide's grid is checked in tests/test_tile_slides.py); docs/results.md, "Time", has the
demo cohort's tiling time.
"""

from pathflip_jax import config_args


def get_config(arg: str | None = None):
  config = config_args.parse_arg(
      arg,
      target_mpp=0.5,
      patch_size=256,
      min_tissue_fraction=0.25,
      mpp_tolerance=0.1,
      jpeg_quality=90,
      passthrough=True,
      batch_patches=256,
      block_patches=16,
      slides_per_shard=16,
  )
  config.lock()
  return config
