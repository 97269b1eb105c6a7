r"""Instruction tuning with a real Gemma checkpoint (stage "instruct"): the recipe.

  python -m pathflip_jax.train --config \
      configs/pathflip_instruct_gemma.py:gemma=/path/to/gemma-3-1b-it,align_workdir=runs/demo/align \
      --workdir W

``gemma`` is a local Hugging Face-format checkpoint directory (``config.json``,
``model.safetensors`` or shards, ``tokenizer.model``) of Gemma 1, 2 or 3 (text); nothing is
downloaded. ``convert/gemma.py`` imports it (its test checks logits and greedy generations
against ``transformers``). The prompt follows Gemma's chat template, with the slide's visual
tokens at ``<image>`` in the user turn; the answer ends with ``<end_of_turn>``, which also stops
generation. The decoder stays frozen: LoRA adapters (rank 16, alpha 32, dropout 0.05) on every
attention and MLP projection and the projector train (``optim.trainable``); ``lora_rank=0``
trains the whole decoder instead. Export afterwards with ``convert/gemma.py`` (``save_gemma``
after ``decoder.merge_lora``: a merged checkpoint that transformers and vLLM load) or the
adapters alone in PEFT's layout.

Args: ``gemma`` (required), ``align_workdir``, ``features_dir``, ``questions``, ``total_steps``
(2000), ``batch_size`` (8 slides' turns), ``lr`` (2e-4), ``lora_rank`` (16), ``dtype``
(bfloat16 compute on GPU/TPU; float32 on CPU), ``fsdp`` (-1: parameters and optimizer state
split over every device, for models that do not fit one), ``eval_split``, ``seed``,
``max_len``, ``caption_tokens`` and ``answer_tokens`` (longest generated caption / answer).

Sizes: Gemma 3 1B needs ~2 GB for bf16 weights plus activations; Gemma 2 2B and Gemma 3 4B fit
one 16 GB accelerator with LoRA. On 2 CPU cores a 1B model trains at minutes per step: use the
demo config there. The test suite runs this recipe on a tiny random Gemma written by
``save_gemma`` (tests/test_instruct.py).
"""

from pathflip_jax import config_args


def get_config(arg: str | None = None):
  args = config_args.parse_arg(
      arg, gemma="", align_workdir="runs/demo/align", features_dir="",
      questions="runs/demo/cohort/questions.csv", total_steps=2000, batch_size=8, lr=2e-4,
      lora_rank=16, dtype="bfloat16", fsdp=1, eval_split="test", seed=0, log_steps=500,
      max_len=512, workers=0, caption_tokens=256, answer_tokens=24)
  if not args.gemma:
    raise ValueError("configs/pathflip_instruct_gemma.py needs gemma=<local checkpoint "
                     "directory> (Hugging Face format: config.json, *.safetensors, "
                     "tokenizer.model)")
  config = config_args.ml_collections.ConfigDict()
  config.stage = "instruct"
  config.seed = args.seed
  config.align_workdir = args.align_workdir
  config.features_dir = args.features_dir
  config.questions = args.questions
  config.caption_prompt = "Describe the slide."
  config.tokenizer = ""                 # the checkpoint's tokenizer.model
  config.vocab_size = 0
  config.tokenizer_type = "bpe"
  config.dtype = args.dtype
  config.encode_batch_size = 8
  config.template = dict(
      prompt="<start_of_turn>user\n<image>\n{question}<end_of_turn>\n<start_of_turn>model\n",
      answer_suffix="<end_of_turn>", option_format="\n{letter}. {text}",
      choice_instruction="\nAnswer with the option's letter from the given choices directly.",
      answer_format="letter")
  config.data = dict(max_len=args.max_len, max_visual=257, shuffle_options=True,
                     region_dropout=0.0)
  config.position_frequencies = 4
  config.decoder = dict(variant="", init=args.gemma, overrides={})
  config.lora = dict(rank=args.lora_rank, alpha=2.0 * max(args.lora_rank, 1), dropout=0.05,
                     targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                              "down_proj"))

  config.total_steps = args.total_steps
  config.batch_size = args.batch_size
  config.optim = dict(optimizer="adamw", lr=args.lr, schedule="cosine",
                      warmup_steps=min(100, args.total_steps // 10), end_lr=args.lr * 0.05,
                      weight_decay=0.0, grad_clip_norm=1.0)
  if args.lora_rank:
    config.optim.trainable = ("lora", "projector")
  config.mesh = dict(data=-1, fsdp=args.fsdp, model=1)
  config.input = dict(worker_count=args.workers, worker_buffer_size=4)
  config.log_steps = args.log_steps
  config.progress_seconds = 30.0
  config.checkpoint = dict(every=args.log_steps, keep=2, best_metric="", best_mode="max",
                           async_save=True)
  # eval_split="": no evaluators (e.g. a run that is evaluated later, or a smoke test).
  config.evals = {} if not args.eval_split else dict(
      captioning=dict(type="captioning", split=args.eval_split, batch_size=8,
                      max_new_tokens=args.caption_tokens),
      vqa=dict(type="vqa", split=args.eval_split, batch_size=8,
               max_new_tokens=args.answer_tokens, description_tokens=args.caption_tokens),
  )
  config.resume = ""
  config.model_init = ""
  config.model_init_include = (".*",)
  config.debug = dict(nan_at_step=0)
  config.lock()
  return config
