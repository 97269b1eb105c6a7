"""The config convention: ``configs/<name>.py`` defines ``get_config(arg)``.

``arg`` is the text after a colon on the command line (``--config configs/x.py:res=224,bf16``):
comma-separated ``key=value`` pairs and bare ``flag``s (True). :func:`parse_arg` turns it into a
ConfigDict whose types follow the defaults given; :func:`load_config` imports a config file and
calls its ``get_config``.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import ml_collections


def _convert(key: str, text: str, default: Any) -> Any:
  if isinstance(default, bool):
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on", ""):
      return True
    if lowered in ("0", "false", "no", "off"):
      return False
    raise ValueError(f"config arg {key!r}: expected a boolean, got {text!r}")
  if isinstance(default, int):
    return int(text)
  if isinstance(default, float):
    return float(text)
  return text


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses ``"key=value,flag"`` against ``defaults``; unknown keys are an error naming them."""
  values = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, eq, text = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"unknown config arg {key!r}; known: {', '.join(sorted(defaults))}")
    try:
      values[key] = _convert(key, text.strip(), defaults[key]) if eq else True
    except ValueError as e:
      raise ValueError(f"config arg {key!r}: cannot parse {text!r} ({e})") from None
  return ml_collections.ConfigDict(values)


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Imports ``path.py[:arg]`` and returns ``get_config(arg)``."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path!r} not found")
  module_name = "_config_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise AttributeError(f"config file {path!r} defines no get_config(arg)")
  return module.get_config(arg or None)
