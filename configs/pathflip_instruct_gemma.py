r"""Instruction tuning with a real Gemma checkpoint (stage "instruct"): the recipe.

  python -m pathflip_jax.train --config \
      configs/pathflip_instruct_gemma.py:gemma=/path/to/gemma-3-1b-it,align_workdir=W/align \
      --workdir W/instruct

``gemma`` is a local Hugging Face-format checkpoint directory (``config.json``,
``model.safetensors`` or shards, ``tokenizer.model``) of Gemma 1, 2 or 3 (text); nothing is
downloaded. ``convert/gemma.py`` imports it (its test checks logits and greedy generations
against ``transformers``). The prompt follows Gemma's chat template, with the slide's visual
tokens at ``<image>`` in the user turn; the answer ends with ``<end_of_turn>``, which also stops
generation. ``gemma`` may also name a Llama or Qwen3 directory (``tokenizer.json``;
``convert/llama.py``) or a Llama-architecture GGUF file (``convert/gguf.py``): then the prompt
is the user turn of the checkpoint's own chat template (``config.chat``). The decoder stays frozen: LoRA adapters (rank 16, alpha 32, dropout 0.05) on every
attention and MLP projection and the projector train (``optim.trainable``); ``lora_rank=0``
trains the whole decoder instead. Export afterwards with ``convert/gemma.py`` (``save_gemma``
after ``lora.merge_lora``: a merged checkpoint that transformers and vLLM load) or the
adapters alone in PEFT's layout.

Args: ``gemma`` (required), ``align_workdir``, ``features_dir``, ``questions``, ``eval_split``
and ``lora_rank`` (16; 0 trains the whole decoder). Everything else is a field: e.g.
``--config.dtype=float32`` on CPU (bfloat16 compute is for GPU/TPU), ``--config.mesh.fsdp=-1``
(parameters and optimizer state split over every device, for models that do not fit one),
``--config.total_steps``, ``--config.optim.lr``, ``--config.data.max_len``.

Sizes: Gemma 3 1B holds about 2 GB of bf16 weights; Gemma 2 2B and Gemma 3 4B fit one 16 GB
accelerator with LoRA. On 2 CPU cores use the demo config instead.

Expected: no run with real Gemma weights has been made here (none are available offline); the test
suite runs this recipe on a tiny random Gemma written by ``save_gemma`` (tests/test_instruct.py),
and the demo decoder's numbers are in docs/results.md.
"""

import json
import os

from configs import common
from configs.pathflip_instruct_demo import LORA_TARGETS
from pathflip_jax import config_args


def _is_gemma(path: str) -> bool:
  """Whether a checkpoint is Gemma's (its config.json's model_type); False for a GGUF file."""
  config_path = os.path.join(path, "config.json")
  if path.endswith(".gguf") or not os.path.isfile(config_path):
    return False   # a missing checkpoint is reported by the importer, naming the path
  with open(config_path, encoding="utf-8") as f:
    return str(json.load(f).get("model_type", "")).startswith("gemma")


def get_config(arg: str | None = None):
  args = config_args.parse_arg(
      arg, gemma="", align_workdir="runs/quickstart/align", features_dir="",
      questions="runs/quickstart/cohort/questions.csv", eval_split="test", lora_rank=16)
  if not args.gemma:
    raise ValueError("configs/pathflip_instruct_gemma.py needs gemma=<local checkpoint "
                     "directory> (Hugging Face format: config.json, *.safetensors, "
                     "tokenizer.model)")
  # The checkpoint's tokenizer.model: no vocabulary is trained.
  config = common.instruct_stage(
      config_args.ml_collections.ConfigDict(), align_workdir=args.align_workdir,
      features_dir=args.features_dir, questions=args.questions, vocab_size=0,
      dtype="bfloat16")
  config.template = dict(
      prompt="<start_of_turn>user\n<image>\n{question}<end_of_turn>\n<start_of_turn>model\n",
      answer_suffix="<end_of_turn>", option_format="\n{letter}. {text}",
      choice_instruction="\nAnswer with the option's letter from the given choices directly.",
      answer_format="letter")
  if not _is_gemma(args.gemma):
    config.chat = True
    config.template.update(prompt="<image>\n{question}", answer_suffix="")
  config.data = dict(max_len=512, max_visual=257, shuffle_options=True, region_dropout=0.0,
                     visual_tokens="slide")
  config.position_frequencies = 4
  config.decoder = dict(variant="", init=args.gemma, overrides={})
  config.lora = dict(rank=args.lora_rank, alpha=2.0 * max(args.lora_rank, 1), dropout=0.05,
                     targets=LORA_TARGETS)

  common.trainer(config, total_steps=2000, batch_size=8, lr=2e-4, warmup_steps=100,
                 end_lr_fraction=0.05, weight_decay=0.0, grad_clip_norm=1.0, log_steps=500,
                 progress_seconds=30.0)
  if args.lora_rank:
    config.optim.trainable = ("lora", "projector")
  config.evals = {} if not args.eval_split else dict(
      captioning=dict(type="captioning", split=args.eval_split, batch_size=8,
                      max_new_tokens=256, meteor=False),
      vqa=dict(type="vqa", split=args.eval_split, batch_size=8, max_new_tokens=24,
               description_tokens=256, shuffled_visual=True, question_only=""),
  )
  config.lock()
  return config
