r"""Patch-text pretraining of the demo's patch encoder (stage "patch_clip").

Pipeline and command (2 CPU cores; ``W`` is the workdir):

  python -m data_prep.make_demo_cohort --output_dir runs/demo/cohort
  python -m data_prep.tile_slides --manifest runs/demo/cohort/manifest.jsonl \
      --output_dir runs/demo/patches
  python -m pathflip_jax.train --config configs/patch_clip_demo.py --workdir W
  python -m data_prep.extract_features --patches runs/demo/patches \
      --output_dir runs/demo/features --config configs/extract_features.py:checkpoint=W

Args (``--config configs/patch_clip_demo.py:key=value,...``): ``cohort_dir``, ``patches_dir``
(defaults: runs/demo/cohort and runs/demo/patches), ``total_steps``, ``batch_size``, ``lr``,
``workers``, ``size`` (``demo`` or ``test``: a tiny model for the test suite), ``eval_split``
(``val``; ``test`` for the held-out numbers), ``tissue_negatives`` (True; False: two sentences that
describe the same tissue type are no negatives for each other's patches, what ``quickstart --joint``
trains its 1920-step encoder with; docs/experiments/localization.md, "Same-tissue sentences are no
negatives").

A ViT (224-px input: the 256-px, 0.5 µm/px patches cropped and resized; 32-px tokens, 49 of
them plus a class token; width 128, depth 3) and a 1-layer text Transformer learn from each tissue
patch of the cohort's train split paired with the caption sentence of the region under it
(symmetric InfoNCE; patches that share a sentence are all positives; the patches of small regions
are repeated so that every sentence has >= 8 per epoch). Augmentation: random crops, 90-degree
rotations, flips, stain jitter in optical density and occasional grayscale, so that regions are
told apart by tissue rather than by their slide's stain. Evaluated on the val split: zero-shot
tissue type from prompts, and a linear probe of the ViT features beside the same probe on colour
means.

Expected (default 48-slide cohort, seed 0; measured on 2 CPU cores: 9 min 20 s wall in all,
~0.55 steps/s at batch 64): val split, 230 patches of one tissue type (>= 75 % of their tissue):
  linear probe accuracy 0.913 (balanced 0.607); same probe on colour means 0.839 (balanced 0.463);
  majority class 0.509
  zero-shot from prompts: balanced accuracy 0.734 (chance 0.20), accuracy 0.457
Benign glands are the hard class for the probe (1 of 12 val patches right): they share stroma's
pink; the class token only starts to separate them late in the run. With ``total_steps=960`` (4 min
18 s on a later 2-core machine, against ~1 min for 240 there): linear probe 0.983 (balanced 0.97),
zero-shot balanced accuracy 0.78 (accuracy 0.84), and the encoder's own text-prompted lesion
localization 0.95 on the test split (0.79 at 240 steps). PathFLIP trained on those features does not
localize better (README, "Heatmaps, localization and evaluation"), so the quickstart keeps 240. With
``total_steps=1920`` (``quickstart --joint``) zero-shot balanced accuracy is 0.685 on the val splits
of seeds 14 and 15, and 0.74-1.00 on eight cohorts with ``tissue_negatives=False`` (0.983 and 0.953
on seeds 14 and 15; docs/experiments/localization.md, "Same-tissue sentences are no negatives").
"""

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
      arg, cohort_dir="runs/demo/cohort", patches_dir="runs/demo/patches", total_steps=240,
      batch_size=64, lr=1e-3, workers=1, size="demo", seed=0, log_steps=120, eval_split="val",
      tissue_negatives=True)
  config = config_args.ml_collections.ConfigDict()
  config.stage = "patch_clip"
  config.seed = args.seed
  config.cohort_dir = args.cohort_dir
  config.patches_dir = args.patches_dir
  config.tokenizer = ""                 # "" trains a BPE SentencePiece model into the workdir
  config.vocab_size = 1000
  config.tokenizer_type = "bpe"
  config.text_len = 32
  # Patches of one tissue type: >= 75 % of their tissue pixels (glass aside) have the majority
  # type. Mixed patches have no single right label (or sentence).
  config.min_purity = 0.75
  config.min_patches_per_text = 8       # repeat the patches of small regions (train_source)
  config.tissue_negatives = bool(args.tissue_negatives)

  config.augment = dict(min_crop=0.8, stain_jitter=0.25, grayscale_prob=0.2)
  if args.size == "demo":
    config.model = dict(vision_variant="vit_tiny_test",
                        vision_overrides=dict(image_size=224, patch_size=32, width=128, depth=3,
                                              num_heads=4, pool="cls", class_token=True),
                        text_width=128, text_depth=1, text_heads=4, embed_dim=128)
  elif args.size == "test":
    config.model = dict(vision_variant="vit_tiny_test",
                        vision_overrides=dict(image_size=32, patch_size=8, width=32, depth=1,
                                              num_heads=2, pool="mean", class_token=False),
                        text_width=32, text_depth=1, text_heads=2, embed_dim=32)
  else:
    raise ValueError(f"config arg size={args.size!r}: expected 'demo' or 'test'")

  config.total_steps = args.total_steps
  config.batch_size = args.batch_size
  config.optim = dict(optimizer="adamw", lr=args.lr, schedule="cosine",
                      warmup_steps=min(50, args.total_steps // 10), end_lr=0.0,
                      weight_decay=0.05, grad_clip_norm=5.0)
  config.mesh = dict(data=-1, fsdp=1, model=1)
  config.input = dict(worker_count=args.workers, worker_buffer_size=4)
  config.log_steps = args.log_steps
  config.progress_seconds = 10.0
  config.checkpoint = dict(every=args.log_steps, keep=2, best_metric="", best_mode="max",
                           async_save=True)
  config.evals = dict(
      zero_shot=dict(type="patch_zero_shot", split=args.eval_split, prompts=PROMPTS),
      linear_probe=dict(type="patch_linear_probe", split=args.eval_split, train_split="train"),
  )
  config.resume = ""
  config.model_init = ""
  config.model_init_include = (".*",)
  config.debug = dict(nan_at_step=0)
  config.lock()
  return config
