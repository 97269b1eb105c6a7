"""Imports Hugging Face–format Llama (SmolLM2, Llama 2/3) and Qwen3 checkpoints into
``models.decoder`` (its "llama" and "qwen3" families).

  model, config, report = load_llama("SmolLM2-135M-Instruct/")
  prompt = report.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

The directory holds ``config.json`` (``model_type`` llama or qwen3), ``model.safetensors`` or
shards listed in ``model.safetensors.index.json``, and optionally ``tokenizer.json`` with
``tokenizer_config.json`` (special tokens, ``chat_template``; see ``hf_tokenizer``). Both config
layouts are understood: transformers >= 5 (``rope_parameters``) and the older one of published
checkpoints (``rope_theta``, ``rope_scaling``). RoPE types: default, linear and llama3.

The weights map as in ``hf_checkpoint`` (``input_layernorm`` -> ``pre_attention_norm``,
``post_attention_layernorm`` -> ``pre_mlp_norm``; Qwen3's ``self_attn.{q,k}_norm`` ->
``attention.{q,k}_norm``; an untied ``lm_head.weight`` -> ``lm_head``). HF stores Llama and Qwen
q/k projections in the "rotate half" RoPE layout, which is the decoder's, and their RMSNorm
weights plainly (``x * w``, ``norm_plus_one=False``), so every tensor copies as it is up to the
kernel reshapes. The mapping is strict: a missing, unused or mis-shaped tensor is a
:class:`ConversionError` naming the file and key.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax.numpy as jnp

from pathflip_jax.convert import hf_checkpoint, hf_tokenizer
from pathflip_jax.models import decoder

MODEL_TYPES = {"llama": "llama", "qwen3": "qwen3"}  # config.json model_type -> decoder family
ConversionError = hf_checkpoint.ConversionError
ImportReport = hf_checkpoint.ImportReport


def rope_fields(entry: Any, source: str, field: str) -> dict[str, Any]:
  """The DecoderConfig RoPE fields (``rope_base`` when given, scaling) of one HF RoPE dict
  (``rope_parameters`` or the older ``rope_scaling``; None: no scaling)."""
  if entry is None:
    return {}
  if not isinstance(entry, Mapping):
    raise ValueError(f"{source}: {field} must be an object, got {entry!r}")
  kind = entry.get("rope_type", entry.get("type", "default"))
  out: dict[str, Any] = {}
  if entry.get("rope_theta") is not None:
    out["rope_base"] = float(entry["rope_theta"])

  def number(name: str) -> float:
    value = entry.get(name)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
      raise ValueError(f"{source}: {field}.{name} must be a number for rope_type {kind!r}, got "
                       f"{value!r}")
    return float(value)

  if kind == "default":
    pass
  elif kind == "linear":
    out["rope_scale_factor"] = number("factor")
  elif kind == "llama3":
    out.update(rope_type="llama3", rope_scale_factor=number("factor"),
               rope_low_freq_factor=number("low_freq_factor"),
               rope_high_freq_factor=number("high_freq_factor"),
               rope_original_max_len=int(number("original_max_position_embeddings")))
  else:
    raise ValueError(f"{source}: {field} has rope_type {kind!r}; the decoder supports 'default', "
                     "'linear' and 'llama3'")
  return out


def llama_config(hf_config: Mapping[str, Any], source: str = "config.json"
                 ) -> decoder.DecoderConfig:
  """The DecoderConfig of a Hugging Face Llama or Qwen3 ``config.json`` (as a dict).

  Raises ValueError naming ``source`` and the field for an unknown model type or a setting the
  decoder cannot express (biases, another activation or RoPE type, sliding-window layers).
  """
  cfg = hf_config
  model_type = cfg.get("model_type")
  if model_type not in MODEL_TYPES:
    raise ValueError(f"{source}: model_type {model_type!r} is not supported; expected one of "
                     f"{sorted(MODEL_TYPES)} (Gemma checkpoints: convert.gemma)")
  need = lambda field: hf_checkpoint.positive_int(cfg, field, source)
  width, depth, num_heads = need("hidden_size"), need("num_hidden_layers"), \
      need("num_attention_heads")
  num_kv_heads = need("num_key_value_heads") if cfg.get("num_key_value_heads") is not None \
      else num_heads
  # Older Llama configs have no head_dim: it is width / heads.
  head_dim = need("head_dim") if cfg.get("head_dim") is not None else width // num_heads
  activation = cfg.get("hidden_act", "silu")
  if activation != "silu":
    raise ValueError(f"{source}: field hidden_act is {activation!r}; the decoder's {model_type} "
                     "MLP is SwiGLU (silu)")
  for field in ("attention_bias", "mlp_bias", "use_sliding_window"):
    if cfg.get(field):
      raise ValueError(f"{source}: field {field}={cfg[field]!r} is not supported (the decoder "
                       "needs false)")
  types = cfg.get("layer_types")
  if types is not None and set(types) != {"full_attention"}:
    raise ValueError(f"{source}: field layer_types has {sorted(set(types))}; the {model_type} "
                     "import supports full_attention layers only")

  rope: dict[str, Any] = {}
  params = cfg.get("rope_parameters")
  if params is not None:
    rope = rope_fields(params, source, "rope_parameters")
  else:
    if cfg.get("rope_theta") is not None:
      rope["rope_base"] = float(cfg["rope_theta"])
    rope.update(rope_fields(cfg.get("rope_scaling"), source, "rope_scaling"))
  try:
    return decoder.family_config(
        MODEL_TYPES[model_type], vocab_size=need("vocab_size"), width=width, depth=depth,
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        mlp_width=need("intermediate_size"),
        max_len=int(cfg.get("max_position_embeddings") or 8192),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        # transformers' LlamaConfig and Qwen3Config default to untied embeddings.
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), **rope)
  except ValueError as e:
    raise ValueError(f"{source}: {e}") from None


def load_llama(path: str | os.PathLike, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32
               ) -> tuple[decoder.Decoder, decoder.DecoderConfig, ImportReport]:
  """(decoder, its config, import report) of a Hugging Face Llama or Qwen3 checkpoint directory.

  ``dtype`` is the compute dtype; parameters are stored in ``param_dtype`` (float32 default).
  The report carries the ``tokenizer.json`` tokenizer (an ``hf_tokenizer.HFTokenizer`` with the
  chat template) when the directory has one.
  """
  path = os.fspath(path)
  hf_config, config_path = hf_checkpoint.read_config(path)
  config = llama_config(hf_config, source=config_path)
  model_type = hf_config["model_type"]
  family = {"llama": "Llama", "qwen3": "Qwen3"}[model_type]

  model, files, ignored = hf_checkpoint.load_decoder_weights(
      path, config, hf_checkpoint.decoder_mapping(config, hf_checkpoint.PRE_NORMS), family,
      dtype, param_dtype)

  tok = hf_tokenizer.load_hf_tokenizer(path, hf_config)
  if tok is not None and tok.vocab_size > config.vocab_size:
    raise ConversionError(f"{tok.path} has {tok.vocab_size} tokens but {config_path} has "
                          f"vocab_size {config.vocab_size}")
  report = ImportReport(model_type=model_type, weight_files=tuple(files),
                        ignored_keys=tuple(ignored), tokenizer=tok)
  return model, config, report
