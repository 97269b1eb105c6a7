"""Stage "instruct": captions and answers from a slide (DESIGN.md section 2.6).

The alignment model of a finished "align" run (``config.align_workdir``) is loaded and frozen. It
encodes every slide once, at start-up, into its visual tokens: the slide token (times
sqrt(width), to the scale of the region tokens) and the contextualised region tokens of the
evaluation example (the fullest ``eval_num_regions`` regions), each with its place on the slide.
Training then only runs the projector and the decoder (or its LoRA adapters,
``config.optim.trainable``), on

  captions   "Describe the slide." -> the slide's caption (every slide with one)
  questions  ``config.questions`` (SlideBench-style CSV, ``data/instructions.py``)

of the training split, with the loss on answer tokens only. The decoder is trained from scratch
with a tokenizer trained on the training split's text (``config.decoder.variant``), or imported
with its tokenizer (``config.decoder.init``): a Hugging Face Gemma, Llama or Qwen3 checkpoint
directory, or a Llama-architecture GGUF file. ``config.chat``: the prompt template is the user
turn, wrapped in the imported tokenizer's own chat template.

Config keys read here (see ``configs/pathflip_instruct_demo.py``): ``align_workdir``,
``features_dir`` (overrides the align run's), ``questions``, ``caption_prompt``, ``tokenizer``,
``vocab_size``, ``tokenizer_type``, ``template.*`` (``instructions.Template``), ``data.*``
(``instructions.SequenceConfig``), ``decoder.{variant, init, overrides}``, ``lora.{rank, alpha,
dropout, targets}`` (rank 0: none), ``position_frequencies``, ``dtype``, ``encode_batch_size``.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Any, Sequence

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from pathflip_jax import checkpointing, predict, sharding, storage, tokenizer as tokenizer_lib
from pathflip_jax.data import instructions as ins, regions as regions_lib
from pathflip_jax.evaluators import common
from pathflip_jax.models import decoder as decoder_lib, instruct, lora as lora_lib, pathflip
from pathflip_jax.models import sampling
from pathflip_jax.tasks import align

SPLITS = align.SPLITS


def relative_positions(cells_m2: np.ndarray, all_cells_n2: np.ndarray) -> np.ndarray:
  """Region grid cells -> centres in [0, 1]^2 relative to the bounding box of all cells."""
  low = all_cells_n2.min(axis=0)
  span = np.maximum(all_cells_n2.max(axis=0) - low + 1, 1)
  return ((cells_m2 - low + 0.5) / span).astype(np.float32)


def encode_visual_tokens(align_task: align.AlignTask, model: pathflip.PathFlip, mesh,
                         batch_size: int) -> dict[str, list[dict[str, np.ndarray]]]:
  """Per split, per slide: ``tokens`` [v, e] (slide token first) and ``positions`` [v, 3]
  (is_slide, x, y), valid regions only."""
  embed = common.SlideEmbeddings(align_task, mesh, batch_size)
  width = model.config.embed_dim
  out = {}
  for split in SPLITS:
    if not len(align_task.splits[split]):
      out[split] = []
      continue
    encoded = embed(model, split)
    examples = align_task.eval_examples(split)
    source = align_task.source(split)
    slides = []
    for i, example in enumerate(examples):
      element = source[i]
      slides.append(slide_visual_tokens(
          encoded["slide"][i], encoded["regions"][i], encoded["region_valid"][i],
          example["region_pos"], element["coords"], element["patch_size_level0"],
          align_task.example_config.region_patches, width))
    out[split] = slides
  return out


def slide_visual_tokens(slide_e: np.ndarray, regions_me: np.ndarray, region_valid_m: np.ndarray,
                        region_pos_m2: np.ndarray, coords_n2: np.ndarray,
                        patch_size_level0: float, region_patches: int, width: int
                        ) -> dict[str, np.ndarray]:
  """One slide's ``tokens`` [v, e] (the slide token, scaled to the region tokens' norm, then
  the valid regions) and ``positions`` [v, 3] (is_slide, x, y relative to the tissue)."""
  valid = np.asarray(region_valid_m, bool)
  grid, _ = regions_lib.group_patches(coords_n2, patch_size_level0, region_patches)
  xy = relative_positions(np.asarray(region_pos_m2)[valid], grid.cells)
  tokens = np.concatenate([np.asarray(slide_e)[None] * math.sqrt(width),
                           np.asarray(regions_me)[valid]]).astype(np.float32)
  positions = np.concatenate([[[1.0, 0.5, 0.5]],
                              np.concatenate([np.zeros((len(xy), 1)), xy], axis=1)])
  return {"tokens": tokens, "positions": positions.astype(np.float32)}


# ------------------------------------------------------------------------------------ task


def _dataclass_from(cls, fields: dict, key: str):
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"config.{key} has unknown keys {unknown}; known: {sorted(known)}")
  return cls(**fields)


def load_language_model(path: str) -> tuple[Any, Any, Any]:
  """(decoder, its config, import report with the tokenizer) of a checkpoint: a
  Llama-architecture GGUF file, or a Hugging Face directory of Gemma (tokenizer.model), Llama or
  Qwen3 (tokenizer.json)."""
  # pylint: disable=import-outside-toplevel
  from pathflip_jax.convert import gemma, gguf, hf_checkpoint, llama
  if path.endswith(".gguf"):
    model, config, report = gguf.load_gguf(path)
  else:
    hf_config, config_path = hf_checkpoint.read_config(path)
    model_type = hf_config.get("model_type")
    if model_type in ("llama", "qwen3"):
      model, config, report = llama.load_llama(path)
    elif str(model_type).startswith("gemma"):
      model, config, report = gemma.load_gemma(path)
    else:
      raise ValueError(f"{config_path}: model_type {model_type!r} is not an imported decoder "
                       "family (gemma*, llama, qwen3; or a .gguf file)")
  if report.tokenizer is None:
    raise ValueError(f"config.decoder.init={path}: no tokenizer found beside the weights "
                     "(tokenizer.model or tokenizer.json); set config.tokenizer")
  return model, config, report


class InstructTask:
  """Data, model and loss of the instruct stage (the trainer's task interface), plus the
  generation helpers its evaluators use."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.config, self.workdir, self.mesh = config, workdir, None
    if not config.get("align_workdir"):
      raise ValueError("config.align_workdir is not set (stage instruct reads a finished align "
                       "run: python -m pathflip_jax.train --config configs/pathflip_demo.py)")
    self.template = _dataclass_from(ins.Template, dict(config.template), "template")
    self.sequence = _dataclass_from(ins.SequenceConfig, dict(config.data), "data")
    t0 = time.time()
    self.align_task, align_model = predict.load_align(config.align_workdir,
                                                      config.get("features_dir", ""))
    self.class_names = self.align_task.class_names
    self.visual = self._visual_tokens(align_model)
    self.visual_dim = int(self.visual["train"][0]["tokens"].shape[1])
    if self.sequence.visual_tokens == "none":   # the question-only baseline
      self.visual = {split: [{k: v[:0] for k, v in slide.items()} for slide in slides]
                     for split, slides in self.visual.items()}
    most = max((len(v["tokens"]) for s in self.visual.values() for v in s), default=0)
    if most > self.sequence.max_visual:
      raise ValueError(f"a slide has {most} visual tokens; config.data.max_visual="
                       f"{self.sequence.max_visual} (raise it, or lower the align run's "
                       "data.eval_num_regions)")
    self.items = self._instructions()
    self.tokenizer, self.decoder_config = self._language_model()
    if config.get("chat"):
      self.template = dataclasses.replace(self.template, prompt=self._chat_prompt())
    counts = {s: {k: sum(i.kind == k for i in v) for k in (ins.CAPTION, ins.MULTIPLE_CHOICE,
                                                            ins.OPEN)}
              for s, v in self.items.items()}
    print(f"[instruct] align run {config.align_workdir}: visual tokens of "
          f"{sum(len(v) for v in self.visual.values())} slides ({self.visual_dim}-d, up to "
          f"{most} per slide) in {time.time() - t0:.0f}s; instructions per split {counts}; "
          f"tokenizer {self.tokenizer.vocab_size} pieces", file=sys.stderr, flush=True)

  # ------------------------------------------------------------------ set-up
  def _visual_tokens(self, align_model) -> dict[str, list[dict[str, np.ndarray]]]:
    mesh = sharding.make_mesh(data=1, fsdp=1, model=1, devices=jax.devices()[:1])
    return encode_visual_tokens(self.align_task, align_model, mesh,
                                int(self.config.get("encode_batch_size", 8)))

  def _instructions(self) -> dict[str, list[ins.Instruction]]:
    config = self.config
    rows = {t.slide_id: (split, i) for split in SPLITS
            for i, t in enumerate(self.align_task.splits[split].texts)}
    items: dict[str, list[ins.Instruction]] = {s: [] for s in SPLITS}
    if config.get("caption_prompt"):
      for split in SPLITS:
        for i, text in enumerate(self.align_task.splits[split].texts):
          items[split].append(ins.Instruction(slide=i, kind=ins.CAPTION,
                                              question=config.caption_prompt,
                                              answer_text=text.caption, category="caption"))
    unknown, moved = [], []
    for q in (ins.read_questions(config.questions) if config.get("questions") else []):
      if q.slide_id not in rows:
        unknown.append(q.slide_id)
        continue
      split, i = rows[q.slide_id]
      if q.split and q.split != split:
        moved.append(q.slide_id)
      items[split].append(ins.Instruction(slide=i, kind=q.type, question=q.question,
                                          options=q.options, answer=q.answer,
                                          answer_text=q.correct_text, category=q.category))
    if unknown:
      print(f"[instruct] {len(unknown)} questions of {config.questions} name slides without "
            f"features or caption (skipped; e.g. {sorted(set(unknown))[:3]})", file=sys.stderr)
    if moved:
      raise ValueError(f"{config.questions}: slides {sorted(set(moved))[:5]} have a split "
                       "there that differs from the align run's")
    if not items["train"]:
      raise ValueError("no training instructions: set config.caption_prompt or "
                       "config.questions")
    return items

  def _language_model(self):
    config = self.config
    dec = config.decoder
    if dec.get("init"):
      # An imported tokenizer has no <image> piece: its id is one past the vocabulary, and the
      # projector's output, not an embedding row, fills those slots.
      # The weights are read again by initial_params, only when a run starts: a task built to
      # evaluate a trained run (predict.py) does not hold a second copy of the decoder.
      _, decoder_config, report = load_language_model(dec.init)
      tokenizer = report.tokenizer
      if config.get("tokenizer"):
        tokenizer = tokenizer_lib.load(config.tokenizer)
      return tokenizer, decoder_config
    if config.get("tokenizer"):
      tokenizer = tokenizer_lib.Tokenizer(config.tokenizer)
    else:
      path = storage.join(self.workdir, "tokenizer.model")
      if not storage.exists(path):
        tokenizer_lib.train(self._train_text(), storage.join(self.workdir, "tokenizer"),
                            vocab_size=config.vocab_size, model_type=config.tokenizer_type)
      tokenizer = tokenizer_lib.Tokenizer(path)
    decoder_config = decoder_lib.get_config(dec.variant, vocab_size=tokenizer.num_embeddings,
                                            **dict(dec.get("overrides", None) or {}))
    return tokenizer, decoder_config

  def _chat_prompt(self) -> str:
    """config.chat: the template's prompt as the user turn of the tokenizer's chat template."""
    render = getattr(self.tokenizer, "apply_chat_template", None)
    if render is None:
      raise ValueError(f"config.chat is set but the tokenizer ({type(self.tokenizer).__name__}) "
                       "has no chat template")
    text = render([{"role": "user", "content": self.template.prompt}],
                  add_generation_prompt=True)
    bos = self.tokenizer.special_tokens.get("bos_token")
    if bos and text.startswith(bos):   # prompts are encoded with BOS already
      text = text[len(bos):]
    # Literal braces of the template survive str.format; {question} stays the slot.
    return text.replace("{", "{{").replace("}", "}}").replace("{{question}}", "{question}")

  def _train_text(self) -> list[str]:
    """What the tokenizer learns from: the training split's prompts and answers only."""
    texts = []
    for item in self.items["train"]:
      prompt, answer, _, _ = ins.render(item, self.template, None)
      texts += [prompt.replace(tokenizer_lib.IMAGE, " "), answer]
    return texts

  # ------------------------------------------------------------------ trainer interface
  def create_model(self, rngs: nnx.Rngs) -> instruct.InstructModel:
    lora = None
    if self.config.lora.rank:
      lora = lora_lib.LoraConfig(rank=self.config.lora.rank, alpha=self.config.lora.alpha,
                                    dropout=self.config.lora.dropout,
                                    targets=tuple(self.config.lora.targets))
    return instruct.InstructModel(self.decoder_config, self.visual_dim, self.tokenizer.image_id,
                                  rngs=rngs,
                                  position_frequencies=self.config.position_frequencies,
                                  lora=lora, dtype=jnp.dtype(self.config.get("dtype", "float32")))

  def initial_params(self, params: Any) -> tuple[Any, str] | None:
    """``config.decoder.init``: the decoder starts from the imported weights."""
    path = self.config.decoder.get("init")
    if not path:
      return None
    model, _, report = load_language_model(path)
    loaded = {f"decoder/{k}": np.asarray(v)
              for k, v in checkpointing.named_leaves(nnx.state(model, nnx.Param)).items()}
    params, taken = checkpointing.partial_init(params, loaded, ["^decoder/(?!.*lora)"],
                                               source=f"config.decoder.init={path}")
    return params, (f"decoder initialised from {report.model_type} checkpoint {path} "
                    f"({len(taken)} arrays); projector and adapters from scratch")

  def train_source(self) -> grain.MapDataset:
    return grain.MapDataset.source(ins.InstructionSource(self.items["train"],
                                                         self.visual["train"]))

  def train_transform(self) -> grain.transforms.RandomMap:
    return ins.SampleInstruction(self.template, self.tokenizer, self.sequence)

  # A plain function, not a bound method: grain pickles it into its worker processes.
  collate = staticmethod(ins.collate)

  def loss(self, model: instruct.InstructModel, batch: dict[str, jax.Array], rng: jax.Array):
    dropout = self.config.lora.rank and self.config.lora.dropout
    logits = model(batch["tokens"], batch["visual"], batch["visual_pos"],
                   dropout_rng=rng if dropout else None)
    return instruct.answer_loss(logits, batch["targets"], batch["loss_mask"])

  def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
    example = ins.training_example(self.items["train"][0], self.visual["train"][0],
                                   self.template, self.tokenizer, self.sequence, None)
    return ins.collate([example] * batch_size)

  # ------------------------------------------------------------------ evaluator interface
  def eval_items(self, split: str, kinds: Sequence[str]) -> list[ins.Instruction]:
    if split not in self.items:
      raise ValueError(f"split {split!r} is not one of {SPLITS}")
    return [i for i in self.items[split] if i.kind in kinds]

  def slide_ids(self, split: str) -> list[str]:
    return [t.slide_id for t in self.align_task.splits[split].texts]

  def prompt_len(self, split: str, kinds: Sequence[str]) -> int:
    """A fixed prompt length for a split's items (one compiled shape per evaluator)."""
    longest = 1
    for item in self.eval_items(split, kinds):
      prompt, _, _, _ = ins.render(item, self.template, None)
      longest = max(longest, len(ins.encode_prompt(self.tokenizer, prompt,
                                                   len(self.visual[split][item.slide]["tokens"]))))
    return -(-longest // 16) * 16

  def generate(self, model: instruct.InstructModel, split: str, items: Sequence[ins.Instruction],
               *, prompt_len: int, max_new_tokens: int, batch_size: int, beams: int = 1,
               visual: Sequence[dict[str, np.ndarray]] | None = None) -> list[str]:
    """Greedy (beams=1) or beam-search answers to ``items`` of ``split``, decoded. ``visual``:
    the slides' visual tokens to show (default ``self.visual[split]``; e.g. shuffled ones)."""
    visual = self.visual[split] if visual is None else visual
    stops = list(self.tokenizer.stop_ids)
    stops += self._suffix_stop()
    texts = []
    for start in range(0, len(items), batch_size):
      chunk = list(items[start:start + batch_size])
      real = len(chunk)
      chunk += chunk[-1:] * (batch_size - real)
      batch = ins.prompt_batch(chunk, visual, self.template, self.tokenizer,
                               self.sequence.max_visual, prompt_len)
      graphdef, state = nnx.split(model)
      embeddings = _embed(graphdef, state, batch["tokens"], batch["visual"], batch["visual_pos"])
      kw = dict(max_new_tokens=max_new_tokens, stop_tokens=stops, pad_id=self.tokenizer.pad_id,
                embeddings_btd=embeddings)
      if beams > 1:
        ids, lengths, _ = sampling.beam_search(model.decoder, batch["tokens"], batch["lengths"],
                                               beams=beams, **kw)
      else:
        ids, lengths = sampling.generate(model.decoder, batch["tokens"], batch["lengths"], **kw)
      ids, lengths = np.asarray(ids), np.asarray(lengths)
      for row in range(real):
        text = self.tokenizer.decode(ids[row, :lengths[row]])
        if self.template.answer_suffix:
          text = text.split(self.template.answer_suffix)[0]
        texts.append(text.strip())
    return texts

  def _suffix_stop(self) -> list[int]:
    """The answer suffix's id when it is one token (Gemma's <end_of_turn>)."""
    if not self.template.answer_suffix:
      return []
    ids = self.tokenizer.encode(self.template.answer_suffix)
    return ids if len(ids) == 1 else []

  def option_log_probs(self, model: instruct.InstructModel, split: str,
                       items: Sequence[ins.Instruction], batch_size: int,
                       visual: Sequence[dict[str, np.ndarray]] | None = None) -> np.ndarray:
    """log P(answer of option k | prompt) for each multiple-choice item: [items, 4]. Options
    in the order shown; the answer is formatted as the template formats it (with EOS).
    ``visual``: as in :meth:`generate`."""
    visual = self.visual[split] if visual is None else visual
    sequences = []
    for item in items:
      for letter in ins.LETTERS:
        as_if = dataclasses.replace(item, answer=letter)
        sequences.append(ins.training_example(as_if, visual[item.slide],
                                              self.template, self.tokenizer,
                                              dataclasses.replace(self.sequence,
                                                                  shuffle_options=False,
                                                                  region_dropout=0.0), None))
    out = []
    for start in range(0, len(sequences), batch_size):
      chunk = sequences[start:start + batch_size]
      real = len(chunk)
      chunk += chunk[-1:] * (batch_size - real)
      batch = ins.collate(chunk)
      graphdef, state = nnx.split(model)
      out.append(np.asarray(_score(graphdef, state, batch))[:real])
    return np.concatenate(out).reshape(len(items), len(ins.LETTERS))


@jax.jit
def _embed(graphdef, state, tokens, visual, visual_pos):
  return nnx.merge(graphdef, state).input_embeddings(tokens, visual, visual_pos)


@jax.jit
def _score(graphdef, state, batch):
  model = nnx.merge(graphdef, state)
  logits = model(batch["tokens"], batch["visual"], batch["visual_pos"])
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  token_logp = jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(batch["loss_mask"], token_logp, 0.0), axis=-1)
