"""What the Hugging Face decoder importers share (``gemma``, ``llama``, and ``gguf`` for the
mapping): reading ``config.json`` and safetensors shards, the HF key -> decoder parameter mapping,
its strict check against the checkpoint, and building the filled decoder.

Weights (HF key under ``model.`` -> decoder parameter), the same in every family:

  embed_tokens                        -> embedding
  lm_head (top level, untied models)  -> lm_head
  layers.i.self_attn.{q,k,v}_proj     -> layers.i.attention.{q,k,v}_kernel [d, heads, c]
  layers.i.self_attn.o_proj           -> layers.i.attention.o_kernel [heads, c, d]
  layers.i.self_attn.{q,k}_norm       -> layers.i.attention.{q,k}_norm (Gemma 3, Qwen3)
  layers.i.mlp.{gate,up}_proj         -> layers.i.mlp.gate_up [d, 2, f] (gate first)
  layers.i.mlp.down_proj              -> layers.i.mlp.down
  norm                                -> final_norm

and the layer norms each family names in its own way (``norms`` of :func:`decoder_mapping`).
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

from pathflip_jax.convert import mapping as mapping_lib, safetensors_io
from pathflip_jax.models import decoder

Path = mapping_lib.Path
Entry = mapping_lib.Entry
ConversionError = mapping_lib.ConversionError
# Llama, Qwen and Gemma 1: one norm before attention, one before the MLP.
PRE_NORMS = {"input_layernorm": "pre_attention_norm", "post_attention_layernorm": "pre_mlp_norm"}


@dataclasses.dataclass(frozen=True)
class ImportReport:
  """What an importer read.

  Attributes:
    model_type: config.json's model_type (for GGUF: general.architecture).
    weight_files: the files read.
    ignored_keys: tensors present but not needed (an ``lm_head.weight`` equal to the embedding).
    tokenizer: the tokenizer wrapper (``tokenizer.Tokenizer`` for SentencePiece,
      ``hf_tokenizer.HFTokenizer`` for tokenizer.json / GGUF), or None when there is none.
  """

  model_type: str
  weight_files: tuple[str, ...]
  ignored_keys: tuple[str, ...]
  tokenizer: Any


def read_json(path: str) -> dict[str, Any]:
  """A JSON object file of a checkpoint; errors name the file."""
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(value, dict):
    raise ValueError(f"{path}: expected a JSON object")
  return value


def read_config(path: str) -> tuple[dict[str, Any], str]:
  """(config.json as a dict, its path) of a checkpoint directory; clear errors when absent or
  malformed."""
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{config_path} does not exist (expected a Hugging Face checkpoint "
                            "directory)")
  return read_json(config_path), config_path


def positive_int(cfg: Mapping[str, Any], field: str, source: str) -> int:
  """``cfg[field]``, which must be a positive integer (ValueError naming source and field)."""
  value = cfg.get(field)
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise ValueError(f"{source}: field {field} must be a positive integer, got {value!r}")
  return value


def decoder_mapping(config: decoder.DecoderConfig, norms: Mapping[str, str]) -> dict[str, Entry]:
  """HF key (without ``model.``) -> Entry; ``norms`` maps each layer norm's HF name to ours.

  The two halves of the fused gate/up kernel are entries whose path ends in 0 / 1
  (:func:`assemble` stacks them).
  """
  d, h, k, c, f = (config.width, config.num_heads, config.num_kv_heads, config.head_dim,
                   config.mlp_width)
  entries: dict[str, Entry] = {
      "embed_tokens.weight": Entry(("embedding",), (config.vocab_size, d)),
      "norm.weight": Entry(("final_norm", "scale"), (d,)),
  }
  if not config.tie_embeddings:
    # Same layout as the embedding: [vocab, d].
    entries["lm_head.weight"] = Entry(("lm_head",), (config.vocab_size, d))
  for i in range(config.depth):
    hf, ours = f"layers.{i}.", ("layers", i)
    attn = ours + ("attention",)
    # Linear weights are [out, in]; output rows are ordered (head, channel).
    entries[hf + "self_attn.q_proj.weight"] = Entry(
        attn + ("q_kernel",), (h * c, d), lambda w: w.T.reshape(d, h, c))
    entries[hf + "self_attn.k_proj.weight"] = Entry(
        attn + ("k_kernel",), (k * c, d), lambda w: w.T.reshape(d, k, c))
    entries[hf + "self_attn.v_proj.weight"] = Entry(
        attn + ("v_kernel",), (k * c, d), lambda w: w.T.reshape(d, k, c))
    entries[hf + "self_attn.o_proj.weight"] = Entry(
        attn + ("o_kernel",), (d, h * c), lambda w: w.T.reshape(h, c, d))
    if config.qk_norm:
      entries[hf + "self_attn.q_norm.weight"] = Entry(attn + ("q_norm", "scale"), (c,))
      entries[hf + "self_attn.k_norm.weight"] = Entry(attn + ("k_norm", "scale"), (c,))
    entries[hf + "mlp.gate_proj.weight"] = Entry(ours + ("mlp", "gate_up", 0), (f, d),
                                                 lambda w: w.T)
    entries[hf + "mlp.up_proj.weight"] = Entry(ours + ("mlp", "gate_up", 1), (f, d),
                                               lambda w: w.T)
    entries[hf + "mlp.down_proj.weight"] = Entry(ours + ("mlp", "down"), (d, f), lambda w: w.T)
    for hf_norm, our_norm in norms.items():
      entries[hf + hf_norm + ".weight"] = Entry(ours + (our_norm, "scale"), (d,))
  return entries


def weight_files(path: str) -> list[str]:
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


def read_tensors(files: list[str], family: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """All tensors of the shards under their HF keys without the ``model.`` prefix, and where each
  came from (file and original key)."""
  tensors: dict[str, np.ndarray] = {}
  origin: dict[str, str] = {}
  for file in files:
    for key, value in safetensors_io.load_file(file).items():
      if key in tensors:
        raise ConversionError(f"tensor {key} is in both {origin[key]} and {file}")
      tensors[key], origin[key] = value, file
  # CausalLM checkpoints nest the decoder under "model."; a bare base model has no prefix.
  if "model.embed_tokens.weight" in tensors:
    prefix = "model."
  elif "embed_tokens.weight" in tensors:
    prefix = ""
  else:
    raise ConversionError(f"missing key model.embed_tokens.weight in {', '.join(files)} (first "
                          f"keys: {sorted(tensors)[:5]}); not a {family} text checkpoint")
  renamed = {(k[len(prefix):] if k.startswith(prefix) else k): k for k in tensors}
  return ({new: tensors[old] for new, old in renamed.items()},
          {new: f"{origin[old]} (key {old})" for new, old in renamed.items()})


def assemble(tensors: Mapping[str, np.ndarray], origin: Mapping[str, str],
             entries: Mapping[str, Entry], files: list[str], family: str
             ) -> tuple[dict[Path, np.ndarray], list[str]]:
  """Decoder parameter values by path, and the keys that were present but left out.

  Strict: a missing, unused or mis-shaped tensor is a ConversionError naming file and key.
  """
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
                      f"{tuple(tensors[key].shape)}) is not used by this {family} config")
  if problems:
    raise ConversionError(f"{len(problems)} problem(s) loading the {family} checkpoint:\n  "
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


def load_decoder_weights(path: str, config: decoder.DecoderConfig,
                         entries: Mapping[str, Entry], family: str, dtype: Any, param_dtype: Any
                         ) -> tuple[decoder.Decoder, list[str], list[str]]:
  """(decoder, weight files read, ignored keys) of a checkpoint directory's safetensors, mapped
  by ``entries``; each tensor is dropped once assembled, so one copy of the weights is alive."""
  files = weight_files(path)
  tensors, origin = read_tensors(files, family)
  values, ignored = assemble(tensors, origin, entries, files, family)
  del tensors
  return build_decoder(config, values, "HF", dtype, param_dtype), files, ignored


def build_decoder(config: decoder.DecoderConfig, values: Mapping[Path, np.ndarray], source: str,
                  dtype: Any = jnp.float32, param_dtype: Any = jnp.float32) -> decoder.Decoder:
  """A decoder of ``config`` holding ``values`` (never materialising random weights)."""
  abstract = nnx.eval_shape(lambda: decoder.Decoder(config, rngs=nnx.Rngs(0), dtype=dtype,
                                                    param_dtype=param_dtype))
  return mapping_lib.fill(abstract, values, source)
