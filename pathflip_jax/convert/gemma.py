"""Imports Hugging Face–format Gemma checkpoints (Gemma 1, 2 and 3 text) into ``models.decoder``,
and exports a decoder as one.

  model, config, report = load_gemma("gemma-3-1b-pt/")
  save_gemma(model, "out/", model_type="gemma3_text", tokenizer_path="tokenizer.model")

The directory holds ``config.json`` (``model_type`` gemma, gemma2 or gemma3_text),
``model.safetensors`` or shards listed in ``model.safetensors.index.json``, and optionally
``tokenizer.model`` (SentencePiece). Safetensors are read with the project's own reader, so
neither torch nor transformers is needed. Both config layouts are understood: transformers >= 5
(``rope_parameters``, ``layer_types``) and the older one of the published checkpoints
(``rope_theta``, ``rope_local_base_freq``, ``rope_scaling``, ``sliding_window_pattern``).

Weights (HF key under ``model.`` -> decoder parameter):

  embed_tokens                        -> embedding (tied with the output projection)
  layers.i.self_attn.{q,k,v}_proj     -> layers.i.attention.{q,k,v}_kernel [d, heads, c]
  layers.i.self_attn.o_proj           -> layers.i.attention.o_kernel [heads, c, d]
  layers.i.self_attn.{q,k}_norm       -> layers.i.attention.{q,k}_norm (Gemma 3)
  layers.i.mlp.{gate,up}_proj         -> layers.i.mlp.gate_up [d, 2, f] (gate first)
  layers.i.mlp.down_proj              -> layers.i.mlp.down
  layers.i.input_layernorm            -> layers.i.pre_attention_norm
  Gemma 1: layers.i.post_attention_layernorm -> layers.i.pre_mlp_norm (it is the pre-MLP norm)
  Gemma 2/3: layers.i.post_attention_layernorm   -> layers.i.post_attention_norm
             layers.i.pre_feedforward_layernorm  -> layers.i.pre_mlp_norm
             layers.i.post_feedforward_layernorm -> layers.i.post_mlp_norm
  norm                                -> final_norm

HF's Gemma RMSNorm computes ``x * (1 + weight)``, the decoder's ``(1 + scale)``: norms copy as
they are. The mapping is strict: a missing, unused or mis-shaped tensor is a
:class:`ConversionError` naming the file and key.

Export (:func:`save_gemma`) inverts the same mapping: ``config.json`` in the transformers >= 5
layout (:func:`gemma_hf_config`, checked by reading it back with :func:`gemma_config`), weights
in float32 or bfloat16, optionally sharded with an index, and the tokenizer. ``load_gemma`` reads
an export back bit for bit; ``transformers.AutoModelForCausalLM`` loads it. A setting the chosen
model type cannot state (sandwich norms for gemma, q/k norm for gemma2, a local RoPE base for
gemma2, ...) is a ValueError naming the field.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import json
import math
import os
import shutil
import struct
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from pathflip_jax import tokenizer as tokenizer_lib
from pathflip_jax.convert import hf_checkpoint, mapping as mapping_lib
from pathflip_jax.models import decoder

MODEL_TYPES = ("gemma", "gemma2", "gemma3_text")
_SLIDING, _FULL = "sliding_attention", "full_attention"
_LAYER_TYPES = {_SLIDING: decoder.LOCAL, _FULL: decoder.GLOBAL}
# All name the tanh approximation of GELU ("gelu" is a legacy Gemma 1 value that HF reads as tanh).
_TANH_GELU = ("gelu_pytorch_tanh", "gelu_new", "gelu_tanh")


ImportReport = hf_checkpoint.ImportReport


# ----------------------------------------------------------------------------------- config


def _rope_entry(entry: Any, source: str, field: str) -> tuple[float | None, float]:
  """(theta, linear scale factor) of one RoPE parameter dict."""
  if entry is None:
    return None, 1.0
  if not isinstance(entry, Mapping):
    raise ValueError(f"{source}: {field} must be an object, got {entry!r}")
  kind = entry.get("rope_type", entry.get("type", "default"))
  if kind == "default":
    factor = 1.0
  elif kind == "linear":
    factor = float(entry.get("factor", 1.0))
  else:
    raise ValueError(f"{source}: {field} has rope_type {kind!r}; the decoder supports 'default' "
                     "and 'linear' only")
  theta = entry.get("rope_theta")
  return (None if theta is None else float(theta)), factor


def _rope(cfg: Mapping[str, Any], model_type: str, source: str
          ) -> tuple[float, float | None, float, float]:
  """(global theta, local theta or None, global scale factor, local scale factor)."""
  default_global = 1_000_000.0 if model_type == "gemma3_text" else 10_000.0
  params = cfg.get("rope_parameters")
  if params is not None:
    if not isinstance(params, Mapping):
      raise ValueError(f"{source}: rope_parameters must be an object, got {params!r}")
    if set(params) & set(_LAYER_TYPES):  # per layer type (Gemma 3)
      unknown = set(params) - set(_LAYER_TYPES)
      if unknown:
        raise ValueError(f"{source}: rope_parameters has unknown layer types {sorted(unknown)}")
      g_theta, g_factor = _rope_entry(params.get(_FULL), source, f"rope_parameters.{_FULL}")
      l_theta, l_factor = _rope_entry(params.get(_SLIDING), source,
                                      f"rope_parameters.{_SLIDING}")
    else:
      g_theta, g_factor = _rope_entry(params, source, "rope_parameters")
      l_theta, l_factor = g_theta, g_factor
  else:
    g_theta = cfg.get("rope_theta")
    g_factor = _rope_entry(cfg.get("rope_scaling"), source, "rope_scaling")[1]
    if model_type == "gemma3_text":  # rope_scaling applies to global layers only
      l_theta, l_factor = cfg.get("rope_local_base_freq", 10_000.0), 1.0
    else:
      l_theta, l_factor = g_theta, g_factor
  g_theta = default_global if g_theta is None else float(g_theta)
  l_theta = (10_000.0 if model_type == "gemma3_text" else g_theta) if l_theta is None \
      else float(l_theta)
  return g_theta, l_theta, g_factor, l_factor


def _layer_types(cfg: Mapping[str, Any], model_type: str, depth: int, source: str
                 ) -> tuple[str, ...]:
  if model_type == "gemma":
    return (decoder.GLOBAL,) * depth
  types = cfg.get("layer_types")
  if types is not None:
    if not isinstance(types, list) or len(types) != depth:
      raise ValueError(f"{source}: layer_types must list one type per layer ({depth}), got "
                       f"{types!r}")
    unknown = sorted(set(types) - set(_LAYER_TYPES))
    if unknown:
      raise ValueError(f"{source}: layer_types has unsupported types {unknown}; the decoder "
                       f"supports {sorted(_LAYER_TYPES)}")
    return tuple(_LAYER_TYPES[t] for t in types)
  # Older configs: Gemma 2 alternates local/global; Gemma 3 has every n-th layer global.
  period = 2 if model_type == "gemma2" else int(cfg.get("sliding_window_pattern", 6))
  if period < 1:
    raise ValueError(f"{source}: sliding_window_pattern must be >= 1, got {period}")
  return tuple(decoder.LOCAL if (i + 1) % period else decoder.GLOBAL for i in range(depth))


def _shortest_period(types: tuple[str, ...]) -> tuple[str, ...]:
  # The decoder repeats a pattern over depth; the shortest one reads best in a config dump.
  for n in range(1, len(types) + 1):
    if all(types[i] == types[i % n] for i in range(len(types))):
      return types[:n]
  return types


def gemma_config(hf_config: Mapping[str, Any], source: str = "config.json"
                 ) -> decoder.DecoderConfig:
  """The DecoderConfig of a Hugging Face Gemma ``config.json`` (as a dict).

  Raises ValueError naming ``source`` and the field for an unknown model type or a setting the
  decoder cannot express (biases, untied embeddings, bidirectional attention, another activation
  or RoPE type, RoPE scaling on Gemma 2's local layers).
  """
  cfg = hf_config
  model_type = cfg.get("model_type")
  if model_type not in MODEL_TYPES:
    hint = (" (a multimodal Gemma 3: import its text decoder, saved as gemma3_text)"
            if model_type == "gemma3" else "")
    raise ValueError(f"{source}: model_type {model_type!r} is not supported{hint}; expected one "
                     f"of {MODEL_TYPES}")

  def need(field: str) -> int:
    value = cfg.get(field)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      raise ValueError(f"{source}: field {field} must be a positive integer, got {value!r}")
    return value

  width, depth = need("hidden_size"), need("num_hidden_layers")
  num_heads, head_dim = need("num_attention_heads"), need("head_dim")
  num_kv_heads = need("num_key_value_heads") if cfg.get("num_key_value_heads") is not None \
      else num_heads
  mlp_width, vocab_size = need("intermediate_size"), need("vocab_size")

  activation = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
  if activation not in _TANH_GELU and not (model_type == "gemma" and activation == "gelu"):
    field = "hidden_activation" if cfg.get("hidden_activation") else "hidden_act"
    raise ValueError(f"{source}: field {field} is {activation!r}; the decoder's MLP is GeGLU "
                     f"with tanh GELU ({', '.join(_TANH_GELU)})")
  for field, ok in (("attention_bias", False), ("use_bidirectional_attention", False),
                    ("tie_word_embeddings", True)):
    value = cfg.get(field)
    if value is not None and bool(value) != ok:
      raise ValueError(f"{source}: field {field}={value!r} is not supported (the decoder needs "
                       f"{ok})")

  g_theta, l_theta, g_factor, l_factor = _rope(cfg, model_type, source)
  types = _layer_types(cfg, model_type, depth, source)
  has_local = decoder.LOCAL in types
  if has_local and l_factor != 1.0:
    raise ValueError(f"{source}: RoPE scaling (factor {l_factor}) on sliding-window layers is not "
                     "supported; the decoder scales global layers only")
  if not has_local and model_type != "gemma3_text":
    l_theta = None
  sliding_window = cfg.get("sliding_window") if has_local else None
  if has_local and not (isinstance(sliding_window, int) and sliding_window > 0):
    raise ValueError(f"{source}: field sliding_window must be a positive integer when layers "
                     f"are sliding_attention, got {sliding_window!r}")

  query_scale = None
  if model_type != "gemma":
    scalar = cfg.get("query_pre_attn_scalar", 256)
    if not isinstance(scalar, (int, float)) or scalar <= 0:
      raise ValueError(f"{source}: field query_pre_attn_scalar must be positive, got {scalar!r}")
    query_scale = None if scalar == head_dim else float(scalar) ** -0.5

  def softcap(field: str, default: float | None) -> float | None:
    value = cfg.get(field, default) if model_type != "gemma" else None
    return None if value is None else float(value)

  try:
    return decoder.DecoderConfig(
        vocab_size=vocab_size, width=width, depth=depth, num_heads=num_heads,
        num_kv_heads=num_kv_heads, head_dim=head_dim, mlp_width=mlp_width,
        rope_base=g_theta, rope_local_base=None if l_theta == g_theta else l_theta,
        rope_scale_factor=g_factor,
        max_len=int(cfg.get("max_position_embeddings") or 8192),
        attn_logit_softcap=softcap("attn_logit_softcapping",
                                   50.0 if model_type == "gemma2" else None),
        final_logit_softcap=softcap("final_logit_softcapping",
                                    30.0 if model_type == "gemma2" else None),
        sliding_window=sliding_window, attention_pattern=_shortest_period(types),
        query_scale=query_scale, qk_norm=model_type == "gemma3_text",
        post_norms=model_type != "gemma", norm_eps=float(cfg.get("rms_norm_eps", 1e-6)))
  except ValueError as e:
    raise ValueError(f"{source}: {e}") from None


# ----------------------------------------------------------------------------------- weights

Path = mapping_lib.Path
_Entry = mapping_lib.Entry
ConversionError = mapping_lib.ConversionError


def _mapping(config: decoder.DecoderConfig, model_type: str) -> dict[str, _Entry]:
  """HF key (without ``model.``) -> _Entry: ``hf_checkpoint.decoder_mapping``, Gemma's norms."""
  if model_type == "gemma":
    norms = hf_checkpoint.PRE_NORMS
  else:
    norms = {"input_layernorm": "pre_attention_norm",
             "post_attention_layernorm": "post_attention_norm",
             "pre_feedforward_layernorm": "pre_mlp_norm",
             "post_feedforward_layernorm": "post_mlp_norm"}
  return hf_checkpoint.decoder_mapping(config, norms)


def load_gemma(path: str | os.PathLike, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32
               ) -> tuple[decoder.Decoder, decoder.DecoderConfig, ImportReport]:
  """(decoder, its config, import report) of a Hugging Face Gemma checkpoint directory.

  ``dtype`` is the compute dtype; parameters are stored in ``param_dtype`` (float32 default).
  The report carries the SentencePiece ``tokenizer.model`` when the directory has one.
  """
  path = os.fspath(path)
  hf_config, config_path = hf_checkpoint.read_config(path)
  config = gemma_config(hf_config, source=config_path)
  model_type = hf_config["model_type"]

  model, files, ignored = hf_checkpoint.load_decoder_weights(
      path, config, _mapping(config, model_type), "Gemma", dtype, param_dtype)

  spm_path = os.path.join(path, "tokenizer.model")
  tok = tokenizer_lib.Tokenizer(spm_path) if os.path.isfile(spm_path) else None
  if tok is not None and tok.vocab_size > config.vocab_size:
    raise ConversionError(f"{spm_path} has {tok.vocab_size} pieces but {config_path} has "
                          f"vocab_size {config.vocab_size}")
  report = ImportReport(model_type=model_type, weight_files=tuple(files),
                        ignored_keys=tuple(ignored), tokenizer=tok)
  return model, config, report


# ----------------------------------------------------------------------------------- export

EXPORT_DTYPES = ("float32", "bfloat16")
_ARCHITECTURES = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                  "gemma3_text": "Gemma3ForCausalLM"}
# Settings each model type fixes (transformers' Gemma classes have no switch for them).
# What every Gemma shares: a Llama- or Qwen-family decoder (decoder.FAMILIES) differs in these.
_GEMMA_FAMILY = {"mlp_activation": "gelu_tanh", "norm_plus_one": True, "embed_scale": True,
                 "tie_embeddings": True, "rope_type": "linear"}
