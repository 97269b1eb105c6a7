"""SentencePiece tokenizer: the project's special tokens, training, and a picklable wrapper.

Special tokens are defined here once for every stage (the decoder puts image embeddings at the
``<image>`` placeholder, the text encoder pads and ends texts). A model trained by :func:`train`
uses Gemma's layout, ``<pad>``=0, ``<eos>``=1, ``<bos>``=2, ``<unk>``=3, plus ``<image>``=4 as a
user-defined symbol. :class:`Tokenizer` also loads models trained elsewhere (Gemma, LLaMA, ...):
it finds the special ids by piece, then by the model's own settings, and gives ``<image>`` one id
past the vocabulary when the model has no such piece.
"""

from __future__ import annotations

import hashlib
import io
import os
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import sentencepiece as spm

from pathflip_jax import storage

PAD, EOS, BOS, UNK, IMAGE = "<pad>", "<eos>", "<bos>", "<unk>", "<image>"
# Ids in a model trained by this project (Gemma's layout, then <image>).
PAD_ID, EOS_ID, BOS_ID, UNK_ID, IMAGE_ID = 0, 1, 2, 3, 4
MODEL_TYPES = ("unigram", "bpe")


def train(corpus: Iterable[str], model_prefix: str, *, vocab_size: int = 1000,
          model_type: str = "unigram", seed_sentencepiece_size: int = 1_000_000,
          max_sentence_length: int = 1 << 16) -> str:
  """Trains a SentencePiece model on ``corpus`` (one text per item); returns ``<prefix>.model``.

  Also writes ``<prefix>.vocab`` (piece and score per line, as sentencepiece writes it). The
  vocabulary limit is soft: a small corpus gives fewer pieces than ``vocab_size``. Every byte can
  be encoded (byte fallback), so no text maps to ``<unk>``. The same corpus and settings give a
  byte-identical ``.model`` wherever it is written (one thread; the output path is not stored in
  the model), so its sha256 identifies the tokenizer.
  """
  if model_type not in MODEL_TYPES:
    raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
  texts = [str(t) for t in corpus if str(t).strip()]
  if not texts:
    raise ValueError("cannot train a tokenizer on an empty corpus (no non-blank texts)")
  model = io.BytesIO()
  try:
    # model_writer rather than model_prefix: sentencepiece records model_prefix in the model's
    # trainer spec, which would make the bytes (and the sha256) depend on the output path.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID,
        pad_piece=PAD, eos_piece=EOS, bos_piece=BOS, unk_piece=UNK,
        user_defined_symbols=[IMAGE], byte_fallback=True, hard_vocab_limit=False,
        character_coverage=1.0, split_digits=True,
        # identity, not NFKC: decode(encode(text)) gives the text back (NFKC turns µ into μ).
        normalization_rule_name="identity",
        seed_sentencepiece_size=seed_sentencepiece_size,
        max_sentence_length=max_sentence_length,
        input_sentence_size=0, num_threads=1, minloglevel=2)
  except RuntimeError as e:
    if "Vocabulary size is smaller" in str(e):
      raise ValueError(f"vocab_size={vocab_size} is too small: it must hold the special tokens, "
                       f"256 byte pieces and every character of the corpus ({e})") from None
    raise
  data = model.getvalue()
  path = model_prefix + ".model"
  sp = spm.SentencePieceProcessor(model_proto=data)
  vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))
  # Each file written whole (a temporary file and a rename; on an object store one upload): the
  # processes of a multi-host run each train the same (byte-identical) model into one workdir,
  # and no reader sees a half-written file.
  storage.write_bytes(path, data)
  storage.write_bytes(model_prefix + ".vocab", vocab.encode("utf-8"))
  return path


