"""Hugging Face ``tokenizers`` tokenizers (BPE: SmolLM2, Llama 3, Qwen3) behind the project's
tokenizer interface, with the model's chat template rendered by jinja2 as transformers does.

  tok = load_hf_tokenizer("SmolLM2-135M-Instruct/")          # tokenizer.json + tokenizer_config
  prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
  ids = tok.encode(prompt)

``encode`` never adds special tokens on its own (a chat template writes them into the text);
``add_bos``/``add_eos`` add them explicitly, as :class:`pathflip_jax.tokenizer.Tokenizer` does.
GGUF files build the same wrapper from their metadata (``convert.gguf``).
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import os
from typing import Any, Mapping, Sequence

import jinja2
import numpy as np
import tokenizers
from jinja2 import sandbox

from pathflip_jax import tokenizer as tokenizer_lib
from pathflip_jax.convert import hf_checkpoint

IMAGE = tokenizer_lib.IMAGE
SPECIAL_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
  # The environment transformers renders chat templates in: sandboxed (templates come from model
  # repositories), block-trimming, loop controls, a non-escaping tojson, raise_exception and
  # strftime_now.
  env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                              extensions=["jinja2.ext.loopcontrols"])

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env.from_string(template)


def render_chat_template(template: str, messages: Sequence[Mapping[str, Any]], *,
                         add_generation_prompt: bool = False,
                         special_tokens: Mapping[str, str | None] | None = None,
                         **kwargs: Any) -> str:
  """``template`` rendered for ``messages`` (dicts with role and content), the special token
  strings (bos_token, eos_token, ...) and any template variables in ``kwargs``."""
  return _compile(template).render(messages=[dict(m) for m in messages],
                                   add_generation_prompt=add_generation_prompt,
                                   **{k: v for k, v in (special_tokens or {}).items()
                                      if v is not None}, **kwargs)


class HFTokenizer(tokenizer_lib.BaseTokenizer):
  """A ``tokenizers.Tokenizer`` with the project's special ids; picklable (grain workers).

  ``special`` names the special tokens by string (bos_token, eos_token, pad_token, unk_token;
  None: the model has none). Without a pad token it pads with EOS (padding is always masked).
  ``<image>`` is the token of that name when the vocabulary has one, else ``vocab_size`` (one id
  past the vocabulary; size embedding tables by ``num_embeddings``). ``stop_ids`` are the ids
  that end a generation (EOS and any the checkpoint lists, e.g. Llama 3's ``<|eot_id|>``).
  """

  def __init__(self, tokenizer_json: str, *, path: str,
               special: Mapping[str, str | None], chat_template: str | None = None,
               stop_ids: Sequence[int] = ()):
    self._setup(dict(json=tokenizer_json, path=path, special=dict(special),
                     chat_template=chat_template, stop_ids=tuple(stop_ids)))

  def _setup(self, state: dict[str, Any]) -> None:
    self._state = state
    self.path, self.chat_template = state["path"], state["chat_template"]
    try:
      self._tok = tokenizers.Tokenizer.from_str(state["json"])
    except Exception as e:  # tokenizers raises its own Exception type
      raise ValueError(f"{self.path}: not a tokenizers tokenizer.json ({e})") from None
    self.sha256 = hashlib.sha256(state["json"].encode("utf-8")).hexdigest()
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self.special_tokens = {name: state["special"].get(name) for name in SPECIAL_NAMES}
    ids = {name: self._id(name) for name in SPECIAL_NAMES}
    if ids["eos_token"] is None:
      raise ValueError(f"{self.path}: the tokenizer has no EOS token (eos_token)")
    self.eos_id, self.bos_id, self.unk_id = ids["eos_token"], ids["bos_token"], ids["unk_token"]
    self.pad_id = self.eos_id if ids["pad_token"] is None else ids["pad_token"]
    self._stop_ids = tuple(dict.fromkeys((self.eos_id, *state["stop_ids"])))
    image = self._tok.token_to_id(IMAGE)
    self.image_id = self.vocab_size if image is None else image
    self.num_embeddings = self.vocab_size + (image is None)
    self._native_image = image is not None

  def _id(self, name: str) -> int | None:
    token = self.special_tokens[name]
    if token is None:
      return None
    i = self._tok.token_to_id(token)
    if i is None:
      raise ValueError(f"{self.path}: {name} {token!r} is not in the vocabulary")
    return i

  def __getstate__(self) -> dict[str, Any]:
    return self._state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self._setup(state)

  def __repr__(self) -> str:
    return (f"HFTokenizer(path={self.path!r}, vocab_size={self.vocab_size}, pad_id={self.pad_id}, "
            f"bos_id={self.bos_id}, eos_id={self.eos_id}, image_id={self.image_id})")

  @property
  def backend(self) -> tokenizers.Tokenizer:
    """The ``tokenizers.Tokenizer`` itself."""
    return self._tok

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Token ids of ``text`` (special-token strings in it, like ``<|im_start|>``, are single
    ids); each ``<image>`` becomes ``image_id``."""
    return self._encode_around_image(
        text, lambda part: self._tok.encode(part, add_special_tokens=False).ids,
        add_bos=add_bos, add_eos=add_eos)

  @property
  def stop_ids(self) -> tuple[int, ...]:
    return self._stop_ids

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of one id sequence: stops at the first stop id, skips pad and BOS, ``<image>``
    literal."""
    return self._decode_around_image(
        ids, lambda part, _: self._tok.decode(part, skip_special_tokens=False))

  def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *,
                          add_generation_prompt: bool = False, **kwargs: Any) -> str:
    """The model's chat template rendered for ``messages`` (the prompt text, not ids)."""
    if not self.chat_template:
      raise ValueError(f"{self.path}: the tokenizer has no chat template")
    return render_chat_template(self.chat_template, messages,
                                add_generation_prompt=add_generation_prompt,
                                special_tokens=self.special_tokens, **kwargs)


def _token_string(value: Any, source: str, field: str) -> str | None:
  # tokenizer_config.json spells a special token as a string or an AddedToken dict.
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, Mapping) and isinstance(value.get("content"), str):
    return value["content"]
  raise ValueError(f"{source}: field {field} must be a string or an object with 'content', got "
                   f"{value!r}")


