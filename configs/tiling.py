"""Tiling job defaults: 256-px patches at 0.5 µm/px ("20x"), as in the PathFLIP paper.

Launch (the config is optional; flags such as --target_mpp override it):

  python -m data_prep.tile_slides --manifest slides.jsonl --output_dir runs/patches \
      --config configs/tiling.py:target_mpp=0.5,patch_size=256

Expected on tests/testdata/cmu_small_region.svs (Aperio, 2220x2967 px at 0.499 µm/px, one
level): level 0 read as is (within the 10% mpp tolerance), an 8x11 grid of 256-px patches of
which 36 hold >= 25% tissue, written to one shard; tiling.png and tissue GeoJSON per slide.
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
