r"""Instruction tuning on the demo cohort (stage "instruct"): captions and answers from a slide.

After configs/pathflip_demo.py (``runs/demo/align``; its docstring has the steps before):

  python -m pathflip_jax.train --config configs/pathflip_instruct_demo.py --workdir W

The align run is loaded and frozen; it encodes each slide once into a slide token and up to 64
region tokens. A small Gemma-style decoder (4 layers, width 128, multi-query attention, local
and global layers; a 1000-piece tokenizer trained on the training split's prompts and answers)
and the linear projector are trained from scratch on the training split's captions ("Describe
the slide.") and questions (the cohort's questions.csv), the loss on answer tokens only, the
multiple-choice options shuffled every epoch.

Args (``--config configs/pathflip_instruct_demo.py:key=value,...``): ``align_workdir``
(runs/demo/align), ``features_dir`` ("" = the align run's), ``questions``
(runs/demo/cohort/questions.csv), ``total_steps``, ``batch_size``, ``lr``, ``size`` (``demo``, or
``test``: a tiny decoder for the test suite), ``seed``, ``eval_split`` (``test``),
``answer_format`` (``text``: "fat"; ``letter_text``: "B. fat"; ``letter``), ``lora_rank`` (0: the whole
decoder trains; > 0: LoRA adapters and the projector only), ``workers``, ``caption_tokens``
and ``answer_tokens`` (longest generated caption / answer in evaluation), ``region_dropout``
(fraction of region tokens dropped per training example), ``slide_dropout`` (chance that a
training example shows the regions without the slide token), ``flip`` (1: mirror training
examples, region positions and location words together), ``visual_noise`` (Gaussian noise on
training visual tokens, in units of each token's RMS) and ``truth_tokens`` ("", or the demo cohort
directory: a diagnostic that replaces every visual token by its region's true tissue fractions,
to measure the decoder's ceiling from perfect visual tokens; docs/experiments/instruct.md).

Measured (default 48-slide cohort, seed 0, after the seed-0 align run; 2 CPU cores; 49-54 s
with evaluations on a fast 2-core machine). Test split, 13 slides, 59 multiple-choice questions:
accuracy of the generated answer 0.64, of the most likely option 0.68 (best single letter 0.25);
per category presence 0.91, absence 0.67, size 0.54, diagnosis 0.85, location 0.31 (chance
0.25). Captions BLEU-1 0.57, BLEU-4 0.40, CIDEr-D 0.59 (a random training caption: 0.55, 0.36,
0.27). ``python -m pathflip_jax.quickstart --seed 1`` and ``--seed 2`` (other cohorts, every
stage) give multiple-choice accuracy 0.57 and 0.72: 13 slides per cohort make single numbers
coarse. The ceiling of these questions (an oracle that
knows each tiled patch's exact tissue composition, ``python -m data_prep.demo_vqa_oracle``) is
0.90 on the seed-0 test split (location 0.69, size 0.85, the other categories 1.00); a patch
probe on the same rules (``--features``: a logistic regression trained on every training patch's
tissue label) scores 0.61 there, 0.73 on the 960-step patch encoder's features. With
``truth_tokens`` (each region token its region's true tissue fractions) the decoder scores 0.65 /
0.69 / 0.72 on the test splits of ``quickstart --seed 10 / 11 / 12`` (location 0.40 / 0.25 / 0.30),
against 0.49 / 0.72 / 0.57 from the align run's tokens: below 0.75 even from perfect tokens.
"""

from pathflip_jax import config_args


def get_config(arg: str | None = None):
  args = config_args.parse_arg(
      arg, align_workdir="runs/demo/align", features_dir="", questions="runs/demo/cohort/questions.csv",
      total_steps=600, batch_size=8, lr=1e-3, size="demo", seed=0, eval_split="test",
      answer_format="text", lora_rank=0, workers=0, log_steps=200, caption_tokens=256,
      answer_tokens=24, region_dropout=0.1, slide_dropout=0.0, flip=False,
      visual_noise=0.0, truth_tokens="")
  config = config_args.ml_collections.ConfigDict()
  config.stage = "instruct"
  config.seed = args.seed
  config.align_workdir = args.align_workdir
  config.features_dir = args.features_dir
  config.questions = args.questions
  config.truth_tokens = args.truth_tokens
  config.caption_prompt = "Describe the slide."
  config.tokenizer = ""
  config.vocab_size = 1000
  config.tokenizer_type = "bpe"
  config.dtype = "float32"
  config.encode_batch_size = 8
  config.template = dict(prompt="<image>\nQuestion: {question}\nAnswer:", answer_suffix="",
                         option_format="\n{letter}. {text}", choice_instruction="",
                         answer_format=args.answer_format)
  config.data = dict(max_len=256, max_visual=65, shuffle_options=True,
                     region_dropout=args.region_dropout, slide_dropout=args.slide_dropout,
                     flip=bool(args.flip),
                     visual_noise=args.visual_noise)
  config.position_frequencies = 4
  if args.size == "demo":
    config.decoder = dict(variant="demo", init="", overrides=dict(
        width=128, head_dim=32, mlp_width=512, max_len=512))
  elif args.size == "test":
    config.decoder = dict(variant="tiny", init="",
                          overrides=dict(max_len=512, sliding_window=64))
  else:
    raise ValueError(f"config arg size={args.size!r}: expected 'demo' or 'test'")
  config.lora = dict(rank=args.lora_rank, alpha=2.0 * max(args.lora_rank, 1), dropout=0.05,
                     targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                              "down_proj"))

  config.total_steps = args.total_steps
  config.batch_size = args.batch_size
  config.optim = dict(optimizer="adamw", lr=args.lr, schedule="cosine",
                      warmup_steps=min(50, args.total_steps // 10), end_lr=args.lr * 0.05,
                      weight_decay=0.05, grad_clip_norm=1.0)
  if args.lora_rank:
    config.optim.trainable = ("lora", "projector")
  config.mesh = dict(data=-1, fsdp=1, model=1)
  config.input = dict(worker_count=args.workers, worker_buffer_size=4)
  config.log_steps = args.log_steps
  config.progress_seconds = 10.0
  config.checkpoint = dict(every=args.log_steps, keep=2, best_metric="", best_mode="max",
                           async_save=True)
  # eval_split="": no evaluators (e.g. a run that is evaluated later, or a smoke test).
  config.evals = {} if not args.eval_split else dict(
      captioning=dict(type="captioning", split=args.eval_split, batch_size=8,
                      max_new_tokens=args.caption_tokens, every=args.total_steps),
      vqa=dict(type="vqa", split=args.eval_split, batch_size=8, every=args.total_steps,
               max_new_tokens=args.answer_tokens, description_tokens=args.caption_tokens),
  )
  config.resume = ""
  config.model_init = ""
  config.model_init_include = (".*",)
  config.debug = dict(nan_at_step=0)
  config.lock()
  return config