_FIXED: dict[str, dict[str, Any]] = {
    "gemma": {"qk_norm": False, "post_norms": False, "attn_logit_softcap": None,
              "final_logit_softcap": None, **_GEMMA_FAMILY},
    "gemma2": {"qk_norm": False, "post_norms": True, **_GEMMA_FAMILY},
    "gemma3_text": {"qk_norm": True, "post_norms": True, **_GEMMA_FAMILY},
}
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def _canonical(config: decoder.DecoderConfig) -> decoder.DecoderConfig:
  """``config`` with settings that do not change the model in one form: the pattern as its
  shortest period over depth, no window or local RoPE base without local layers, a local base
  equal to the global one as None, and an explicit ``head_dim ** -0.5`` query scale as None."""
  types = config.layer_types
  has_local = decoder.LOCAL in types
  local_base = config.rope_local_base
  if not has_local or local_base == config.rope_base:
    local_base = None
  query_scale = None if config.query_scale == config.head_dim ** -0.5 else config.query_scale
  return dataclasses.replace(
      config, attention_pattern=_shortest_period(types), rope_local_base=local_base,
      sliding_window=config.sliding_window if has_local else None, query_scale=query_scale)


def _query_pre_attn_scalar(config: decoder.DecoderConfig) -> int | None:
  """HF's integer query_pre_attn_scalar n with n ** -0.5 == query_scale exactly, or None."""
  if config.query_scale is None:
    return config.head_dim
  if not (math.isfinite(config.query_scale) and config.query_scale > 0):
    return None
  n = round(config.query_scale ** -2)
  # The importer computes float(n) ** -0.5; anything else would not re-import the same config.
  return n if n > 0 and float(n) ** -0.5 == config.query_scale else None


