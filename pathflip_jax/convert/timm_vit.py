"""Imports timm-format ViT weights (UNI, CONCH's vision trunk, ...) into ``models.vit``.

  model, config, weights_hash = load_timm_vit("uni/pytorch_model.bin", "vit_large_patch16",
                                              image_size=224)

Checkpoints are read from ``.safetensors`` (own reader, no package needed) or ``.bin/.pth/.pt``
through ``torch.load(weights_only=True)`` (PyTorch needed for those only; never plain pickle).
The mapping is strict: a missing key, an unused key or a shape mismatch is a
:class:`ConversionError` naming the key and the shapes, so a half-loaded encoder cannot go
unnoticed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from pathflip_jax.convert import mapping as mapping_lib, safetensors_io
from pathflip_jax.data import feature_shards
from pathflip_jax.models import vit

# Wrappers around a state dict in training checkpoints ({"model": sd, "optimizer": ...}).
_WRAPPER_KEYS = ("state_dict", "model", "module")
_TORCH_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")
_ANCHOR = "patch_embed.proj.weight"  # present in every timm ViT state dict


# ------------------------------------------------------------------------------------ reading


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """Tensors of a checkpoint file as numpy arrays (bf16 widened to float32).

  ``.safetensors`` is read directly; ``.bin/.pth/.pt/.ckpt`` with
  ``torch.load(map_location="cpu", weights_only=True)``, unwrapping ``{"state_dict": ...}`` or
  ``{"model": ...}``. Non-tensor entries of a torch checkpoint (epoch counters...) are dropped.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint {path} does not exist")
  if path.endswith(".safetensors"):
    return safetensors_io.load_file(path)
  if path.endswith(_TORCH_SUFFIXES):
    return _torch_load(path)
  raise ConversionError(f"{path}: unknown checkpoint format; expected .safetensors or one of "
                        f"{', '.join(_TORCH_SUFFIXES)}")


