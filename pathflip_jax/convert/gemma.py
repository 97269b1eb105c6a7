"""Imports Hugging Face–format Gemma checkpoints (Gemma 1, 2 and 3 text) into ``models.decoder``.

  model, config, report = load_gemma("gemma-3-1b-pt/")

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
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from pathflip_jax import tokenizer as tokenizer_lib
from pathflip_jax.convert import mapping as mapping_lib, safetensors_io
from pathflip_jax.models import decoder

MODEL_TYPES = ("gemma", "gemma2", "gemma3_text")
_SLIDING, _FULL = "sliding_attention", "full_attention"
_LAYER_TYPES = {_SLIDING: decoder.LOCAL, _FULL: decoder.GLOBAL}
# All name the tanh approximation of GELU ("gelu" is a legacy Gemma 1 value that HF reads as tanh).
_TANH_GELU = ("gelu_pytorch_tanh", "gelu_new", "gelu_tanh")


@dataclasses.dataclass(frozen=True)
class ImportReport:
  """What ``load_gemma`` read.

  Attributes:
    model_type: config.json's model_type.
    weight_files: the safetensors files read.
    ignored_keys: tensors present but not needed (an ``lm_head.weight`` equal to the embedding).
    tokenizer: the ``tokenizer.model`` wrapper, or None when the directory has none.
  """

  model_type: str
  weight_files: tuple[str, ...]
  ignored_keys: tuple[str, ...]
  tokenizer: tokenizer_lib.Tokenizer | None


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


def _mapping(config: decoder.DecoderConfig, model_type: str) -> dict[str, Any]:
  """HF key (without ``model.``) -> _Entry, or a list of _Entry parts fused into one parameter."""
  d, h, k, c, f = (config.width, config.num_heads, config.num_kv_heads, config.head_dim,
                   config.mlp_width)
  entries: dict[str, _Entry] = {
      "embed_tokens.weight": _Entry(("embedding",), (config.vocab_size, d)),
      "norm.weight": _Entry(("final_norm", "scale"), (d,)),
  }
  if model_type == "gemma":
    norms = {"input_layernorm": "pre_attention_norm", "post_attention_layernorm": "pre_mlp_norm"}
  else:
    norms = {"input_layernorm": "pre_attention_norm",
             "post_attention_layernorm": "post_attention_norm",
             "pre_feedforward_layernorm": "pre_mlp_norm",
             "post_feedforward_layernorm": "post_mlp_norm"}
  for i in range(config.depth):
    hf, ours = f"layers.{i}.", ("layers", i)
    attn = ours + ("attention",)
    # Linear weights are [out, in]; output rows are ordered (head, channel).
    entries[hf + "self_attn.q_proj.weight"] = _Entry(
        attn + ("q_kernel",), (h * c, d), lambda w: w.T.reshape(d, h, c))
    entries[hf + "self_attn.k_proj.weight"] = _Entry(
        attn + ("k_kernel",), (k * c, d), lambda w: w.T.reshape(d, k, c))
    entries[hf + "self_attn.v_proj.weight"] = _Entry(
        attn + ("v_kernel",), (k * c, d), lambda w: w.T.reshape(d, k, c))
    entries[hf + "self_attn.o_proj.weight"] = _Entry(
        attn + ("o_kernel",), (d, h * c), lambda w: w.T.reshape(h, c, d))
    if config.qk_norm:
      entries[hf + "self_attn.q_norm.weight"] = _Entry(attn + ("q_norm", "scale"), (c,))
      entries[hf + "self_attn.k_norm.weight"] = _Entry(attn + ("k_norm", "scale"), (c,))
    # gate_up [d, 2, f]: gate in [:, 0], up in [:, 1]; each is assembled by _assemble.
    entries[hf + "mlp.gate_proj.weight"] = _Entry(ours + ("mlp", "gate_up", 0), (f, d),
                                                  lambda w: w.T)
    entries[hf + "mlp.up_proj.weight"] = _Entry(ours + ("mlp", "gate_up", 1), (f, d),
                                                lambda w: w.T)
    entries[hf + "mlp.down_proj.weight"] = _Entry(ours + ("mlp", "down"), (d, f), lambda w: w.T)
    for hf_norm, our_norm in norms.items():
      entries[hf + hf_norm + ".weight"] = _Entry(ours + (our_norm, "scale"), (d,))
  return entries


def _weight_files(path: str) -> list[str]:
  """The safetensors files of a checkpoint directory, in shard order."""
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index):
    try:
      with open(index, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise ConversionError(f"{index}: not a safetensors index (no weight_map: {e})") from None
    names = sorted(set(weight_map.values()))
    files = [os.path.join(path, name) for name in names]
    for file in files:
      if not os.path.isfile(file):
        raise FileNotFoundError(f"{index} lists shard {os.path.basename(file)}, which is missing")
    return files
  single = os.path.join(path, "model.safetensors")
  if os.path.isfile(single):
    return [single]
  shards = sorted(glob.glob(os.path.join(path, "model-*-of-*.safetensors")))
  if shards:
    return shards
  raise FileNotFoundError(f"{path}: no model.safetensors, model.safetensors.index.json or "
                          "model-*-of-*.safetensors (only safetensors checkpoints are supported)")


def _read_tensors(files: list[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """All tensors of the shards, and the file each key came from."""
  tensors: dict[str, np.ndarray] = {}
  origin: dict[str, str] = {}
  for file in files:
    for key, value in safetensors_io.load_file(file).items():
      if key in tensors:
        raise ConversionError(f"tensor {key} is in both {origin[key]} and {file}")
      tensors[key], origin[key] = value, file
  return tensors, origin


def _strip_prefix(tensors: dict[str, np.ndarray], origin: dict[str, str], files: list[str]
                  ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  # CausalLM checkpoints nest the decoder under "model."; a bare GemmaModel has no prefix.
  if "model.embed_tokens.weight" in tensors:
    prefix = "model."
  elif "embed_tokens.weight" in tensors:
    prefix = ""
  else:
    raise ConversionError(f"missing key model.embed_tokens.weight in {', '.join(files)} (first "
                          f"keys: {sorted(tensors)[:5]}); not a Gemma text checkpoint")
  renamed = {(k[len(prefix):] if k.startswith(prefix) else k): k for k in tensors}
  return ({new: tensors[old] for new, old in renamed.items()},
          {new: f"{origin[old]} (key {old})" for new, old in renamed.items()})


def _assemble(tensors: Mapping[str, np.ndarray], origin: Mapping[str, str],
              entries: Mapping[str, _Entry], files: list[str]
              ) -> tuple[dict[Path, np.ndarray], list[str]]:
  """Decoder parameter values by path, and the keys that were present but left out."""
  problems, ignored = [], []
  for key, entry in entries.items():
    if key not in tensors:
      problems.append(f"missing key {key} (expected shape {entry.shape}) in "
                      f"{', '.join(files)}")
    elif tuple(tensors[key].shape) != entry.shape:
      problems.append(f"shape mismatch for {key} in {origin[key]}: checkpoint "
                      f"{tuple(tensors[key].shape)}, model expects {entry.shape}")
  for key in sorted(set(tensors) - set(entries)):
    # Tied embeddings: a saved lm_head is harmless only if it is the embedding itself.
    if key == "lm_head.weight" and "embed_tokens.weight" in tensors and np.array_equal(
        tensors[key], tensors["embed_tokens.weight"]):
      ignored.append(key)
    else:
      problems.append(f"unexpected key {key} in {origin[key]} (shape "
                      f"{tuple(tensors[key].shape)}) is not used by this Gemma config")
  if problems:
    raise ConversionError(f"{len(problems)} problem(s) loading the Gemma checkpoint:\n  "
                          + mapping_lib.listing(problems))
  values: dict[Path, np.ndarray] = {}
  parts: dict[Path, dict[int, np.ndarray]] = {}
  for key, entry in entries.items():
    value = np.asarray(entry.transform(np.asarray(tensors[key])), np.float32)
    if isinstance(entry.path[-1], int):  # one half of the fused gate/up kernel
      parts.setdefault(entry.path[:-1], {})[entry.path[-1]] = value
    else:
      values[entry.path] = value
  for path, halves in parts.items():
    values[path] = np.stack([halves[j] for j in sorted(halves)], axis=1)
  return values, ignored


def load_gemma(path: str | os.PathLike, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32
               ) -> tuple[decoder.Decoder, decoder.DecoderConfig, ImportReport]:
  """(decoder, its config, import report) of a Hugging Face Gemma checkpoint directory.

  ``dtype`` is the compute dtype; parameters are stored in ``param_dtype`` (float32 default).
  The report carries the SentencePiece ``tokenizer.model`` when the directory has one.
  """
  path = os.fspath(path)
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{config_path} does not exist (expected a Hugging Face checkpoint "
                            "directory)")
  try:
    with open(config_path, encoding="utf-8") as f:
      hf_config = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{config_path}: not valid JSON ({e})") from None
  if not isinstance(hf_config, dict):
    raise ValueError(f"{config_path}: expected a JSON object")
  config = gemma_config(hf_config, source=config_path)
  model_type = hf_config["model_type"]

  files = _weight_files(path)
  tensors, origin = _strip_prefix(*_read_tensors(files), files)
  values, ignored = _assemble(tensors, origin, _mapping(config, model_type), files)
  del tensors

  abstract = nnx.eval_shape(lambda: decoder.Decoder(config, rngs=nnx.Rngs(0), dtype=dtype,
                                                    param_dtype=param_dtype))
  model = mapping_lib.fill(abstract, values, "HF")

  spm_path = os.path.join(path, "tokenizer.model")
  tok = tokenizer_lib.Tokenizer(spm_path) if os.path.isfile(spm_path) else None
  if tok is not None and tok.vocab_size > config.vocab_size:
    raise ConversionError(f"{spm_path} has {tok.vocab_size} pieces but {config_path} has "
                          f"vocab_size {config.vocab_size}")
  report = ImportReport(model_type=model_type, weight_files=tuple(files),
                        ignored_keys=tuple(ignored), tokenizer=tok)
  return model, config, report
