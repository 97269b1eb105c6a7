r"""PathFLIP alignment with the paper's sizes and hyperparameters (stage "align").

  python -m pathflip_jax.train --config configs/pathflip_paper.py:features_dir=F,tokenizer=T \
      --workdir W [--config.total_steps=20000] [--config.region_loss=False]

With a BERT-family checkpoint (as the paper's code starts its Q-Former from BioBERT /
Bio_ClinicalBERT, BLIP-2 style):

  python -m pathflip_jax.train --workdir W \
      --config configs/pathflip_paper.py:features_dir=F,bert=/models/Bio_ClinicalBERT

``bert=`` names a Hugging Face checkpoint directory (``config.json``, ``model.safetensors`` and
``vocab.txt`` or ``tokenizer.json``): the Q-Former becomes post-norm with the checkpoint's width,
depth, heads, feed-forward width, LayerNorm eps and position table; the tokenizer is its
WordPiece (unless ``tokenizer=`` names another, whose vocabulary must be the checkpoint's); and
a fresh run starts its text branch and self-attention from the weights (cross-attention, queries
and the rest from scratch; a resumed run keeps its own; pathflip_jax/convert/bert.py).

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

Args (``:key=value,...``): ``features_dir``, ``manifest``, ``captions``, ``tokenizer`` (paths, as
in configs/pathflip_demo.py), ``bert`` (a BERT checkpoint directory, above), ``eval_split``
(``val``), ``class_names`` ("a;b;c": adds the zero-shot evaluator) and ``per_device_batch`` (8:
the global batch is this times the devices).

Expected: no run at these sizes has been made here (no real cohort is available offline); the
demo-sized model's numbers are in docs/results.md.

Parameter count (tests/test_pathflip.py builds it with nnx.eval_shape, BERT-base vocabulary of
30522): about 180 M, in the range of BLIP-2's BERT-base Q-Former (188 M).
"""

import os

import jax

from configs import common
from pathflip_jax import config_args
from pathflip_jax.convert import bert as bert_lib

# QFormerConfig fields a BERT checkpoint fixes in config.model.qformer (vocab_size and pad_id
# come from the tokenizer, which is the checkpoint's WordPiece).
_BERT_FIELDS = ("width", "depth", "num_heads", "mlp_ratio", "max_text_len", "norm_eps",
                "norm_position")


def get_config(arg: str | None = None):
  args = config_args.parse_arg(
      arg, features_dir="", manifest="", captions="", tokenizer="", per_device_batch=8,
      eval_split="val", class_names="", bert="")
  # Class names (for zero-shot evaluation) as "a;b;c"; empty: no zero-shot evaluator.
  config = common.align_stage(
      config_args.ml_collections.ConfigDict(), features_dir=args.features_dir,
      manifest=args.manifest, captions=args.captions, tokenizer=args.tokenizer or args.bert,
      class_names=[c for c in args.class_names.split(";") if c], vocab_size=32000,
      tokenizer_type="unigram", dtype="bfloat16")

  config.data = dict(region_patches=16, num_regions=24, eval_num_regions=256,
                     num_subcaptions=8, max_sentences=3, caption_len=384, subcaption_len=192,
                     buckets=(1024, 4096, 16384, 32768), max_patches=32768, patch_dropout=0.0)
  config.model = dict(
      qformer=dict(width=768, depth=12, num_heads=12, mlp_ratio=4.0, num_queries=8,
                   cross_attention_every=2, kv_chunk=2048, max_text_len=512),
      embed_dim=256, context_depth=2, context_heads=8, region_heads=8)
  if args.bert:
    fields = bert_lib.qformer_fields(bert_lib.read_config(args.bert, "config arg bert"),
                                     os.path.join(args.bert, "config.json"))
    config.model.qformer.update({k: fields[k] for k in _BERT_FIELDS})
    config.bert = args.bert
  common.trainer(config, total_steps=20000, batch_size=args.per_device_batch * jax.device_count(),
                 lr=1e-4, warmup_steps=200, end_lr_fraction=0.05, weight_decay=0.05,
                 grad_clip_norm=1.0, log_steps=500, workers=4, worker_buffer_size=2, keep=3,
                 progress_seconds=30.0)
  config.evals = dict(retrieval=dict(type="slide_retrieval", split=args.eval_split))
  if config.class_names:
    config.evals.zero_shot = dict(type="slide_zero_shot", split=args.eval_split, score="slide")
  config.lock()
  return config
