r"""PathFLIP alignment with the paper's sizes and hyperparameters (stage "align").

  python -m pathflip_jax.train --config configs/pathflip_paper.py:features_dir=F,tokenizer=T \
      --workdir W

Expects CONCH v1 patch features (512-d, 256-px patches at 20x; data_prep/extract_features.py with
``preset=conch`` weights, or data_prep/import_features.py for TRIDENT/CLAM output) whose
``slides.jsonl`` carries ``caption``, ``split`` and the label column, and a SentencePiece
tokenizer (``tokenizer=``; e.g. data_prep/train_tokenizer.py on your reports).

From the paper (DESIGN.md section 2): BERT-base-sized Q-Former (12 layers, width 768, 12 heads,
cross-attention every 2nd layer, 8 queries), 512 -> 768 feature projection, 256-d joint space,
2-layer slide-context Transformer (d=256, 8 heads) with 2-D region positions, 8-head
text-conditioned region attention; regions of 16 x 16 patches, 24 regions and 8 subcaptions of
1-3 sentences per slide; slide InfoNCE with tau 0.1 and label smoothing 0.1 plus the region
sigmoid loss (scale initialised at log(1/0.07)); AdamW, weight decay 0.05, lr 1e-4, 200 warm-up
steps, cosine decay to 5e-6; bf16 compute; 8 slides per device; caption 384 / subcaption 192
tokens. ``total_steps`` is not in the paper's text: set it for your cohort (default 20000).

Parameter count (tests/test_pathflip.py builds it with nnx.eval_shape, BERT-base vocabulary of
30522): about 180 M, in the range of BLIP-2's BERT-base Q-Former (188 M).
"""

import jax

from pathflip_jax import config_args


def get_config(arg: str | None = None):
  args = config_args.parse_arg(
      arg, features_dir="", manifest="", captions="", tokenizer="", total_steps=20000,
      per_device_batch=8,
      workers=4, seed=0, log_steps=500, eval_split="val", label_key="diagnosis",
      class_names="", slide_loss=True, region_loss=True, region_attention=True,
      dtype="bfloat16")
  config = config_args.ml_collections.ConfigDict()
  config.stage = "align"
  config.seed = args.seed
  config.features_dir = args.features_dir
  # "": captions, labels and split come from the feature directory's slides.jsonl.
  config.manifest = args.manifest
  config.captions = args.captions
  config.label_key = args.label_key
  # Class names (for zero-shot evaluation) as "a;b;c"; empty: no zero-shot evaluator.
  config.class_names = [c for c in args.class_names.split(";") if c]
  config.tokenizer = args.tokenizer
  config.vocab_size = 32000           # only when tokenizer="" trains one on the captions
  config.tokenizer_type = "unigram"
  config.dtype = args.dtype

  config.data = dict(region_patches=16, num_regions=24, eval_num_regions=256,
                     num_subcaptions=8, max_sentences=3, caption_len=384, subcaption_len=192,
                     buckets=(1024, 4096, 16384, 32768), max_patches=32768, patch_dropout=0.0)
  config.model = dict(
      qformer=dict(width=768, depth=12, num_heads=12, mlp_ratio=4.0, num_queries=8,
                   cross_attention_every=2, kv_chunk=2048, max_text_len=512),
      embed_dim=256, context_depth=2, context_heads=8, region_heads=8)
  config.slide_loss = args.slide_loss
  config.region_loss = args.region_loss
  config.region_attention = args.region_attention
  config.loss = dict(slide_weight=1.0, region_weight=1.0, temperature=0.1, label_smoothing=0.1)

  config.total_steps = args.total_steps
  config.batch_size = args.per_device_batch * jax.device_count()
  config.optim = dict(optimizer="adamw", lr=1e-4, schedule="cosine", warmup_steps=200,
                      end_lr=5e-6, weight_decay=0.05, grad_clip_norm=1.0)
  config.mesh = dict(data=-1, fsdp=1, model=1)
  config.input = dict(worker_count=args.workers, worker_buffer_size=2)
  config.log_steps = args.log_steps
  config.progress_seconds = 30.0
  config.checkpoint = dict(every=args.log_steps, keep=3, best_metric="", best_mode="max",
                           async_save=True)
  config.evals = dict(retrieval=dict(type="slide_retrieval", split=args.eval_split))
  if config.class_names:
    config.evals.zero_shot = dict(type="slide_zero_shot", split=args.eval_split, score="slide")
  config.resume = ""
  config.model_init = ""
  config.model_init_include = (".*",)
  config.debug = dict(nan_at_step=0)
  config.lock()
  return config