def _inexpressible(config: decoder.DecoderConfig, model_type: str) -> list[str]:
  """What ``model_type``'s config.json cannot state about ``config``, one line per field."""
  problems = []
  for field, required in _FIXED[model_type].items():
    value = getattr(config, field)
    if value != required:
      fits = [t for t in MODEL_TYPES if _FIXED[t].get(field, value) == value]
      problems.append(f"field {field}={value!r}: {model_type} requires {required!r} (model types "
                      f"that can state {value!r}: {', '.join(fits) or 'none'})")
  has_local = decoder.LOCAL in config.layer_types
  if model_type == "gemma":
    if has_local:
      problems.append(f"field attention_pattern={config.attention_pattern!r}: gemma has global "
                      "layers only (sliding-window layers need gemma2 or gemma3_text)")
    if config.query_scale is not None and config.query_scale != config.head_dim ** -0.5:
      problems.append(f"field query_scale={config.query_scale!r}: gemma scales queries by "
                      "head_dim ** -0.5 (another scale needs gemma2 or gemma3_text)")
  elif _query_pre_attn_scalar(config) is None:
    problems.append(f"field query_scale={config.query_scale!r} is not n ** -0.5 for an integer n "
                    "(transformers' query_pre_attn_scalar is an integer)")
  if model_type == "gemma2" and has_local:
    # Gemma 2 has one RoPE setting for all layers.
    if config.rope_local_base is not None and config.rope_local_base != config.rope_base:
      problems.append(f"field rope_local_base={config.rope_local_base!r}: gemma2 uses one RoPE "
                      f"base ({config.rope_base!r}) for all layers (a separate local base needs "
                      "gemma3_text)")
    if config.rope_scale_factor != 1.0:
      problems.append(f"field rope_scale_factor={config.rope_scale_factor!r}: gemma2 would scale "
                      "sliding-window layers too (global-only scaling needs gemma3_text)")
  return problems


