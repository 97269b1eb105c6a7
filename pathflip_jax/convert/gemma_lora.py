"""LoRA adapters of ``models.decoder`` in Hugging Face PEFT's format, for Gemma models.

  gemma_lora.save_lora_adapters(model, "adapter/", base_model_name_or_path="google/gemma-3-1b-pt")
  model = decoder.Decoder(config, rngs=..., lora=gemma_lora.read_lora_config("adapter/"))
  gemma_lora.load_lora_adapters(model, "adapter/")

A directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` as PEFT's
``save_pretrained`` writes them for a ``GemmaForCausalLM`` (or Gemma 2/3 text), so PEFT's
``PeftModel`` loads them from that local directory onto the Hugging Face model, and
``merge_and_unload`` gives the same weights as ``lora_lib.merge_lora``.

Tensors (float32), for each layer i and target t:

  base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_A.weight   [r, in]
  base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_B.weight   [out, r]
  base_model.model.model.layers.{i}.mlp.{gate,up,down}_proj.lora_{A,B}.weight

torch's Linear computes ``x @ W.T`` with W [out, in], so PEFT's update is ``scale * B @ A`` in W's
layout. Our ``a`` [in..., r] and ``b`` [r, out...] flatten their input/output axes in the order
the Gemma importer (``convert/gemma.py``) uses for the kernels: (head, channel) for q/k/v outputs
and o inputs. Hence ``lora_A = a.reshape(in, r).T`` and ``lora_B = b.reshape(r, out).T`` for every
target, and the importer maps ``W + scale * B @ A`` to the merged kernel.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pathflip_jax.convert import mapping as mapping_lib, safetensors_io
from pathflip_jax.models import decoder, lora as lora_lib

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ConversionError = mapping_lib.ConversionError

_PREFIX = "base_model.model.model.layers"
_HF_MODULE = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
              "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
# PEFT options that change what the tensors mean; the decoder implements their defaults only.
_UNSUPPORTED = {"use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
                "bias": "none", "layers_to_transform": None, "modules_to_save": None,
                "lora_bias": False, "layer_replication": None}
# Those written to adapter_config.json: fields older PEFT versions know too (lora_bias and
# layer_replication are recent; a version that does not know a field may refuse the file).
_WRITTEN = ("use_rslora", "use_dora", "fan_in_fan_out", "bias", "layers_to_transform",
            "modules_to_save")


def _key(layer: int, target: str, factor: str) -> str:
  return f"{_PREFIX}.{layer}.{_HF_MODULE[target]}.{target}.lora_{factor}.weight"


def _peft_tensors(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(lora_A [r, in], lora_B [out, r]) of our a [in..., r], b [r, out...]."""
  r = a.shape[-1]
  return a.reshape(-1, r).T, b.reshape(r, -1).T


