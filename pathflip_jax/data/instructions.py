"""Instruction data of stage "instruct": questions, prompt templates and token sequences.

Questions come from a CSV in SlideChat's SlideBench layout (the demo cohort writes one):

  slide_id, split, category, question, A, B, C, D, answer, answer_text, type

``type`` is ``multiple_choice`` (options A-D, ``answer`` the letter; ``answer_text`` may repeat
the option) or ``open`` (``answer_text`` the reference answer). Captions become instructions too:
``caption_prompt`` ("Describe the slide.") with the slide's caption as the answer.

One training sequence is

  [BOS] prompt-before-<image>  V visual slots  prompt-after-<image>  answer  [EOS]  padding

where the prompt is ``template.prompt`` with ``{question}`` filled in and the ``<image>``
placeholder expanded to one slot per visual token of the slide (the slide token and its region
tokens; ``models/instruct.py`` writes their projections there). The loss covers the answer and
its EOS only. Multiple-choice prompts list the options as ``A. text`` lines; the answer is the
letter, the option text, or both (``answer_format``). In training the option order is shuffled
afresh each epoch (``shuffle_options``), so no letter is favoured and the model must read the
options.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from typing import Any, Sequence

import grain
import numpy as np

from pathflip_jax import storage, tokenizer as tokenizer_lib

LETTERS = "ABCD"
COLUMNS = ("slide_id", "split", "category", "question", "A", "B", "C", "D", "answer",
           "answer_text", "type")
MULTIPLE_CHOICE, OPEN, CAPTION = "multiple_choice", "open", "caption"
ANSWER_FORMATS = ("letter", "text", "letter_text")


@dataclasses.dataclass(frozen=True)
class Question:
  """One row of a questions CSV."""

  slide_id: str
  split: str
  category: str
  question: str
  options: tuple[str, ...]       # A, B, C, D texts (empty for open questions)
  answer: str                    # the correct letter ("" for open questions)
  answer_text: str
  type: str

  @property
  def correct_text(self) -> str:
    if self.type == MULTIPLE_CHOICE:
      return self.options[LETTERS.index(self.answer)]
    return self.answer_text


def read_questions(path: str) -> list[Question]:
  """The questions of a SlideBench-style CSV; errors name the file, line and column."""
  if not storage.exists(path) or storage.isdir(path):
    raise FileNotFoundError(f"{path}: questions file not found")
  out = []
  with io.StringIO(storage.read_text(path), newline="") as f:
    reader = csv.DictReader(f)
    missing = [c for c in ("slide_id", "question", "type") if c not in (reader.fieldnames or [])]
    if missing:
      raise ValueError(f"{path}: missing columns {missing} (expected {list(COLUMNS)})")
    for line, row in enumerate(reader, start=2):
      kind = (row.get("type") or "").strip()
      where = f"{path}:{line}"
      if kind not in (MULTIPLE_CHOICE, OPEN):
        raise ValueError(f"{where}: type={kind!r}; expected {MULTIPLE_CHOICE!r} or {OPEN!r}")
      if not (row.get("slide_id") or "").strip() or not (row.get("question") or "").strip():
        raise ValueError(f"{where}: empty slide_id or question")
      options = tuple((row.get(k) or "").strip() for k in LETTERS)
      answer = (row.get("answer") or "").strip().upper()
      answer_text = (row.get("answer_text") or "").strip()
      if kind == MULTIPLE_CHOICE:
        if not all(options):
          raise ValueError(f"{where}: a multiple-choice question needs options A-D")
        if answer not in LETTERS:
          raise ValueError(f"{where}: answer={answer!r}; expected one of {list(LETTERS)}")
      else:
        options, answer = (), ""
        if not answer_text:
          raise ValueError(f"{where}: an open question needs answer_text")
      out.append(Question(slide_id=row["slide_id"].strip(),
                          split=(row.get("split") or "").strip(),
                          category=(row.get("category") or "").strip() or kind,
                          question=row["question"].strip(), options=options, answer=answer,
                          answer_text=answer_text, type=kind))
  return out


@dataclasses.dataclass(frozen=True)
class Template:
  """How an instruction becomes text (config ``template.*``).

  Attributes:
    prompt: the user turn up to where the answer starts; holds ``<image>`` once and
      ``{question}`` (e.g. Gemma's ``<start_of_turn>user\\n<image>\\n{question}<end_of_turn>\\n
      <start_of_turn>model\\n``).
    answer_suffix: text after the answer before EOS (Gemma: ``<end_of_turn>``).
    option_format: one line per multiple-choice option.
    choice_instruction: appended after the options.
    answer_format: "letter" ("B"), "text" ("fat") or "letter_text" ("B. fat").
  """

  prompt: str = "<image>\nQuestion: {question}\nAnswer:"
  answer_suffix: str = ""
  option_format: str = "\n{letter}. {text}"
  choice_instruction: str = ""
  answer_format: str = "letter_text"

  def __post_init__(self):
    if self.prompt.count(tokenizer_lib.IMAGE) != 1 or "{question}" not in self.prompt:
      raise ValueError(f"template.prompt must hold {tokenizer_lib.IMAGE} once and {{question}}: "
                       f"{self.prompt!r}")
    if self.answer_format not in ANSWER_FORMATS:
      raise ValueError(f"template.answer_format={self.answer_format!r}; expected one of "
                       f"{ANSWER_FORMATS}")

  def question_text(self, question: str, options: Sequence[str] = ()) -> str:
    text = question
    for letter, option in zip(LETTERS, options):
      text += self.option_format.format(letter=letter, text=option)
    if options and self.choice_instruction:
      text += self.choice_instruction
    return text

  def prompt_text(self, question: str, options: Sequence[str] = ()) -> str:
    return self.prompt.format(question=self.question_text(question, options))

  def choice_answer(self, letter: str, text: str) -> str:
    return {"letter": letter, "text": text, "letter_text": f"{letter}. {text}"}[self.answer_format]


@dataclasses.dataclass(frozen=True)
class Instruction:
  """A training or evaluation item: a slide (row of the visual-token table) and one turn."""

  slide: int
  kind: str                      # CAPTION, MULTIPLE_CHOICE or OPEN
  question: str
  options: tuple[str, ...] = ()
  answer: str = ""               # letter (multiple choice)
  answer_text: str = ""          # caption, open answer, or the correct option's text
  category: str = ""


def render(item: Instruction, template: Template, rng: np.random.Generator | None
           ) -> tuple[str, str, tuple[str, ...], str]:
  """(prompt text, answer text, options as shown, correct letter); ``rng`` shuffles options."""
  if item.kind != MULTIPLE_CHOICE:
    return template.prompt_text(item.question), item.answer_text, (), ""
  options = list(item.options)
  correct = options[LETTERS.index(item.answer)]
  if rng is not None:
    options = [options[i] for i in rng.permutation(len(options))]
  letter = LETTERS[options.index(correct)]
  return (template.prompt_text(item.question, options), template.choice_answer(letter, correct),
          tuple(options), letter)


def encode_prompt(tokenizer: tokenizer_lib.Tokenizer, prompt: str, num_visual: int) -> list[int]:
  """[BOS] + prompt ids with its one ``<image>`` id expanded to ``num_visual`` slots."""
  ids = tokenizer.encode(prompt, add_bos=tokenizer.bos_id is not None)
  at = ids.index(tokenizer.image_id)
  return ids[:at] + [tokenizer.image_id] * num_visual + ids[at + 1:]


@dataclasses.dataclass(frozen=True)
class SequenceConfig:
  """Static shapes of the instruct batches (config ``data.*``)."""

  max_len: int = 384              # tokens per sequence, visual slots included
  max_visual: int = 65            # visual tokens per slide (slide token + regions)
  shuffle_options: bool = True
  region_dropout: float = 0.0     # fraction of region tokens dropped per epoch in training
  # "slide": the slide and region tokens reach the decoder; "none": no visual token does (the
  # question-only baseline: what the questions and options alone let a decoder answer).
  visual_tokens: str = "slide"

  def __post_init__(self):
    if not 0.0 <= self.region_dropout < 1.0:
      raise ValueError(f"data.region_dropout must be in [0, 1), got {self.region_dropout}")
    if self.visual_tokens not in ("slide", "none"):
      raise ValueError(f"data.visual_tokens must be 'slide' or 'none', got "
                       f"{self.visual_tokens!r}")


def training_example(item: Instruction, visual: dict[str, np.ndarray], template: Template,
                     tokenizer: tokenizer_lib.Tokenizer, config: SequenceConfig,
                     rng: np.random.Generator | None) -> dict[str, np.ndarray]:
  """One padded sequence with its loss mask and the slide's visual tokens.

  Returns tokens [L] (int32), targets [L] (the next token), loss_mask [L] (True where the
  target is an answer token or its EOS), length (tokens in use), visual [V, e], visual_pos
  [V, 3], visual_valid [V].
  """
  tokens_ve, pos_v3 = visual["tokens"], visual["positions"]
  if rng is not None and config.region_dropout and len(tokens_ve) > 2:
    keep = np.concatenate([[True], rng.random(len(tokens_ve) - 1) >= config.region_dropout])
    if keep.sum() < 2:
      keep[1 + rng.integers(len(tokens_ve) - 1)] = True
    tokens_ve, pos_v3 = tokens_ve[keep], pos_v3[keep]
  prompt, answer, _, _ = render(item, template, rng if config.shuffle_options else None)
  prompt_ids = encode_prompt(tokenizer, prompt, len(tokens_ve))
  answer_ids = tokenizer.encode(answer + template.answer_suffix) + [tokenizer.eos_id]
  if len(prompt_ids) >= config.max_len:
    raise ValueError(f"a prompt of {len(prompt_ids)} tokens (with {len(tokens_ve)} visual "
                     f"tokens) does not fit data.max_len={config.max_len}: {prompt[:80]!r}")
  ids = (prompt_ids + answer_ids)[:config.max_len + 1]     # +1: the last target
  tokens = np.full((config.max_len,), tokenizer.pad_id, np.int32)
  targets = np.full((config.max_len,), tokenizer.pad_id, np.int32)
  n = len(ids) - 1
  tokens[:n], targets[:n] = ids[:-1], ids[1:]
  loss_mask = np.zeros((config.max_len,), bool)
  loss_mask[len(prompt_ids) - 1:n] = True
  return {"tokens": tokens, "targets": targets, "loss_mask": loss_mask,
          "length": np.int32(n), **pad_visual(tokens_ve, pos_v3, config.max_visual)}


LENGTH_BUCKET = 64


def collate(examples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Stacks examples, cutting the token axes to the batch's longest sequence rounded up to a
  multiple of 64: a batch of short answers does not pay for the longest caption, and each
  length compiles once."""
  longest = max(int(e["length"]) for e in examples)
  full = len(examples[0]["tokens"])
  keep = min(full, -(-longest // LENGTH_BUCKET) * LENGTH_BUCKET)
  out = {}
  for key in examples[0]:
    if key == "length":
      continue
    values = np.stack([e[key] for e in examples])
    out[key] = values[:, :keep] if key in ("tokens", "targets", "loss_mask") else values
  return out


def pad_visual(tokens_ve: np.ndarray, pos_v3: np.ndarray, max_visual: int
               ) -> dict[str, np.ndarray]:
  v, e = tokens_ve.shape
  if v > max_visual:
    raise ValueError(f"{v} visual tokens exceed data.max_visual={max_visual}")
  visual = np.zeros((max_visual, e), np.float32)
  visual[:v] = tokens_ve
  pos = np.zeros((max_visual, pos_v3.shape[1]), np.float32)
  pos[:v] = pos_v3
  return {"visual": visual, "visual_pos": pos, "visual_valid": np.arange(max_visual) < v}


class InstructionSource:
  """grain data source over instructions (each element: the item and its slide's tokens)."""

  def __init__(self, items: Sequence[Instruction], visual: Sequence[dict[str, np.ndarray]]):
    self.items, self.visual = list(items), list(visual)

  def __len__(self) -> int:
    return len(self.items)

  def __getitem__(self, i: int) -> dict[str, Any]:
    item = self.items[i]
    return {"item": item, "visual": self.visual[item.slide]}


class SampleInstruction(grain.transforms.RandomMap):
  """Training transform: options shuffled and regions dropped afresh each epoch."""

  def __init__(self, template: Template, tokenizer: tokenizer_lib.Tokenizer,
               config: SequenceConfig):
    self.template, self.tokenizer, self.config = template, tokenizer, config

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    return training_example(element["item"], element["visual"], self.template, self.tokenizer,
                            self.config, rng)


def prompt_batch(items: Sequence[Instruction], visual: Sequence[dict[str, np.ndarray]],
                 template: Template, tokenizer: tokenizer_lib.Tokenizer, max_visual: int,
                 prompt_len: int) -> dict[str, np.ndarray]:
  """Right-padded prompts (answer left out) for generation: tokens [b, prompt_len], lengths [b],
  visual [b, V, e], visual_pos [b, V, 3], visual_valid [b, V]."""
  rows = []
  for item in items:
    vis = visual[item.slide]
    prompt, _, _, _ = render(item, template, None)
    ids = encode_prompt(tokenizer, prompt, len(vis["tokens"]))
    if len(ids) > prompt_len:
      raise ValueError(f"a prompt of {len(ids)} tokens exceeds {prompt_len}: {prompt[:80]!r}")
    tokens = np.full((prompt_len,), tokenizer.pad_id, np.int32)
    tokens[:len(ids)] = ids
    rows.append({"tokens": tokens, "lengths": np.int32(len(ids)),
                 **pad_visual(vis["tokens"], vis["positions"], max_visual)})
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