def _ids(value: Any) -> list[int]:
  if isinstance(value, int) and not isinstance(value, bool):
    return [value]
  return [v for v in value if isinstance(v, int)] if isinstance(value, list) else []


def load_hf_tokenizer(path: str | os.PathLike, hf_config: Mapping[str, Any] | None = None
                      ) -> HFTokenizer | None:
  """The tokenizer of a Hugging Face checkpoint directory, or None when it has no
  ``tokenizer.json``.

  Special tokens come from ``tokenizer_config.json`` (else from ``hf_config``'s
  ``bos_token_id``/``eos_token_id``/``pad_token_id``), the chat template from
  ``chat_template.jinja`` (transformers >= 5 saves it there) or ``tokenizer_config.json``'s
  ``chat_template`` (a string, or a list of named templates: "default" is used), stop ids from
  ``hf_config`` and ``generation_config.json``'s ``eos_token_id``.
  """
  path = os.fspath(path)
  json_path = os.path.join(path, "tokenizer.json")
  if not os.path.isfile(json_path):
    return None
  with open(json_path, encoding="utf-8") as f:
    tokenizer_json = f.read()
  config_path = os.path.join(path, "tokenizer_config.json")
  tok_config = hf_checkpoint.read_json(config_path) if os.path.isfile(config_path) else {}
  special = {name: _token_string(tok_config.get(name), config_path, name)
             for name in SPECIAL_NAMES}
  hf_config = hf_config or {}
  backend = tokenizers.Tokenizer.from_str(tokenizer_json)
  for name in ("bos_token", "eos_token", "pad_token"):
    ids = _ids(hf_config.get(f"{name}_id"))
    if special[name] is None and ids:
      special[name] = backend.id_to_token(ids[0])

  template = tok_config.get("chat_template")
  if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
    template = named.get("default")
  if template is not None and not isinstance(template, str):
    raise ValueError(f"{config_path}: field chat_template must be a string or a list of named "
                     f"templates, got {type(template).__name__}")
  jinja_path = os.path.join(path, "chat_template.jinja")
  if os.path.isfile(jinja_path):
    with open(jinja_path, encoding="utf-8") as f:
      template = f.read()

  stop = _ids(hf_config.get("eos_token_id"))
  generation_path = os.path.join(path, "generation_config.json")
  if os.path.isfile(generation_path):
    stop += _ids(hf_checkpoint.read_json(generation_path).get("eos_token_id"))
  return HFTokenizer(tokenizer_json, path=json_path, special=special, chat_template=template,
                     stop_ids=stop)