class BaseTokenizer:
  """Batch encoding for every tokenizer of the project (:class:`Tokenizer` here,
  ``wordpiece.WordPieceTokenizer`` for BERT, ``convert.hf_tokenizer.HFTokenizer`` for Hugging
  Face BPE); a subclass defines ``encode``, ``decode`` and the special ids, and may build them
  on :meth:`_encode_around_image` and :meth:`_decode_around_image`."""

  pad_id: int
  eos_id: int
  bos_id: int | None
  image_id: int
  num_embeddings: int
  path: str
  _native_image: bool   # <image> is a piece of the vocabulary (not spliced in by encode)

  @property
  def stop_ids(self) -> tuple[int, ...]:
    """Ids that end a generation (and :meth:`decode`): EOS; a subclass may add more."""
    return (self.eos_id,)

  def _encode_around_image(self, text: str, encode_part: Callable[[str], list[int]], *,
                           add_bos: bool, add_eos: bool) -> list[int]:
    """Ids of ``text``: the parts between ``<image>`` placeholders through ``encode_part``,
    each placeholder as ``image_id`` (one part when the vocabulary has the piece), then BOS and
    EOS."""
    if not isinstance(text, str):
      raise TypeError(f"encode takes a str, got {type(text).__name__}")
    ids: list[int] = []
    for i, part in enumerate([text] if self._native_image else text.split(IMAGE)):
      if i:
        ids.append(self.image_id)
      if part:
        ids.extend(encode_part(part))
    if add_bos:
      if self.bos_id is None:
        raise ValueError(f"{self.path}: the tokenizer has no BOS token; use add_bos=False")
      ids.insert(0, self.bos_id)
    if add_eos:
      ids.append(self.eos_id)
    return ids

  def _decode_around_image(self, ids: Sequence[int] | np.ndarray,
                           decode_part: Callable[[list[int], bool], str]) -> str:
    """Text of one id sequence: stops at the first stop id, skips pad and BOS, a spliced-in
    ``image_id`` as the literal ``<image>``; ``decode_part(ids, after_image)`` decodes the
    parts between."""
    values = np.asarray(ids)
    if values.ndim != 1:
      raise ValueError(f"decode takes one sequence of ids, got shape {values.shape}")
    stops = set(self.stop_ids)
    parts: list[str] = []
    current: list[int] = []
    for i in (int(v) for v in values.tolist()):
      if i in stops:     # before pad: pad_id may be eos_id
        break
      if i == self.pad_id or i == self.bos_id:
        continue
      if not 0 <= i < self.num_embeddings:
        raise ValueError(f"token id {i} is outside [0, {self.num_embeddings})")
      if i == self.image_id and not self._native_image:
        parts.append(decode_part(current, bool(parts)))
        current = []
      else:
        current.append(i)
    parts.append(decode_part(current, bool(parts)))
    return IMAGE.join(parts)

  def encode_batch(self, texts: Sequence[str], max_len: int, *, add_bos: bool = True,
                   add_eos: bool = True) -> np.ndarray:
    """int32 ``[len(texts), max_len]``, right-padded with ``pad_id``.

    A longer text is cut to ``max_len``, keeping its last token EOS when ``add_eos``.
    """
    if isinstance(texts, str):
      raise TypeError("encode_batch takes a sequence of texts, not one str")
    if max_len < max(1, int(add_bos) + int(add_eos)):
      raise ValueError(f"max_len={max_len} leaves no room for the BOS/EOS tokens")
    out = np.full((len(texts), max_len), self.pad_id, np.int32)
    for row, text in enumerate(texts):
      ids = self.encode(text, add_bos=add_bos, add_eos=add_eos)
      if len(ids) > max_len:
        ids = ids[:max_len - 1] + [self.eos_id] if add_eos else ids[:max_len]
      out[row, :len(ids)] = ids
    return out