def _rope_json(theta: float, factor: float) -> dict[str, Any]:
  if factor == 1.0:
    return {"rope_type": "default", "rope_theta": float(theta)}
  return {"rope_type": "linear", "rope_theta": float(theta), "factor": float(factor)}


def gemma_hf_config(config: decoder.DecoderConfig, model_type: str, *, dtype: str = "float32",
                    extra: Mapping[str, Any] | None = None,
                    tokenizer: tokenizer_lib.Tokenizer | None = None) -> dict[str, Any]:
  """The Hugging Face ``config.json`` (transformers >= 5 layout) of ``config`` as ``model_type``.

  The inverse of :func:`gemma_config`: it reads the dict back as ``config`` up to settings that
  do not change the model (see ``_canonical``). Special token ids come from ``tokenizer`` (else
  Gemma's <pad>=0, <eos>=1, <bos>=2); ``extra`` is merged last (token ids, ``transformers_version``
  ...). Raises ValueError naming each field ``model_type`` cannot express, or that ``extra``
  changes.
  """
  if model_type not in MODEL_TYPES:
    raise ValueError(f"model_type {model_type!r} is not supported; expected one of {MODEL_TYPES}")
  if dtype not in EXPORT_DTYPES:
    raise ValueError(f"dtype {dtype!r} is not supported; expected one of {EXPORT_DTYPES}")
  problems = _inexpressible(config, model_type)
  if problems:
    raise ValueError(f"cannot export this decoder as {model_type}:\n  "
                     + mapping_lib.listing(problems))
  c = _canonical(config)
  types = c.layer_types
  out: dict[str, Any] = {
      "architectures": [_ARCHITECTURES[model_type]], "model_type": model_type, "dtype": dtype,
      "vocab_size": c.vocab_size, "hidden_size": c.width, "intermediate_size": c.mlp_width,
      "num_hidden_layers": c.depth, "num_attention_heads": c.num_heads,
      "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
      # Gemma 1's field is hidden_act; Gemma 2/3 name it hidden_activation.
      ("hidden_act" if model_type == "gemma" else "hidden_activation"): "gelu_pytorch_tanh",
      "max_position_embeddings": c.max_len, "rms_norm_eps": float(c.norm_eps),
      "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": True,
      "use_bidirectional_attention": False, "use_cache": True,
      "pad_token_id": 0 if tokenizer is None else tokenizer.pad_id,
      "eos_token_id": 1 if tokenizer is None else tokenizer.eos_id,
      "bos_token_id": 2 if tokenizer is None else tokenizer.bos_id,
  }
  if model_type == "gemma3_text":
    out["rope_parameters"] = {
        _FULL: _rope_json(c.rope_base, c.rope_scale_factor),
        # The decoder never scales local positions.
        _SLIDING: _rope_json(c.rope_base if c.rope_local_base is None else c.rope_local_base, 1.0),
    }
  else:
    out["rope_parameters"] = _rope_json(c.rope_base, c.rope_scale_factor)
  if model_type != "gemma":
    out.update({
        "layer_types": [_SLIDING if t == decoder.LOCAL else _FULL for t in types],
        "sliding_window": c.sliding_window,
        "query_pre_attn_scalar": _query_pre_attn_scalar(c),
        # Written even when None: Gemma 2's defaults (50 / 30) would apply to a missing field.
        "attn_logit_softcapping": c.attn_logit_softcap,
        "final_logit_softcapping": c.final_logit_softcap,
    })
  out.update(extra or {})

  # The importer is the judge: whatever it reads back must be this decoder.
  back = _canonical(gemma_config(out, source="the exported config"))
  changed = [f"{f.name}: {getattr(c, f.name)!r} -> {getattr(back, f.name)!r}"
             for f in dataclasses.fields(c) if getattr(c, f.name) != getattr(back, f.name)]
  if changed:
    raise ValueError(f"the exported {model_type} config does not state this decoder (extra_config "
                     "overrides an architecture field?):\n  " + mapping_lib.listing(changed))
  return out


