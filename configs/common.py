"""The trainer settings every stage's config shares: schedule, optimizer, mesh, input workers,
logging, checkpoints, resume (the tail of a big_vision config).

``total_steps``, ``log_steps`` and ``lr`` are ml_collections FieldReferences:
``--config.log_steps=50`` moves the checkpoint interval with it, ``--config.optim.lr=1e-3`` the
final learning rate (``end_lr_fraction`` of it), and ``--config.total_steps`` what a config ties
to the run's end (``config.get_ref("total_steps")``, e.g. evaluators that run once, at the end).
"""

from __future__ import annotations

import ml_collections


def trainer(config: ml_collections.ConfigDict, *, total_steps: int, batch_size: int, lr: float,
            warmup_steps: int, end_lr_fraction: float, weight_decay: float,
            grad_clip_norm: float, log_steps: int, workers: int = 0, fsdp: int = 1,
            worker_buffer_size: int = 4, keep: int = 2, progress_seconds: float = 10.0
            ) -> ml_collections.ConfigDict:
  """Adds the shared trainer fields to ``config`` (in place) and returns it.

  AdamW with a linear warmup and cosine decay to ``end_lr_fraction * lr``; a ``(data, fsdp,
  model)`` mesh with data parallelism over every device left; a checkpoint (the last ``keep``
  kept) and the training metrics every ``log_steps``.
  """
  lr_ref = ml_collections.FieldReference(float(lr))
  log_ref = ml_collections.FieldReference(int(log_steps))
  config.total_steps = ml_collections.FieldReference(int(total_steps))
  config.batch_size = batch_size
  config.optim = dict(optimizer="adamw", lr=lr_ref, schedule="cosine", warmup_steps=warmup_steps,
                      end_lr=lr_ref * end_lr_fraction, weight_decay=weight_decay,
                      grad_clip_norm=grad_clip_norm)
  config.mesh = dict(data=-1, fsdp=fsdp, model=1)
  config.input = dict(worker_count=workers, worker_buffer_size=worker_buffer_size)
  config.log_steps = log_ref
  config.progress_seconds = progress_seconds
  # best_metric: an evaluator metric ("<evaluator>/<metric>") whose best checkpoints are kept in
  # W/best; use_best: that checkpoint is the run's model (early stopping on a validation split).
  config.checkpoint = dict(every=log_ref, keep=keep, best_metric="", best_mode="max",
                           use_best=False, async_save=True)
  # Resume order: W's own checkpoint, then another run's (resume), then parameters copied from
  # another run (model_init, those matching model_init_include), then scratch.
  config.resume = ""
  config.model_init = ""
  config.model_init_include = (".*",)
  config.debug = dict(nan_at_step=0)   # a test hook: the loss turns NaN at this step
  return config


def align_stage(config: ml_collections.ConfigDict, *, features_dir: str, manifest: str,
                captions: str, tokenizer: str, class_names: list[str], vocab_size: int,
                tokenizer_type: str, dtype: str) -> ml_collections.ConfigDict:
  """Adds the fields of a stage "align" config that are not sizes: its data, text, the paper's
  ablation switches and losses (DESIGN.md sections 2.5 and 2.7)."""
  config.stage = "align"
  config.seed = 0
  config.features_dir = features_dir
  # "": captions, labels and split come from the feature directory's slides.jsonl.
  config.manifest = manifest
  config.captions = captions              # "": the caption's sentences
  config.label_key = "diagnosis"
  config.class_names = list(class_names)  # for zero-shot evaluation
  config.tokenizer = tokenizer            # "": trained on the training split's text
  config.vocab_size = vocab_size
  config.tokenizer_type = tokenizer_type
  config.dtype = dtype                    # compute dtype; parameters stay float32
  # A BERT-family checkpoint directory the Q-Former's text branch and self-attention start
  # from (post-norm Q-Former of its sizes: configs/pathflip_paper.py's bert= arg); "": none.
  config.bert = ""
  config.slide_loss = True
  config.region_loss = True
  config.region_attention = True          # False: the mean of the regions
  config.region_qformer = True            # False: the projected mean of a region's features
  config.slide_qformer = True             # False: the mean of the region tokens
  config.loss = dict(slide_weight=1.0, region_weight=1.0, temperature=0.1, label_smoothing=0.1)
  return config


def instruct_stage(config: ml_collections.ConfigDict, *, align_workdir: str, features_dir: str,
                   questions: str, vocab_size: int, dtype: str) -> ml_collections.ConfigDict:
  """Adds the data fields of a stage "instruct" config: the frozen align run it reads and the
  instructions (captions and questions) it trains on."""
  config.stage = "instruct"
  config.seed = 0
  config.align_workdir = align_workdir
  config.features_dir = features_dir      # "": the align run's
  config.questions = questions
  config.caption_prompt = "Describe the slide."
  config.tokenizer = ""                   # "": trained on the training split (or the LM's own)
  config.vocab_size = vocab_size
  config.tokenizer_type = "bpe"
  config.chat = False                     # True: template.prompt is the user turn of the
                                          # imported tokenizer's chat template
  config.dtype = dtype
  config.encode_batch_size = 8            # slides per batch when the align run encodes them
  return config
