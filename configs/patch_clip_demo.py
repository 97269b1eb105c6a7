r"""Patch-text pretraining of the demo's patch encoder (stage "patch_clip"), the stand-in for CONCH.

  python -m pathflip_jax.train --workdir W/patch_clip \
      --config configs/patch_clip_demo.py:cohort_dir=W/cohort,patches_dir=W/patches
  python -m data_prep.extract_features --patches W/patches --output_dir W/features \
      --config configs/extract_features.py:checkpoint=W/patch_clip

A ViT (224-px input: the 256-px, 0.5 µm/px patches cropped and resized; 32-px tokens, 49 of them
plus a class token; width 128, depth 3) and a 1-layer text Transformer learn from each tissue
patch of the cohort's train split paired with the caption sentence of the region under it
(symmetric InfoNCE; patches that share a sentence are all positives; the patches of small
regions are repeated so that every sentence has at least 8 per epoch). Augmentation: random
crops, 90-degree rotations, flips, stain jitter in optical density and occasional grayscale, so
that regions are told apart by tissue rather than by their slide's stain. Evaluated on the val
split: zero-shot tissue type from prompts, and a linear probe of the ViT features beside the same
probe on colour means.

Args (``:key=value,...``): ``cohort_dir``, ``patches_dir`` (the demo cohort and its tiles),
``eval_split`` (``val``; ``test`` for held-out numbers) and ``size`` (``demo``; ``study``, the
same model for the study cohort of ``quickstart --size study``; or ``test``, a tiny model and a
4-step run for the test suite).

Expected: docs/results.md, "Patch encoder (val patches)".
"""

from configs import common
from pathflip_jax import config_args

PROMPTS = {
    "stroma": ["fibrous stroma", "collagenous stroma", "stromal tissue"],
    "tumour": ["invasive carcinoma", "sheets of tumour cells", "nests of malignant cells"],
    "benign glands": ["benign glands", "normal glandular structures", "well-formed ducts"],
    "lymphocytes": ["dense lymphocytes", "a lymphoid aggregate", "a lymphocytic infiltrate"],
    "necrosis": ["tumour necrosis", "an area of necrosis", "necrotic debris"],
    "fat": ["adipose tissue", "mature fat", "adipocytes"],
}


def get_config(arg: str | None = None):
  args = config_args.parse_arg(
      arg, cohort_dir="runs/quickstart/cohort", patches_dir="runs/quickstart/patches",
      eval_split="val", size="demo")
  config = config_args.ml_collections.ConfigDict()
  config.stage = "patch_clip"
  config.seed = 0
  config.cohort_dir = args.cohort_dir
  config.patches_dir = args.patches_dir
  config.tokenizer = ""                 # "" trains a BPE SentencePiece model into the workdir
  config.vocab_size = 1000
  config.tokenizer_type = "bpe"
  config.text_len = 32
  config.min_purity = 0.75
  config.min_patches_per_text = 8       # repeat the patches of small regions (train_source)

  config.augment = dict(min_crop=0.8, stain_jitter=0.25, grayscale_prob=0.2)
  if args.size in ("demo", "study"):   # study: the larger cohort, the same encoder
    config.model = dict(vision_variant="vit_tiny_test",
                        vision_overrides=dict(image_size=224, patch_size=32, width=128, depth=3,
                                              num_heads=4, pool="cls", class_token=True),
                        text_width=128, text_depth=1, text_heads=4, embed_dim=128)
    # The study cohort's val split is large (~10k patches): evaluated once, at the end.
    steps = dict(total_steps=240, batch_size=64, log_steps=120 if args.size == "demo" else 240)
  elif args.size == "test":
    config.model = dict(vision_variant="vit_tiny_test",
                        vision_overrides=dict(image_size=32, patch_size=8, width=32, depth=1,
                                              num_heads=2, pool="mean", class_token=False),
                        text_width=32, text_depth=1, text_heads=2, embed_dim=32)
    steps = dict(total_steps=4, batch_size=16, log_steps=4)
  else:
    raise ValueError(f"config arg size={args.size!r}: expected 'demo', 'study' or 'test'")

  common.trainer(config, **steps, lr=1e-3, warmup_steps=min(50, steps["total_steps"] // 10),
                 end_lr_fraction=0.0, weight_decay=0.05, grad_clip_norm=5.0, workers=1)
  config.evals = dict(
      zero_shot=dict(type="patch_zero_shot", split=args.eval_split, prompts=PROMPTS),
      linear_probe=dict(type="patch_linear_probe", split=args.eval_split, train_split="train"),
  )
  config.lock()
  return config
