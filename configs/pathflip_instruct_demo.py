r"""Instruction tuning on the demo cohort (stage "instruct"): captions and answers from a slide.

  python -m pathflip_jax.train --workdir W/instruct --config \
      configs/pathflip_instruct_demo.py:align_workdir=W/align,questions=W/cohort/questions.csv

The align run (configs/pathflip_demo.py) is loaded and frozen; it encodes each slide once into a
slide token and up to 64 region tokens. A small Gemma-style decoder (4 layers, width 128,
multi-query attention, local and global layers; a 1000-piece tokenizer trained on the training
split's prompts and answers) and the linear projector are trained from scratch on the training
split's captions ("Describe the slide.") and questions (the cohort's questions.csv), the loss on
answer tokens only, the multiple-choice options shuffled every epoch.

Args (``:key=value,...``): ``align_workdir``, ``features_dir`` ("": the align run's),
``questions``, ``eval_split`` (``test``; "": no evaluators), ``lora_rank`` (0: the whole decoder
trains; > 0: LoRA adapters and the projector only) and ``size`` (``demo``, or ``test``: a tiny
decoder and a 4-step run for the test suite).

Expected: docs/results.md, "Captioning" and "Visual question answering".
"""

from configs import common
from pathflip_jax import config_args

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def get_config(arg: str | None = None):
  args = config_args.parse_arg(
      arg, align_workdir="runs/quickstart/align", features_dir="",
      questions="runs/quickstart/cohort/questions.csv", eval_split="test", lora_rank=0, size="demo")
  config = common.instruct_stage(
      config_args.ml_collections.ConfigDict(), align_workdir=args.align_workdir,
      features_dir=args.features_dir, questions=args.questions, vocab_size=1000,
      dtype="float32")
  config.template = dict(prompt="<image>\nQuestion: {question}\nAnswer:", answer_suffix="",
                         option_format="\n{letter}. {text}", choice_instruction="",
                         answer_format="text")
  config.data = dict(max_len=256, max_visual=65, shuffle_options=True, region_dropout=0.1)
  config.position_frequencies = 4
  if args.size == "demo":
    config.decoder = dict(variant="demo", init="", overrides=dict(
        width=128, head_dim=32, mlp_width=512, max_len=512))
    steps = dict(total_steps=600, log_steps=200)
    caption_tokens, answer_tokens = 256, 24
  elif args.size == "test":
    config.decoder = dict(variant="tiny", init="",
                          overrides=dict(max_len=512, sliding_window=64))
    steps = dict(total_steps=4, log_steps=4)
    caption_tokens, answer_tokens = 16, 4
  else:
    raise ValueError(f"config arg size={args.size!r}: expected 'demo' or 'test'")
  config.lora = dict(rank=args.lora_rank, alpha=2.0 * max(args.lora_rank, 1), dropout=0.05,
                     targets=LORA_TARGETS)

  common.trainer(config, **steps, batch_size=8, lr=1e-3,
                 warmup_steps=min(50, steps["total_steps"] // 10), end_lr_fraction=0.05,
                 weight_decay=0.05, grad_clip_norm=1.0)
  if args.lora_rank:
    config.optim.trainable = ("lora", "projector")
  # Generation is slow on CPU: the evaluators run once, at the end of the run.
  end = config.get_ref("total_steps")
  config.evals = {} if not args.eval_split else dict(
      captioning=dict(type="captioning", split=args.eval_split, batch_size=8,
                      max_new_tokens=caption_tokens, every=end),
      vqa=dict(type="vqa", split=args.eval_split, batch_size=8, every=end,
               max_new_tokens=answer_tokens, description_tokens=caption_tokens),
  )
  config.lock()
  return config
