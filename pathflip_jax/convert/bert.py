"""Imports a Hugging Face BERT-family checkpoint (bert-base, BioBERT, Bio_ClinicalBERT,
PubMedBERT, ...) into the Q-Former's text branch and self-attention, as BLIP-2 starts its
Q-Former from BERT.

  checkpoint = load_bert("/models/Bio_ClinicalBERT")   # config.json + model.safetensors
  check_qformer(qformer_config, checkpoint)             # sizes must be the checkpoint's
  assign(model.qformer, checkpoint.params)              # or partial_init in a trainer

The directory holds ``config.json`` and ``model.safetensors`` (or a sharded
``model.safetensors.index.json``, or ``pytorch_model.bin`` read with
``torch.load(weights_only=True)``). Keys are those of ``BertModel`` or, under ``bert.``, of
``BertForMaskedLM`` / ``BertForPreTraining`` (old TensorFlow-converted files' LayerNorm
``gamma``/``beta`` are read as ``weight``/``bias``).

What goes where (Q-Former in post-norm form, ``norm_position="post"``):

  embeddings.word_embeddings                  -> text_embed/token_embed
  embeddings.position_embeddings
    + embeddings.token_type_embeddings[0]     -> text_embed/pos_embed   (the project's texts are
                                                 one segment: type 0 is a constant per position)
  embeddings.LayerNorm                        -> embed_norm
  layer.i.attention.self.{query,key,value}    -> layers/i/self_attention/{q,k,v}_{kernel,bias}
  layer.i.attention.output.dense              -> layers/i/self_attention/o_{kernel,bias}
  layer.i.attention.output.LayerNorm          -> layers/i/self_norm
  layer.i.intermediate.dense                  -> layers/i/{text,query}_mlp/fc1
  layer.i.output.dense                        -> layers/i/{text,query}_mlp/fc2
  layer.i.output.LayerNorm                    -> layers/i/{text,query}_mlp_norm

The query branch's feed-forward starts as a copy of BERT's (BLIP-2's ``*_query`` weights do the
same). Left initialised: cross-attention and its norms, the learned queries, the patch-feature
projection. Not used: the pooler, the MLM / NSP heads, token types other than 0.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from pathflip_jax.convert import mapping as mapping_lib, timm_vit
from pathflip_jax.models import qformer as qformer_lib

ConversionError = mapping_lib.ConversionError
_ANCHOR = "embeddings.word_embeddings.weight"
# Checkpoint keys that have no place in the Q-Former (read, reported, not imported).
_UNUSED = re.compile(r"^(pooler\.|cls\.|embeddings\.position_ids$|embeddings\.token_type_ids$)")
# QFormerConfig field -> the config.json field it comes from.
CONFIG_FIELDS = {"width": "hidden_size", "depth": "num_hidden_layers",
                 "num_heads": "num_attention_heads", "vocab_size": "vocab_size",
                 "max_text_len": "max_position_embeddings", "norm_eps": "layer_norm_eps"}


@dataclasses.dataclass(frozen=True)
class BertCheckpoint:
  """A BERT checkpoint read for the Q-Former.

  Attributes:
    path: the checkpoint directory.
    config: its config.json.
    qformer_fields: the QFormerConfig fields it fixes (sizes, norm eps and position, pad id).
    params: Q-Former parameter name ("layers/0/self_attention/q_kernel") -> float32 value.
    unused: checkpoint keys that were read and not imported (pooler, heads).
    weights: the weights file(s) read.
  """

  path: str
  config: dict[str, Any]
  qformer_fields: dict[str, Any]
  params: dict[str, np.ndarray]
  unused: list[str]
  weights: list[str]


# ---------------------------------------------------------------------------------- config


def read_config(path: str, name: str = "config.bert") -> dict[str, Any]:
  """The checkpoint's config.json, checked to describe a BERT this Q-Former computes; ``name``:
  the setting that gave ``path``, for the errors."""
  config_path = os.path.join(path, "config.json")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{name}={path}: no such BERT checkpoint directory (nothing is "
                            "downloaded: give a local Hugging Face checkpoint directory)")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{config_path} not found ({name}={path}): a BERT checkpoint "
                            "directory holds config.json and model.safetensors")
  with open(config_path, encoding="utf-8") as f:
    try:
      config = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{config_path}: not valid JSON ({e})") from None
  missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                         "intermediate_size", "vocab_size", "max_position_embeddings")
             if k not in config]
  if missing:
    raise ValueError(f"{config_path}: missing {', '.join(missing)} (not a BERT config?)")
  act = config.get("hidden_act", "gelu")
  if act != "gelu":
    # The Q-Former's MLP is the exact (erf) GELU, which is what BERT's "gelu" names.
    raise ValueError(f"{config_path}: hidden_act={act!r}; only 'gelu' (exact, erf) is supported")
  position = config.get("position_embedding_type", "absolute")
  if position != "absolute":
    raise ValueError(f"{config_path}: position_embedding_type={position!r}; only 'absolute' "
                     "(learned) position embeddings are supported")
  return config


def qformer_fields(config: Mapping[str, Any], source: str = "config.json") -> dict[str, Any]:
  """The QFormerConfig fields a BERT config.json fixes (post-norm, its sizes and eps)."""
  width, hidden = int(config["hidden_size"]), int(config["intermediate_size"])
  mlp_ratio = hidden / width
  if int(width * mlp_ratio) != hidden:
    raise ValueError(f"{source}: intermediate_size={hidden} is not a width multiple the "
                     f"Q-Former can express (hidden_size={width})")
  fields = {q: config[c] for q, c in CONFIG_FIELDS.items() if c in config}
  fields.update(mlp_ratio=mlp_ratio, norm_position="post",
                norm_eps=float(config.get("layer_norm_eps", 1e-12)))
  return fields


def check_qformer(config: qformer_lib.QFormerConfig, checkpoint: BertCheckpoint,
                  name: str = "config.model.qformer") -> None:
  """Raises ValueError naming each field of ``config`` that differs from the checkpoint's
  (``vocab_size`` comes from the tokenizer in a run: a mismatch there means another tokenizer)."""
  source = os.path.join(checkpoint.path, "config.json")
  wrong = []
  for field, value in checkpoint.qformer_fields.items():
    mine = getattr(config, field)
    same = np.isclose(mine, value, rtol=1e-9, atol=0) if isinstance(value, float) else \
        mine == value
    if not same:
      origin = CONFIG_FIELDS.get(field) or {"mlp_ratio": "intermediate_size / hidden_size",
                                            "norm_position": "BERT's post-norm",
                                            "pad_id": "pad_token_id"}.get(field, field)
      wrong.append(f"{name}.{field}={mine!r} but the checkpoint has {value!r} ({origin})")
  if wrong:
    raise ValueError(f"the Q-Former does not match the BERT checkpoint {source}:\n  "
                     + "\n  ".join(wrong))


# ---------------------------------------------------------------------------------- weights


def _read_weights(path: str) -> tuple[dict[str, np.ndarray], list[str]]:
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index, encoding="utf-8") as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
    sd: dict[str, np.ndarray] = {}
    for name in files:
      sd.update(timm_vit.load_state_dict(os.path.join(path, name)))
    return sd, [os.path.join(path, n) for n in files]
  for name in ("model.safetensors", "pytorch_model.bin"):
    file = os.path.join(path, name)
    if os.path.exists(file):
      return timm_vit.load_state_dict(file), [file]
  raise FileNotFoundError(f"{path}: no model.safetensors (or model.safetensors.index.json, "
                          "pytorch_model.bin) in the BERT checkpoint directory")


def select_bert(state_dict: Mapping[str, np.ndarray], source: str
                ) -> tuple[dict[str, np.ndarray], list[str]]:
  """(BertModel tensors with any ``bert.`` prefix stripped, keys outside the BertModel)."""
  sd = {re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight",
               re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k)): v
        for k, v in state_dict.items()}
  if _ANCHOR in sd:
    return sd, []
  if "bert." + _ANCHOR in sd:
    inner = {k[len("bert."):]: v for k, v in sd.items() if k.startswith("bert.")}
    return inner, sorted(k for k in sd if not k.startswith("bert."))
  raise ConversionError(f"{source}: no {_ANCHOR} (or bert.{_ANCHOR}): not a BERT checkpoint "
                        f"(first keys: {sorted(sd)[:5]})")


Transform = Callable[[np.ndarray], np.ndarray]


def _mapping(config: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], list[str],
                                                         Transform]]:
  """BertModel key -> (its shape, the Q-Former parameters it feeds, the layout change)."""
  d, h = int(config["hidden_size"]), int(config["num_attention_heads"])
  c, m = d // h, int(config["intermediate_size"])
  same = lambda x: x  # noqa: E731
  out: dict[str, tuple[tuple[int, ...], list[str], Transform]] = {
      "embeddings.word_embeddings.weight": ((int(config["vocab_size"]), d),
                                            ["text_embed/token_embed"], same),
      "embeddings.LayerNorm.weight": ((d,), ["embed_norm/scale"], same),
      "embeddings.LayerNorm.bias": ((d,), ["embed_norm/bias"], same),
  }
  for i in range(int(config["num_hidden_layers"])):
    k, q = f"encoder.layer.{i}.", f"layers/{i}/"
    for torch_name, ours in (("query", "q"), ("key", "k"), ("value", "v")):
      # torch Linear weight [out=(h, c), in=d] -> kernel [d, h, c].
      out[f"{k}attention.self.{torch_name}.weight"] = (
          (d, d), [f"{q}self_attention/{ours}_kernel"], lambda w: w.T.reshape(d, h, c))
      out[f"{k}attention.self.{torch_name}.bias"] = (
          (d,), [f"{q}self_attention/{ours}_bias"], lambda b: b.reshape(h, c))
    out[f"{k}attention.output.dense.weight"] = (
        (d, d), [f"{q}self_attention/o_kernel"], lambda w: w.T.reshape(h, c, d))
    out[f"{k}attention.output.dense.bias"] = ((d,), [f"{q}self_attention/o_bias"], same)
    out[f"{k}attention.output.LayerNorm.weight"] = ((d,), [f"{q}self_norm/scale"], same)
    out[f"{k}attention.output.LayerNorm.bias"] = ((d,), [f"{q}self_norm/bias"], same)
    for layer, fc, shape in (("intermediate", "fc1", (m, d)), ("output", "fc2", (d, m))):
      out[f"{k}{layer}.dense.weight"] = (
          shape, [f"{q}{b}_mlp/{fc}/kernel" for b in ("text", "query")], lambda w: w.T)
      out[f"{k}{layer}.dense.bias"] = (
          shape[:1], [f"{q}{b}_mlp/{fc}/bias" for b in ("text", "query")], same)
    out[f"{k}output.LayerNorm.weight"] = (
        (d,), [f"{q}{b}_mlp_norm/scale" for b in ("text", "query")], same)
    out[f"{k}output.LayerNorm.bias"] = (
        (d,), [f"{q}{b}_mlp_norm/bias" for b in ("text", "query")], same)
  return out


def load_bert(path: str, name: str = "config.bert") -> BertCheckpoint:
  """Reads a BERT checkpoint directory into Q-Former parameters.

  Strict: every tensor the config.json implies must be there with its shape, and every tensor
  of the BertModel must have a place (or be one of the known unused ones); otherwise a
  :class:`ConversionError` lists each offending key with the checkpoint's and the expected
  shape, naming the weights file. ``name``: the setting that gave ``path``, for the errors.
  """
  path = os.fspath(path)
  config = read_config(path, name)
  fields = qformer_fields(config, os.path.join(path, "config.json"))
  raw, files = _read_weights(path)
  source = ", ".join(files)
  sd, outside = select_bert(raw, source)
  entries = _mapping(config)
  d = int(config["hidden_size"])
  positions = (int(config["max_position_embeddings"]), d)
  types = (int(config.get("type_vocab_size", 2)), d)
  problems = []
  expected = dict({k: v[0] for k, v in entries.items()},
                  **{"embeddings.position_embeddings.weight": positions,
                     "embeddings.token_type_embeddings.weight": types})
  for key, shape in expected.items():
    if key not in sd:
      problems.append(f"missing key {key} (expected shape {shape})")
    elif tuple(sd[key].shape) != shape:
      problems.append(f"shape mismatch for {key}: checkpoint {tuple(sd[key].shape)}, "
                      f"config.json implies {shape}")
  unused = sorted(k for k in sd if _UNUSED.search(k)) + outside
  for key in sorted(set(sd) - set(expected) - set(unused)):
    problems.append(f"unexpected key {key} (shape {tuple(sd[key].shape)}) has no place in the "
                    "Q-Former (a BERT variant this importer does not know?)")
  if problems:
    raise ConversionError(f"{len(problems)} problem(s) importing BERT from {source} "
                          f"(config {os.path.join(path, 'config.json')}):\n  "
                          + mapping_lib.listing(problems))

  params: dict[str, np.ndarray] = {}
  for key, (_, names, transform) in entries.items():
    value = np.asarray(transform(np.asarray(sd[key], np.float32)), np.float32)
    for name in names:
      params[name] = value
  # Every text is segment 0: its type embedding is a constant per position, folded in here.
  params["text_embed/pos_embed"] = (
      sd["embeddings.position_embeddings.weight"].astype(np.float32)
      + sd["embeddings.token_type_embeddings.weight"][0].astype(np.float32))
  if sd["embeddings.token_type_embeddings.weight"].shape[0] > 1:
    unused.append("embeddings.token_type_embeddings.weight[1:]")
  fields["pad_id"] = int(config.get("pad_token_id") or 0)
  return BertCheckpoint(path=path, config=config, qformer_fields=fields, params=params,
                        unused=unused, weights=files)


# ------------------------------------------------------------------------------- into a model


def _names(module: nnx.Module) -> dict[str, nnx.Variable]:
  return {"/".join(str(p) for p in path): variable
          for path, variable in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def split_names(qformer: nnx.Module, params: Mapping[str, np.ndarray]
                ) -> tuple[list[str], list[str]]:
  """(Q-Former parameters the import sets, those it leaves initialised), by name; a name of
  ``params`` the Q-Former lacks is a :class:`ConversionError` (not post-norm?)."""
  names = _names(qformer)
  stray = sorted(set(params) - set(names))
  if stray:
    raise ConversionError(f"imported BERT parameters with no place in this Q-Former (is it "
                          f"norm_position='post'?): {stray[:5]}")
  return sorted(set(params)), sorted(set(names) - set(params))


def assign(qformer: nnx.Module, params: Mapping[str, np.ndarray]) -> list[str]:
  """Sets the Q-Former's imported parameters in place (shapes checked); returns the names of
  those left as initialised."""
  names = _names(qformer)
  _, left = split_names(qformer, params)
  for name, value in params.items():
    variable = names[name]
    if tuple(variable.shape) != tuple(value.shape):
      raise ConversionError(f"Q-Former parameter {name} is {tuple(variable.shape)}, the BERT "
                            f"import gives {tuple(value.shape)}")
    variable.set_value(jnp.asarray(value, variable.dtype))
  return left


def summary(names: list[str]) -> str:
  """Parameter names with layer numbers folded ("layers/*/self_norm/scale" once)."""
  folded = sorted({re.sub(r"^layers/\d+/", "layers/*/", n) for n in names})
  return ", ".join(folded)