def _model_params(model: decoder.Decoder, entries: Mapping[str, _Entry]) -> dict[Path, Any]:
  """The model's parameters by path, checked to be exactly those the mapping writes."""
  params = {path: variable.get_value()
            for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  mapped = {e.path[:-1] if isinstance(e.path[-1], int) else e.path for e in entries.values()}
  unmapped = sorted(set(params) - mapped, key=str)
  if unmapped:
    raise ConversionError(
        f"{len(unmapped)} model parameter(s) have no Gemma checkpoint key (merge LoRA adapters "
        "into the kernels before exporting):\n  "
        + mapping_lib.listing(["/".join(map(str, p)) for p in unmapped]))
  missing = sorted(mapped - set(params), key=str)
  assert not missing, f"the mapping writes parameters the model lacks: {missing}"
  return params


def _hf_tensor(params: Mapping[Path, Any], entry: _Entry, dtype: str) -> np.ndarray:
  """The HF tensor of one mapping entry: the inverse of ``entry.transform``."""
  if isinstance(entry.path[-1], int):  # one half of the fused gate/up kernel [d, 2, f]
    value = np.asarray(params[entry.path[:-1]])[:, entry.path[-1]]
  else:
    value = np.asarray(params[entry.path])
  value = value.astype(np.float32)  # bfloat16 parameters widen exactly
  # Every 2-D weight but the embedding is a torch Linear [out, in], which the importer
  # transposes and splits into the kernel's axes; norms and the embedding copy as they are.
  if len(entry.shape) == 2 and entry.path != ("embedding",):
    value = value.reshape(entry.shape[::-1]).T
  assert value.shape == entry.shape, (entry.path, value.shape, entry.shape)
  if dtype == "bfloat16":
    value = value.astype(jnp.bfloat16)  # ml_dtypes: round to nearest even, like torch
  return np.ascontiguousarray(value)


def _write_safetensors(path: str, tensors: list[tuple[str, tuple[int, ...], Any]], code: str,
                       itemsize: int) -> None:
  """Writes ``(name, shape, make_array)`` tensors, all of safetensors dtype ``code``.

  Unlike ``safetensors_io.save_file`` this writes BF16 and makes one tensor at a time, so a
  multi-GB model is never held twice in memory.
  """
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}  # transformers requires format
  offset = 0
  for name, shape, _ in tensors:
    size = math.prod(shape) * itemsize
    header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
    offset += size
  blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
  blob += b" " * (-len(blob) % 8)  # aligns the data section, as the spec allows
  tmp = f"{path}.tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name, shape, make in tensors:
      array = make()
      raw = array.view(np.uint16) if code == "BF16" else array
      data = raw.astype(raw.dtype.newbyteorder("<"), copy=False).tobytes()
      begin, end = header[name]["data_offsets"]
      assert array.shape == tuple(shape) and len(data) == end - begin, (name, array.shape, shape)
      f.write(data)
  os.replace(tmp, path)