class Tokenizer(BaseTokenizer):
  """A SentencePiece model with the project's special ids; picklable (grain workers, spawn).

  Special ids are found by piece (``<pad>``, ``<bos>``, ...) first, then by the model's own
  ``pad_id()``/``bos_id()``/... when set. A model without a pad token (LLaMA) pads with EOS:
  padding is always masked, so the id only has to exist. A model without an ``<image>`` piece
  gets ``image_id == vocab_size``, one id past its vocabulary; size embedding tables by
  ``num_embeddings``, which counts it. ``bos_id`` is None for a model with no BOS (T5).
  """

  path: str
  sha256: str
  vocab_size: int
  num_embeddings: int
  pad_id: int
  bos_id: int | None
  eos_id: int
  unk_id: int
  image_id: int

  def __init__(self, model_path: str | os.PathLike):
    path = os.fspath(model_path)
    if not storage.exists(path) or storage.isdir(path):
      raise FileNotFoundError(f"{path}: tokenizer model not found")
    self._setup(path, storage.read_bytes(path))

  def _setup(self, path: str, data: bytes) -> None:
    self.path = path
    self._model = data
    try:
      sp = spm.SentencePieceProcessor(model_proto=data)
    except RuntimeError as e:
      raise ValueError(f"{path}: not a SentencePiece model ({e})") from None
    self._sp = sp
    self.sha256 = hashlib.sha256(data).hexdigest()
    self.vocab_size = sp.get_piece_size()
    unk = self._special(UNK, sp.unk_id())
    eos = self._special(EOS, sp.eos_id())
    if unk is None or eos is None:
      raise ValueError(f"{path}: the model has no {'<unk>' if unk is None else 'EOS'} token")
    self.unk_id, self.eos_id = unk, eos
    self.bos_id = self._special(BOS, sp.bos_id())
    pad = self._special(PAD, sp.pad_id())
    self.pad_id = eos if pad is None else pad
    image = self._find(IMAGE)
    self.image_id = self.vocab_size if image is None else image
    self.num_embeddings = self.vocab_size + (image is None)
    # A user-defined <image> is matched in text by sentencepiece itself; a control piece or a
    # missing one is not, so encode/decode split the text at the placeholder.
    self._native_image = image is not None and image in sp.encode(IMAGE)

  def _find(self, piece: str) -> int | None:
    i = self._sp.piece_to_id(piece)
    # piece_to_id answers unk_id for a piece the model lacks.
    return i if self._sp.id_to_piece(i) == piece else None

  def _special(self, piece: str, model_id: int) -> int | None:
    found = self._find(piece)
    if found is not None:
      return found
    return model_id if model_id >= 0 else None

  def __getstate__(self) -> dict[str, Any]:
    # The processor itself cannot be pickled; the model bytes rebuild it (and need no file).
    return {"path": self.path, "model": self._model}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self._setup(state["path"], state["model"])

  def __repr__(self) -> str:
    return (f"Tokenizer(path={self.path!r}, vocab_size={self.vocab_size}, pad_id={self.pad_id}, "
            f"bos_id={self.bos_id}, eos_id={self.eos_id}, unk_id={self.unk_id}, "
            f"image_id={self.image_id}, num_embeddings={self.num_embeddings})")

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Token ids of ``text``; each ``<image>`` in it becomes the single id ``image_id``.

    With a model whose ``<image>`` is not a user-defined piece, the text is encoded in parts split
    at the placeholder, and a space right before one may not come back from :meth:`decode`.
    """
    return self._encode_around_image(text, self._sp.encode, add_bos=add_bos, add_eos=add_eos)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of one id sequence: stops at the first EOS, skips pad and BOS, ``<image>`` literal."""
    return self._decode_around_image(ids, self._decode_part)

  def _decode_part(self, ids: list[int], after_image: bool) -> str:
    text = self._sp.decode(ids)
    # sentencepiece drops the space of a text's first word; after a placeholder that encode split
    # off, it was a word boundary, so keep it ("<image> Describe" decodes as it was written).
    word_start = bool(ids) and self._sp.id_to_piece(ids[0]).startswith("\u2581")   # "▁"
    if after_image and word_start and not text[:1].isspace():
      text = " " + text
    return text


def load(path: str | os.PathLike) -> BaseTokenizer:
  """The tokenizer at ``path``: BERT's WordPiece for a checkpoint directory, ``vocab.txt`` or
  ``tokenizer.json`` (``wordpiece.py``), else a SentencePiece model; both encode, pad and
  decode alike."""
  # Imported here: wordpiece's tokenizer is a BaseTokenizer of this module.
  from pathflip_jax import wordpiece  # pylint: disable=import-outside-toplevel
  path = os.fspath(path)
  if wordpiece.is_wordpiece(path):
    return wordpiece.WordPieceTokenizer(path)
  return Tokenizer(path)