def save_lora_adapters(model: decoder.Decoder, path: str | os.PathLike,
                       base_model_name_or_path: str | None = None) -> None:
  """Writes the (unmerged) adapters of ``model`` to the directory ``path`` in PEFT's format.

  The directory is created if needed; existing adapter files in it are replaced.
  """
  if model.lora is None:
    raise ValueError("save_lora_adapters: the model has no LoRA adapters (built without lora=)")
  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  lora = model.lora
  tensors = {}
  # One transfer for all adapters (they may live on accelerators, possibly sharded).
  host = jax.device_get({k: (ad.a[...], ad.b[...])
                         for k, ad in lora_lib.lora_adapters(model).items()})
  for (i, target), (a, b) in host.items():
    lora_a, lora_b = _peft_tensors(np.asarray(a, np.float32), np.asarray(b, np.float32))
    tensors[_key(i, target, "A")] = lora_a
    tensors[_key(i, target, "B")] = lora_b
  safetensors_io.save_file(tensors, os.path.join(path, WEIGHTS_FILE), metadata={"format": "pt"})
  config = {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model_name_or_path,
      "r": lora.rank,
      "lora_alpha": lora.alpha,
      "lora_dropout": lora.dropout,
      "target_modules": list(lora.targets),
      "inference_mode": True,
      "init_lora_weights": True,
      "rank_pattern": {},
      "alpha_pattern": {},
      **{field: _UNSUPPORTED[field] for field in _WRITTEN},
  }
  with open(os.path.join(path, CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2)
    f.write("\n")


def read_lora_config(path: str | os.PathLike) -> lora_lib.LoraConfig:
  """The ``LoraConfig`` of a PEFT adapter directory (to build the model to load it into).

  Raises ValueError naming the file and field for a non-LoRA adapter or options the decoder does
  not implement (rsLoRA, DoRA, biases, per-module ranks, a subset of layers, regex targets).
  """
  file = os.path.join(os.fspath(path), CONFIG_FILE)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{file} does not exist (expected a PEFT adapter directory)")
  try:
    with open(file, encoding="utf-8") as f:
      cfg: Any = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{file}: not valid JSON ({e})") from None
  if not isinstance(cfg, dict):
    raise ValueError(f"{file}: expected a JSON object")
  if cfg.get("peft_type") != "LORA":
    raise ValueError(f"{file}: peft_type is {cfg.get('peft_type')!r}, expected 'LORA'")
  for field, default in _UNSUPPORTED.items():
    value = cfg.get(field, default)
    if value != default and not (default is None and value == []):
      raise ValueError(f"{file}: field {field}={value!r} is not supported (the decoder "
                       f"implements {default!r} only)")
  for field in ("rank_pattern", "alpha_pattern"):
    if cfg.get(field):
      raise ValueError(f"{file}: field {field}={cfg[field]!r} is not supported (one rank and "
                       "alpha for all adapters)")
  targets = cfg.get("target_modules")
  if not isinstance(targets, list):
    raise ValueError(f"{file}: field target_modules must be a list of module names, got "
                     f"{targets!r} (regex targets are not supported)")
  try:
    return lora_lib.LoraConfig(rank=cfg.get("r"), alpha=cfg.get("lora_alpha"),
                              dropout=cfg.get("lora_dropout", 0.0), targets=tuple(targets))
  except ValueError as e:
    raise ValueError(f"{file}: {e}") from None


def load_lora_adapters(model: decoder.Decoder, path: str | os.PathLike) -> decoder.Decoder:
  """Sets the adapters of ``model`` from a PEFT adapter directory; returns ``model``.

  ``model`` must have been built with the directory's rank, alpha and targets (see
  ``read_lora_config``; dropout may differ). A missing, unexpected or mis-shaped tensor is a
  ``ConversionError`` naming the file and key.
  """
  if model.lora is None:
    raise ValueError("load_lora_adapters: the model has no LoRA adapters; build it with "
                     f"lora=gemma_lora.read_lora_config({os.fspath(path)!r})")
  path = os.fspath(path)
  config_file = os.path.join(path, CONFIG_FILE)
  saved = read_lora_config(path)
  for field in ("rank", "alpha"):
    if getattr(saved, field) != getattr(model.lora, field):
      raise ValueError(f"{config_file}: {field} {getattr(saved, field)} differs from the model's "
                       f"LoraConfig.{field} {getattr(model.lora, field)}")
  if set(saved.targets) != set(model.lora.targets):
    raise ValueError(f"{config_file}: target_modules {list(saved.targets)} differ from the "
                     f"model's LoraConfig.targets {list(model.lora.targets)}")

  file = os.path.join(path, WEIGHTS_FILE)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{file} does not exist")
  tensors = safetensors_io.load_file(file)
  adapters = lora_lib.lora_adapters(model)
  problems, expected = [], {}
  for (i, target), adapter in adapters.items():
    r = adapter.a.shape[-1]
    n_in, n_out = int(np.prod(adapter.a.shape[:-1])), int(np.prod(adapter.b.shape[1:]))
    for factor, shape in (("A", (r, n_in)), ("B", (n_out, r))):
      key = _key(i, target, factor)
      expected[key] = shape
      if key not in tensors:
        problems.append(f"missing key {key} (expected shape {shape}) in {file}")
      elif tuple(tensors[key].shape) != shape:
        problems.append(f"shape mismatch for {key} in {file}: file {tuple(tensors[key].shape)}, "
                        f"model expects {shape}")
  problems += [f"unexpected key {key} in {file} (shape {tuple(tensors[key].shape)}) matches no "
               "adapter of the model" for key in sorted(set(tensors) - set(expected))]
  if problems:
    raise ConversionError(f"{len(problems)} problem(s) loading LoRA adapters:\n  "
                          + mapping_lib.listing(problems))
  for (i, target), adapter in adapters.items():
    lora_a, lora_b = tensors[_key(i, target, "A")], tensors[_key(i, target, "B")]
    adapter.a.set_value(jnp.asarray(lora_a.T.reshape(adapter.a.shape), adapter.a.dtype))
    adapter.b.set_value(jnp.asarray(lora_b.T.reshape(adapter.b.shape), adapter.b.dtype))
  return model