def _shards(sizes: list[int], max_bytes: int | None) -> list[list[int]]:
  """Indices of consecutive tensors per shard, each shard at most ``max_bytes`` (a larger tensor
  gets a shard of its own), as transformers' ``save_pretrained`` splits."""
  shards: list[list[int]] = [[]]
  total = 0
  for i, size in enumerate(sizes):
    if max_bytes is not None and shards[-1] and total + size > max_bytes:
      shards.append([])
      total = 0
    shards[-1].append(i)
    total += size
  return shards


def save_gemma(model: decoder.Decoder, path: str | os.PathLike, *, model_type: str,
               tokenizer_path: str | os.PathLike | None = None, dtype: Any = "float32",
               max_shard_bytes: int | None = None,
               extra_config: Mapping[str, Any] | None = None) -> list[str]:
  """Writes ``model`` as a Hugging Face Gemma checkpoint directory; returns the files written.

  The directory gets ``config.json`` (:func:`gemma_hf_config`), the weights as
  ``model.safetensors`` in ``dtype`` ("float32" or "bfloat16"), or, when ``max_shard_bytes`` is
  given and they do not fit in one file of that size, ``model-0000i-of-0000n.safetensors`` shards
  and ``model.safetensors.index.json``, and a copy of ``tokenizer_path`` as ``tokenizer.model``.
  Weight files of an earlier save in the directory are removed, so the importer cannot read
  stale ones. :func:`load_gemma` reads the directory back as the same parameters (bfloat16:
  rounded to nearest even) and config; ``transformers.AutoModelForCausalLM`` loads it too.

  Raises ValueError naming each config field ``model_type`` cannot express, and
  ConversionError for parameters with no checkpoint key (unmerged LoRA adapters), before writing
  anything.
  """
  path = os.fspath(path)
  dtype = dtype if isinstance(dtype, str) else np.dtype(dtype).name
  if max_shard_bytes is not None and max_shard_bytes <= 0:
    raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
  tok = None
  if tokenizer_path is not None:
    tok = tokenizer_lib.Tokenizer(tokenizer_path)
    if tok.vocab_size > model.config.vocab_size:
      raise ValueError(f"{tokenizer_path} has {tok.vocab_size} pieces but the decoder's "
                       f"vocab_size is {model.config.vocab_size}")
  hf_config = gemma_hf_config(model.config, model_type, dtype=dtype, extra=extra_config,
                              tokenizer=tok)
  entries = _mapping(model.config, model_type)
  params = _model_params(model, entries)

  code, itemsize = ("BF16", 2) if dtype == "bfloat16" else ("F32", 4)
  keys = list(entries)  # embedding, final norm, then layer by layer
  shards = _shards([math.prod(entries[k].shape) * itemsize for k in keys], max_shard_bytes)
  names = (["model.safetensors"] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  os.makedirs(path, exist_ok=True)
  written, weight_map = [], {}
  for name, shard in zip(names, shards):
    tensors = [("model." + keys[i], entries[keys[i]].shape,
                functools.partial(_hf_tensor, params, entries[keys[i]], dtype)) for i in shard]
    _write_safetensors(os.path.join(path, name), tensors, code, itemsize)
    written.append(os.path.join(path, name))
    weight_map.update({tensor_name: name for tensor_name, _, _ in tensors})
  if len(shards) > 1:
    total = sum(math.prod(entries[k].shape) * itemsize for k in keys)
    written.append(_write_json(os.path.join(path, _WEIGHT_FILES[1]),
                               {"metadata": {"total_size": total}, "weight_map": weight_map}))
  # The importer prefers an index and reads every shard it lists or finds: leftovers of an
  # earlier save would shadow or join the new weights.
  for name in os.listdir(path):
    file = os.path.join(path, name)
    if (name in _WEIGHT_FILES or fnmatch.fnmatch(name, "model-*-of-*.safetensors")) \
        and file not in written and os.path.isfile(file):
      os.remove(file)
  written.append(_write_json(os.path.join(path, "config.json"), hf_config))
  if tokenizer_path is not None:
    target = os.path.join(path, "tokenizer.model")
    if not (os.path.exists(target) and os.path.samefile(tokenizer_path, target)):
      shutil.copyfile(tokenizer_path, target)
    written.append(target)
  return written


def _write_json(path: str, value: Any) -> str:
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2, sort_keys=False)
    f.write("\n")
  os.replace(tmp, path)
  return path
