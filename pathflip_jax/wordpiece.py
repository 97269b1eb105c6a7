"""BERT's WordPiece tokenizer (the ``tokenizers`` library) behind the interface of
:class:`pathflip_jax.tokenizer.Tokenizer`, so the align task reads either.

  tok = WordPieceTokenizer("/models/Bio_ClinicalBERT")   # a directory, vocab.txt or tokenizer.json
  tok.encode_batch(["Tumour cells."], max_len=16)        # [CLS] tumour cells . [SEP] [PAD] ...

A directory is read as a Hugging Face BERT checkpoint: the vocabulary from its ``tokenizer.json``
when there is one, else from its ``vocab.txt``; BERT's normaliser and pre-tokeniser configured
from ``tokenizer_config.json`` (``do_lower_case``, default True; ``strip_accents``, default: with
the lower-casing; ``tokenize_chinese_chars``, default True), whatever normaliser a
``tokenizer.json`` carries, as transformers' ``BertTokenizer`` does. Special tokens are named
there too (``cls_token``, ``sep_token``, ``pad_token``, ``unk_token``; defaults ``[CLS]`` ...).

Roles in the project's terms: BOS is ``[CLS]`` (the text encoder reads its output), EOS is
``[SEP]``, padding ``[PAD]``. BERT has no ``<image>`` token and no stage needs one from it:
``image_id`` is None and ``num_embeddings`` is the vocabulary size.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

from pathflip_jax import storage, tokenizer as tokenizer_lib

_SPECIALS = {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]",
             "unk_token": "[UNK]"}


def is_wordpiece(path: str) -> bool:
  """Whether ``path`` names a WordPiece tokenizer: a directory with ``tokenizer.json`` or
  ``vocab.txt``, or one of those files."""
  if storage.isdir(path):
    return any(storage.exists(storage.join(path, name)) for name in ("tokenizer.json",
                                                                      "vocab.txt"))
  return os.path.basename(path) in ("tokenizer.json", "vocab.txt")


def _special_name(value: Any) -> str | None:
  # tokenizer_config.json writes a special token as a string or as an AddedToken dict.
  if isinstance(value, dict):
    return value.get("content")
  return value if isinstance(value, str) else None


class WordPieceTokenizer(tokenizer_lib.BaseTokenizer):
  """A WordPiece vocabulary with BERT's special tokens; picklable (grain workers, spawn)."""

  path: str
  sha256: str
  vocab_size: int
  num_embeddings: int
  pad_id: int
  bos_id: int
  eos_id: int
  unk_id: int
  image_id: None
  lowercase: bool

  def __init__(self, path: str | os.PathLike):
    path = os.fspath(path)
    directory = path if storage.isdir(path) else os.path.dirname(path)
    config_path = storage.join(directory, "tokenizer_config.json")
    config = (json.loads(storage.read_text(config_path)) if storage.exists(config_path)
              else {})
    if storage.isdir(path):
      found = [storage.join(path, n) for n in ("tokenizer.json", "vocab.txt")
               if storage.exists(storage.join(path, n))]
      if not found:
        raise FileNotFoundError(f"{path}: no tokenizer.json or vocab.txt (a BERT checkpoint "
                                "directory has one)")
      source = found[0]
    elif storage.exists(path):
      source = path
    else:
      raise FileNotFoundError(f"{path}: tokenizer file not found")
    self._setup(path, source, storage.read_bytes(source), config)

  def _setup(self, path: str, source: str, data: bytes, config: dict) -> None:
    self.path, self._source, self._data, self._config = path, source, data, config
    names = {key: _special_name(config.get(key)) or default
             for key, default in _SPECIALS.items()}
    if source.endswith(".json"):
      try:
        tok = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
      except Exception as e:  # noqa: BLE001 - the library raises plain Exceptions
        raise ValueError(f"{source}: not a tokenizers file ({e})") from None
      if not isinstance(tok.model, models.WordPiece):
        raise ValueError(f"{source}: model is {type(tok.model).__name__}, not WordPiece (a "
                         "BERT-family tokenizer)")
    else:
      tok = tokenizers.Tokenizer(models.WordPiece(self._read_vocab(source, data),
                                                  unk_token=names["unk_token"],
                                                  max_input_chars_per_word=100))
    # BERT's pipeline with tokenizer_config.json's settings, also over a tokenizer.json's own
    # normaliser: transformers' BertTokenizer does the same (do_lower_case defaults to True).
    self.lowercase = bool(config.get("do_lower_case", True))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=bool(config.get("tokenize_chinese_chars", True)),
        strip_accents=config.get("strip_accents"), lowercase=self.lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    # The project adds [CLS]/[SEP] and pads itself; a saved file may carry its own settings.
    tok.no_truncation()
    tok.no_padding()
    ids = {}
    for key, name in names.items():
      token_id = tok.token_to_id(name)
      if token_id is None:
        raise ValueError(f"{source}: the vocabulary has no {name} ({key}); set it in "
                         f"{storage.join(os.path.dirname(source), 'tokenizer_config.json')}")
      ids[key] = token_id
    # Special tokens written in a text stay whole (one id), as transformers matches them.
    mask = _special_name(config.get("mask_token")) or "[MASK]"
    tok.add_special_tokens([n for n in (*names.values(), mask)
                            if tok.token_to_id(n) is not None])
    self._tok = tok
    self.sha256 = hashlib.sha256(data).hexdigest()
    self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
    self.num_embeddings = self.vocab_size
    self.bos_id, self.eos_id = ids["cls_token"], ids["sep_token"]
    self.pad_id, self.unk_id = ids["pad_token"], ids["unk_token"]
    self.image_id = None

  @staticmethod
  def _read_vocab(source: str, data: bytes) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for index, line in enumerate(data.decode("utf-8").split("\n")):
      token = line.rstrip("\r")
      if token:   # a line per id; a repeated token keeps its last id, as transformers reads it
        vocab[token] = index
    if not vocab:
      raise ValueError(f"{source}: empty vocabulary")
    return vocab

  def __getstate__(self) -> dict[str, Any]:
    # The Rust tokenizer is rebuilt from the file's bytes (no file needed in the worker).
    return {"path": self.path, "source": self._source, "data": self._data,
            "config": self._config}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self._setup(state["path"], state["source"], state["data"], state["config"])

  def __repr__(self) -> str:
    return (f"WordPieceTokenizer(path={self.path!r}, vocab_size={self.vocab_size}, "
            f"pad_id={self.pad_id}, cls={self.bos_id}, sep={self.eos_id}, unk_id={self.unk_id})")

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Token ids of ``text``; ``add_bos``/``add_eos`` put ``[CLS]`` first / ``[SEP]`` last."""
    if not isinstance(text, str):
      raise TypeError(f"encode takes a str, got {type(text).__name__}")
    ids = list(self._tok.encode(text, add_special_tokens=False).ids)
    return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of one id sequence: stops at the first ``[SEP]``, skips ``[PAD]`` and ``[CLS]``."""
    values = np.asarray(ids)
    if values.ndim != 1:
      raise ValueError(f"decode takes one sequence of ids, got shape {values.shape}")
    kept = []
    for i in (int(v) for v in values.tolist()):
      if i == self.eos_id:
        break
      if i in (self.pad_id, self.bos_id):
        continue
      if not 0 <= i < self.num_embeddings:
        raise ValueError(f"token id {i} is outside [0, {self.num_embeddings})")
      kept.append(i)
    return self._tok.decode(kept, skip_special_tokens=False)
