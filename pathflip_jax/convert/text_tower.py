"""The patch-text run's text tower (``models/text_encoder.py``, stage patch_clip) -> the text
branch of the PathFLIP Q-Former (``models/qformer.py``, stage align).

PathFLIP starts its Q-Former from a pretrained text model (BERT in the paper). The demo has no
BERT; the closest thing it owns is the text tower that the patch-text pretraining trained on the
same cohort's region sentences, with the same tokenizer. Both are pre-norm Transformers; the
tower fuses q/k/v into one ``qkv`` kernel [d, 3 * h * c] (ordered q, k, v; then heads), the
Q-Former keeps them apart as [d, h, c].

Mapped (tower -> Q-Former), for the first min(tower depth, Q-Former depth) layers:

  text/token_embed                -> qformer/token_embed
  text/pos_embed [L, d]           -> qformer/pos_embed[:L] (later rows keep their initial values)
  text/blocks/i/norm1             -> qformer/layers/i/self_norm
  text/blocks/i/qkv               -> qformer/layers/i/self_attention/{q,k,v}_{kernel,bias}
  text/blocks/i/proj              -> qformer/layers/i/self_attention/o_{kernel,bias}
  text/blocks/i/norm2             -> qformer/layers/i/text_mlp_norm
  text/blocks/i/fc1, fc2          -> qformer/layers/i/text_mlp/fc1, fc2   (when the widths match)
  text/norm                       -> qformer/norm
  text_proj                       -> text_proj                             (when the widths match)

The self-attention is shared with the query branch, so it starts from the tower too (as BLIP-2's
does from BERT); everything on the query side that the tower has no counterpart for keeps its
initial values.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np


def qformer_text_params(tower: Mapping[str, np.ndarray], target: Mapping[str, Any],
                        num_heads: int, source: str = "the text tower"
                        ) -> tuple[dict[str, np.ndarray], list[str]]:
  """Q-Former parameters {name: array} from a patch_clip checkpoint's parameters ``tower``.

  Args:
    tower: every parameter of the patch_clip run (``checkpointing.load_params``).
    target: the alignment model's parameters by name, numpy or device arrays (their shapes;
      only the position embedding is read, for the rows the tower does not have).
    num_heads: the heads of both attentions (the fused kernel's head split).
    source: named in errors.

  Returns:
    (parameters to load, notes on what was left at its initial value and why).
  """
  if "text/token_embed" not in tower:
    raise KeyError(f"{source}: no 'text/token_embed' parameter; is it a patch_clip run? "
                   f"(it has {sorted(tower)[:5]} ...)")
  out: dict[str, np.ndarray] = {}
  notes: list[str] = []

  def put(name: str, value: np.ndarray, what: str) -> None:
    if name not in target:
      raise KeyError(f"{source}: the alignment model has no parameter {name!r} (for {what})")
    if tuple(value.shape) != tuple(target[name].shape):
      raise ValueError(f"{source}: {what} has shape {tuple(value.shape)}; the alignment model's "
                       f"{name} needs {tuple(target[name].shape)}")
    out[name] = np.asarray(value, np.float32)

  vocab, width = tower["text/token_embed"].shape
  if tuple(target["qformer/token_embed"].shape) != (vocab, width):
    raise ValueError(
        f"{source}: text/token_embed is {vocab} x {width} but the Q-Former's token_embed is "
        f"{tuple(target['qformer/token_embed'].shape)}: use the same tokenizer (config.tokenizer "
        f"= the patch_clip run's tokenizer.model) and the same width")
  put("qformer/token_embed", tower["text/token_embed"], "text/token_embed")
  positions = np.array(target["qformer/pos_embed"], np.float32)
  rows = min(len(positions), len(tower["text/pos_embed"]))
  positions[:rows] = tower["text/pos_embed"][:rows]
  put("qformer/pos_embed", positions, "text/pos_embed")
  if rows < len(positions):
    notes.append(f"positions {rows}..{len(positions) - 1} (the tower has {rows})")

  tower_depth = 1 + max(int(m.group(1)) for k in tower
                        if (m := re.match(r"text/blocks/(\d+)/", k)))
  qformer_depth = 1 + max(int(m.group(1)) for k in target
                          if (m := re.match(r"qformer/layers/(\d+)/", k)))
  head_dim = width // num_heads
  for i in range(min(tower_depth, qformer_depth)):
    src, dst = f"text/blocks/{i}", f"qformer/layers/{i}"
    for part in ("scale", "bias"):
      put(f"{dst}/self_norm/{part}", tower[f"{src}/norm1/{part}"], f"{src}/norm1/{part}")
      put(f"{dst}/text_mlp_norm/{part}", tower[f"{src}/norm2/{part}"], f"{src}/norm2/{part}")
    qkv_kernel = tower[f"{src}/qkv/kernel"].reshape(width, 3, num_heads, head_dim)
    qkv_bias = tower[f"{src}/qkv/bias"].reshape(3, num_heads, head_dim)
    for j, which in enumerate("qkv"):
      put(f"{dst}/self_attention/{which}_kernel", qkv_kernel[:, j], f"{src}/qkv/kernel[{which}]")
      put(f"{dst}/self_attention/{which}_bias", qkv_bias[j], f"{src}/qkv/bias[{which}]")
    put(f"{dst}/self_attention/o_kernel",
        tower[f"{src}/proj/kernel"].reshape(num_heads, head_dim, width), f"{src}/proj/kernel")
    put(f"{dst}/self_attention/o_bias", tower[f"{src}/proj/bias"], f"{src}/proj/bias")
    if tower[f"{src}/fc1/kernel"].shape == target[f"{dst}/text_mlp/fc1/kernel"].shape:
      for fc in ("fc1", "fc2"):
        for part in ("kernel", "bias"):
          put(f"{dst}/text_mlp/{fc}/{part}", tower[f"{src}/{fc}/{part}"], f"{src}/{fc}/{part}")
    else:
      notes.append(f"layer {i} text MLP (tower hidden width "
                   f"{tower[f'{src}/fc1/kernel'].shape[1]}, Q-Former "
                   f"{target[f'{dst}/text_mlp/fc1/kernel'].shape[1]})")
  if qformer_depth > tower_depth:
    notes.append(f"Q-Former layers {tower_depth}..{qformer_depth - 1} (the tower has "
                 f"{tower_depth})")
  for part in ("scale", "bias"):
    put(f"qformer/norm/{part}", tower[f"text/norm/{part}"], f"text/norm/{part}")
  if ("text_proj/kernel" in tower
      and tower["text_proj/kernel"].shape == target["text_proj/kernel"].shape):
    put("text_proj/kernel", tower["text_proj/kernel"], "text_proj/kernel")
    put("text_proj/bias", tower["text_proj/bias"], "text_proj/bias")
  else:
    notes.append("text_proj (no matching projection in the tower)")
  return out, notes