def _torch_load(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # noqa: PLC0415 - optional dependency, only for pickled checkpoints
  except ImportError:
    raise ImportError(
        f"reading {path} needs PyTorch (pip install torch); or convert the checkpoint to "
        ".safetensors, which is read without it") from None
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 - torch raises many types for unreadable files
    raise ConversionError(
        f"{path}: torch.load(weights_only=True) failed: {type(e).__name__}: {e}") from None
  for _ in range(3):  # {"model": {"state_dict": ...}} nests at most a couple of levels
    if not isinstance(obj, Mapping):
      break
    inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
    if inner is None:
      break
    obj = inner
  if not isinstance(obj, Mapping):
    raise ConversionError(f"{path}: expected a state dict, found {type(obj).__name__}")
  out = {}
  for key, value in obj.items():
    if isinstance(value, torch.Tensor):
      value = value.detach().cpu()
      if value.dtype == torch.bfloat16:  # numpy has no bfloat16
        value = value.float()
      out[str(key)] = value.numpy().copy()
  if not out:
    raise ConversionError(f"{path}: no tensors found in the checkpoint")
  return out


def select_vit_weights(state_dict: Mapping[str, np.ndarray],
                       prefix: str | None = None) -> tuple[dict[str, np.ndarray], str]:
  """The ViT's tensors with their prefix stripped, and the prefix that was used.

  ``module.`` (DistributedDataParallel) is always stripped. With ``prefix`` (e.g. ``"trunk."``,
  ``"visual.trunk."``) only keys under it are kept. Without, the prefix is found from the one key
  ending in ``patch_embed.proj.weight``: a whole CONCH checkpoint yields its ``visual.trunk.``
  tensors, and the text tower and pooler are left out.
  """
  sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
  if prefix is None:
    anchors = sorted(k[:-len(_ANCHOR)] for k in sd if k.endswith(_ANCHOR)
                     and (k == _ANCHOR or k[-len(_ANCHOR) - 1] == "."))
    if not anchors:
      raise ConversionError(
          f"no '{_ANCHOR}' in the checkpoint: not a timm ViT state dict (first keys: "
          f"{sorted(sd)[:5]})")
    if len(anchors) > 1:
      raise ConversionError(f"the checkpoint holds several ViTs (prefixes {anchors}); pass "
                            "prefix= to choose one")
    prefix = anchors[0]
    if prefix:
      logging.info("timm_vit: using the ViT under prefix %r", prefix)
  if not prefix:
    return sd, ""
  selected = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
  if not selected:
    raise ConversionError(f"no key starts with prefix {prefix!r} (first keys: {sorted(sd)[:5]})")
  return selected, prefix


# ----------------------------------------------------------------------- configuration from keys


def _square_side(n: int) -> int | None:
  side = math.isqrt(n)
  return side if side * side == n and side > 0 else None


def _pos_grid(length: int, num_prefix: int, pos_on_prefix: bool | None) -> tuple[int, bool]:
  """(grid side, pos_embed_on_prefix) of a pos_embed of ``length`` rows."""
  options = []
  for on_prefix in ((True, False) if pos_on_prefix is None else (pos_on_prefix,)):
    side = _square_side(length - (num_prefix if on_prefix else 0))
    if side is not None:
      options.append((side, on_prefix))
  if num_prefix == 0 and options:
    return options[0]
  if len(options) != 1:
    raise ConversionError(
        f"pos_embed has {length} rows, which is not a square patch grid plus "
        f"{num_prefix} prefix tokens (with or without them), or is ambiguous: {options}")
  return options[0]


def infer_config(state_dict: Mapping[str, np.ndarray], *, num_heads: int | None = None,
                 image_size: int | None = None, pool: str | None = None) -> vit.ViTConfig:
  """The ViTConfig of a timm ViT state dict (prefix already stripped).

  Read from keys and shapes: width, depth, patch size, MLP width, qkv bias, class token,
  registers (``reg_token``), layer scale (``ls1.gamma``), pre-norm, the trained image size (from
  the pos_embed grid), whether pos_embed covers the prefix tokens, ``fc_norm`` vs ``norm``, head.
  Not readable from shapes: ``num_heads`` (default width // 64, true of timm's ViT-Ti/S/B/L/H;
  give it for others) and ``pool`` (default: "mean" with ``fc_norm``, else "cls" if there is a
  class token, else "mean"). ``image_size`` overrides the trained size (pos_embed is resampled by
  :func:`vit_from_timm`).
  """
  sd = state_dict
  if _ANCHOR not in sd:
    raise ConversionError(f"no '{_ANCHOR}': not a timm ViT state dict (strip its prefix with "
                          f"select_vit_weights; first keys: {sorted(sd)[:5]})")
  proj = sd[_ANCHOR].shape
  if len(proj) != 4 or proj[1] != 3 or proj[2] != proj[3]:
    raise ConversionError(f"{_ANCHOR} has shape {tuple(proj)}; expected (width, 3, p, p)")
  width, patch = int(proj[0]), int(proj[2])
  block_ids = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
  depth = max(block_ids) + 1 if block_ids else 0
  if block_ids != set(range(depth)) or depth == 0:
    raise ConversionError(f"transformer blocks are not numbered 0..N-1: {sorted(block_ids)}")
  if "blocks.0.mlp.fc1.weight" not in sd:
    raise ConversionError("blocks.0.mlp.fc1.weight is missing (only timm's plain Mlp is supported,"
                          " not SwiGLU / fused MLPs)")
  if num_heads is None:
    if width % 64:
      raise ConversionError(f"width {width} is not a multiple of 64: give num_heads explicitly")
    num_heads = width // 64
  class_token = "cls_token" in sd
  num_registers = int(sd["reg_token"].shape[1]) if "reg_token" in sd else 0
  if "fc_norm.weight" in sd:
    fc_norm = True
  elif "norm.weight" in sd:
    fc_norm = False
  else:
    raise ConversionError("neither norm.weight nor fc_norm.weight: models without a final norm "
                          "are not supported")
  if pool is None:
    pool = "mean" if fc_norm or not class_token else "cls"
  if "pos_embed" not in sd:
    raise ConversionError("pos_embed is missing (models without absolute position embeddings "
                          "are not supported)")
  grid, on_prefix = _pos_grid(int(sd["pos_embed"].shape[1]), int(class_token) + num_registers,
                              None)
  return vit.ViTConfig(
      width=width, depth=depth, num_heads=num_heads,
      mlp_dim=int(sd["blocks.0.mlp.fc1.weight"].shape[0]),
      image_size=image_size or grid * patch, patch_size=patch,
      num_registers=num_registers, class_token=class_token, pos_embed_on_prefix=on_prefix,
      pre_norm="norm_pre.weight" in sd,
      layer_scale_init=1e-5 if "blocks.0.ls1.gamma" in sd else None,  # init only; gamma is loaded
      pool=pool, fc_norm=fc_norm,
      head_dim=int(sd["head.weight"].shape[0]) if "head.weight" in sd else None,
      qkv_bias="blocks.0.attn.qkv.bias" in sd)


# ----------------------------------------------------------------------------------- mapping

Path = mapping_lib.Path
_Entry = mapping_lib.Entry
ConversionError = mapping_lib.ConversionError


def _linear(path: Path, d_in: int, d_out: int) -> dict[str, _Entry]:
  # torch Linear weights are (out, in); NNX kernels are (in, out).
  return {"weight": _Entry(path + ("kernel",), (d_out, d_in), lambda w: w.T),
          "bias": _Entry(path + ("bias",), (d_out,))}


def _norm(path: Path, width: int) -> dict[str, _Entry]:
  return {"weight": _Entry(path + ("scale",), (width,)), "bias": _Entry(path + ("bias",), (width,))}


def _mapping(config: vit.ViTConfig, pos_len: int) -> dict[str, _Entry]:
  """timm key -> where it goes, its expected timm shape and the layout change."""
  d, p, h = config.width, config.patch_size, config.num_heads
  hd, m = d // h, config.mlp_hidden
  entries: dict[str, _Entry] = {}

  def add(prefix: str, group: dict[str, _Entry]):
    entries.update({f"{prefix}.{k}": v for k, v in group.items()})

  # conv weight (out, in, kh, kw) -> flattened (kh, kw, in) rows, matching the patch reshape.
  entries["patch_embed.proj.weight"] = _Entry(
      ("patch_kernel",), (d, 3, p, p), lambda w: w.transpose(2, 3, 1, 0).reshape(p * p * 3, d))
  if not config.pre_norm:
    entries["patch_embed.proj.bias"] = _Entry(("patch_bias",), (d,))
  if config.class_token:
    entries["cls_token"] = _Entry(("cls_token",), (1, 1, d), lambda x: x.reshape(1, d))
  if config.num_registers:
    r = config.num_registers
    entries["reg_token"] = _Entry(("reg_token",), (1, r, d), lambda x: x.reshape(r, d))
  entries["pos_embed"] = _Entry(("pos_embed",), (1, pos_len, d), lambda x: x[0])
  if config.pre_norm:
    add("norm_pre", _norm(("norm_pre",), d))
  for i in range(config.depth):
    b = ("blocks", i)
    add(f"blocks.{i}.norm1", _norm(b + ("norm1",), d))
    # qkv weight rows are ordered (q|k|v, head, head_dim), as timm's reshape(B, N, 3, H, hd).
    entries[f"blocks.{i}.attn.qkv.weight"] = _Entry(
        b + ("attn", "qkv_kernel"), (3 * d, d), lambda w: w.T.reshape(d, 3, h, hd))
    if config.qkv_bias:
      entries[f"blocks.{i}.attn.qkv.bias"] = _Entry(
          b + ("attn", "qkv_bias"), (3 * d,), lambda x: x.reshape(3, h, hd))
    entries[f"blocks.{i}.attn.proj.weight"] = _Entry(
        b + ("attn", "o_kernel"), (d, d), lambda w: w.T.reshape(h, hd, d))
    entries[f"blocks.{i}.attn.proj.bias"] = _Entry(b + ("attn", "o_bias"), (d,))
    add(f"blocks.{i}.norm2", _norm(b + ("norm2",), d))
    add(f"blocks.{i}.mlp.fc1", _linear(b + ("mlp", "fc1"), d, m))
    add(f"blocks.{i}.mlp.fc2", _linear(b + ("mlp", "fc2"), m, d))
    if config.layer_scale_init is not None:
      entries[f"blocks.{i}.ls1.gamma"] = _Entry(b + ("ls1",), (d,))
      entries[f"blocks.{i}.ls2.gamma"] = _Entry(b + ("ls2",), (d,))
  final = "fc_norm" if config.use_fc_norm else "norm"
  add(final, _norm((final,), d))
  if config.head_dim:
    add("head", _linear(("head",), d, config.head_dim))
  return entries


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
  """Keys' cubic convolution kernel (a=-0.5, as PIL and torch's antialiased bicubic)."""
  x = np.abs(x)
  return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                  np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def _resize_matrix(old: int, new: int) -> np.ndarray:
  """[new, old] bicubic resampling weights, half-pixel centres, kernel widened when shrinking."""
  scale = old / new
  support = max(scale, 1.0)  # antialiasing: a shrunk grid averages over the wider footprint
  centers = (np.arange(new) + 0.5) * scale
  weights = _cubic((np.arange(old)[None, :] + 0.5 - centers[:, None]) / support)
  # Taps past the border are dropped and the rest renormalised (no edge padding).
  return weights / weights.sum(axis=1, keepdims=True)


def resample_pos_embed(pos: np.ndarray, num_prefix: int, new_grid: int) -> np.ndarray:
  """pos_embed rows [prefix + g*g, D] -> [prefix + new_grid**2, D], patch part resampled bicubic.

  The kernel is the one of timm's ``resample_abs_pos_embed`` (torch bicubic with antialias=True,
  which is also ``jax.image.resize(..., "bicubic")``), so the result is what timm computes with
  ``dynamic_img_size=True`` or when it loads the checkpoint at another ``img_size``. Plain numpy:
  no XLA compilation for a one-off import step.
  """
  prefix, patches = pos[:num_prefix], pos[num_prefix:]
  old = _square_side(patches.shape[0])
  weights = _resize_matrix(old, new_grid)
  grid = patches.reshape(old, old, -1).astype(np.float64)
  grid = np.einsum("ih,jw,hwc->ijc", weights, weights, grid)
  return np.concatenate([prefix.astype(np.float32),
                         grid.reshape(new_grid * new_grid, -1).astype(np.float32)])


def vit_from_timm(state_dict: Mapping[str, np.ndarray], config: vit.ViTConfig, *,
                  image_size: int | None = None, dtype: Any = jnp.float32,
                  ) -> vit.VisionTransformer:
  """A VisionTransformer holding the weights of a timm ViT state dict (prefix stripped).

  Every key the config implies must be present with its timm shape and every key of the state
  dict must be used; otherwise :class:`ConversionError` lists each offending key with the
  checkpoint's and the expected shape. Weights are stored as float32; ``dtype`` is the model's
  compute dtype.

  Position embeddings: if ``image_size`` (or ``config.image_size``) differs from the grid the
  checkpoint was trained at, the patch part of pos_embed is resampled bicubically (the prefix
  rows are kept), as timm does; e.g. UNI (224 px, 14x14) run on 256-px patches gets a 16x16 grid.
  This matches timm's ``dynamic_img_size=True`` forward at that size.
  """
  if image_size is not None:
    config = dataclasses.replace(config, image_size=image_size)
  # pos_embed's length is the trained grid, which may differ from config's; its own check is below.
  pos_prefix = config.num_prefix_tokens if config.pos_embed_on_prefix else 0
  pos = state_dict.get("pos_embed")
  pos_len = int(pos.shape[1]) if pos is not None and pos.ndim == 3 else config.pos_embed_len
  entries = _mapping(config, pos_len)

  problems = []
  for key, entry in entries.items():
    if key not in state_dict:
      problems.append(f"missing key {key} (expected shape {entry.shape})")
    elif tuple(state_dict[key].shape) != entry.shape:
      problems.append(f"shape mismatch for {key}: checkpoint {tuple(state_dict[key].shape)}, "
                      f"model expects {entry.shape}")
  for key in sorted(set(state_dict) - set(entries)):
    problems.append(f"unexpected key {key} (shape {tuple(state_dict[key].shape)}) is not used "
                    "by this ViT config")
  if not problems and _square_side(pos_len - pos_prefix) is None:
    problems.append(f"shape mismatch for pos_embed: checkpoint (1, {pos_len}, {config.width}) is "
                    f"not {pos_prefix} prefix rows plus a square grid; model expects "
                    f"{(1, config.pos_embed_len, config.width)}")
  if problems:
    raise ConversionError(f"{len(problems)} problem(s) loading the timm ViT:\n  "
                          + mapping_lib.listing(problems))

  values: dict[Path, np.ndarray] = {}
  for key, entry in entries.items():
    values[entry.path] = np.asarray(entry.transform(np.asarray(state_dict[key])), np.float32)
  if pos_len != config.pos_embed_len:
    logging.info("timm_vit: resampling pos_embed from %d to %d patches", pos_len - pos_prefix,
                 config.num_patches)
    values[("pos_embed",)] = resample_pos_embed(values[("pos_embed",)], pos_prefix,
                                                config.grid_size)

  abstract = nnx.eval_shape(lambda: vit.VisionTransformer(config, rngs=nnx.Rngs(0), dtype=dtype))
  return mapping_lib.fill(abstract, values, "timm")


def _resolve_config(sd: Mapping[str, np.ndarray], variant_or_config: str | vit.ViTConfig | None,
                    image_size: int | None, num_heads: int | None) -> vit.ViTConfig:
  if isinstance(variant_or_config, vit.ViTConfig):
    return variant_or_config
  if variant_or_config is None:
    return infer_config(sd, num_heads=num_heads, image_size=image_size)
  base = vit.get_config(variant_or_config)
  config = infer_config(sd, num_heads=base.num_heads, image_size=image_size)
  wrong = [f"{field}: variant {getattr(base, field)}, checkpoint {getattr(config, field)}"
           for field in ("width", "depth", "patch_size", "mlp_hidden")
           if getattr(base, field) != getattr(config, field)]
  if wrong:
    raise ConversionError(f"the checkpoint is not a {variant_or_config}: " + "; ".join(wrong))
  return config


def load_timm_vit(path: str, variant_or_config: str | vit.ViTConfig | None, *,
                  image_size: int | None = None, prefix: str | None = None,
                  num_heads: int | None = None, dtype: Any = jnp.float32,
                  ) -> tuple[vit.VisionTransformer, vit.ViTConfig, str]:
  """(model, config, weights hash) of a timm-format ViT checkpoint file.

  ``variant_or_config``: a ``vit.VARIANTS`` name (gives ``num_heads`` and is checked against the
  checkpoint; registers, layer scale, class token, pooling and head are read from the
  checkpoint), a full ``ViTConfig`` (used as is), or None (everything inferred; ``num_heads``
  defaults to width // 64).
  ``image_size``: input size to run at; pos_embed is resampled if it differs from the trained one.
  ``prefix``: key prefix of the ViT (e.g. ``"visual.trunk."``); found automatically if None.
  ``dtype``: compute dtype of the model (parameters stay float32).
  The hash is ``feature_shards.weights_hash`` over the ViT's tensors as stored (after the prefix),
  so it does not depend on the file format or wrapper.
  """
  sd, _ = select_vit_weights(load_state_dict(path), prefix)
  config = _resolve_config(sd, variant_or_config, image_size, num_heads)
  model = vit_from_timm(sd, config, image_size=image_size, dtype=dtype)
  return model, model.config, feature_shards.weights_hash(sd.items())
