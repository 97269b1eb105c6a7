"""Feature extraction: a frozen ViT patch encoder over patch shards -> per-slide feature shards.

Launch (defaults: ViT-S/16 with random weights, the demo's stand-in until an encoder is trained
or imported):

  python -m data_prep.extract_features --patches runs/quickstart/patches \
      --output_dir runs/quickstart/features --config configs/extract_features.py

With UNI weights (timm format, a local file; ViT-L/16 with layer scale, trained at 224 px, so
256-px patches are resized to 224 as TRIDENT does):

  python -m data_prep.extract_features --patches P --output_dir F \
      --config configs/extract_features.py:preset=uni,weights=/models/uni/pytorch_model.bin

With the demo's own patch encoder, trained by ``configs/patch_clip_demo.py`` in workdir W (its
ViT, input size and normalisation are read from W; patches are resized to the input size):

  python -m data_prep.extract_features --patches runs/quickstart/patches \
      --output_dir runs/quickstart/features --config configs/extract_features.py:checkpoint=W

Args (``key=value`` after the colon):
  checkpoint     a patch_clip training workdir: use its latest checkpoint's ViT
  preset         "" (use variant/...), "uni" (ViT-L/16, layer scale, 224 px, ImageNet stats)
  variant        vit_tiny_test | vit_small_patch16 | vit_base_patch16 | vit_large_patch16
  weights        timm-format state dict (.safetensors, .bin/.pth via torch weights_only); ""
                 means random initialisation from ``seed``
  weights_prefix key prefix to strip (e.g. "trunk." or "visual.trunk.")
  name           encoder name written into every record (default: the variant)
  image_size     encoder input size; 0 = the patch size (patches are resized when it differs)
  layer_scale    layer-scale init for random weights (0 = none); imported weights bring theirs
  num_registers  register tokens for random weights
  pool           "cls" or "mean"
  normalization  "imagenet" or "openai_clip" (CONCH)
  batch_size     patches per step over all devices (rounded up to a multiple of the devices)
  num_workers    grain processes decoding JPEG (0 = in the main process)
  dtype          "auto" (bfloat16 on GPU/TPU, float32 on CPU), "float32" or "bfloat16"
  slides_per_shard, max_shard_mb   a feature shard is committed when either is reached

Expected: one feature record of float16 features per tiled slide (384-d for ViT-S/16);
benchmarks/patch_encoder.py measures the throughput beside timm and a CLAM-style loop.
"""

from pathflip_jax import config_args

PRESETS = {
    "": {},
    "uni": dict(variant="vit_large_patch16", image_size=224, layer_scale=1e-5,
                normalization="imagenet", name="uni"),
}


def get_config(arg: str | None = None):
  preset = config_args.parse_arg(arg, preset="", **_defaults()) if arg else None
  defaults = _defaults()
  if preset is not None:
    if preset.preset not in PRESETS:
      raise ValueError(f"config arg 'preset': unknown preset {preset.preset!r}; known: "
                       f"{', '.join(p for p in PRESETS if p)}")
    defaults.update(PRESETS[preset.preset])
  config = config_args.parse_arg(_without_preset(arg), **defaults)
  config.lock()
  return config


def _defaults() -> dict:
  return dict(
      variant="vit_small_patch16",
      weights="",
      weights_prefix="",
      checkpoint="",
      name="",
      seed=0,
      image_size=0,
      layer_scale=0.0,
      num_registers=0,
      pool="cls",
      normalization="imagenet",
      batch_size=32,
      num_workers=2,
      dtype="auto",
      # Small shards: a killed run redoes at most one shard's slides.
      slides_per_shard=4,
      max_shard_mb=1024,
  )


def _without_preset(arg: str | None) -> str | None:
  if not arg:
    return arg
  return ",".join(item for item in arg.split(",") if not item.strip().startswith("preset="))
