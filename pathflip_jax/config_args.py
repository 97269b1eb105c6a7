"""The config convention: ``configs/<name>.py`` defines ``get_config(arg)``, loaded the big_vision
way with ``ml_collections.config_flags``.

  python -m pathflip_jax.train --config configs/x.py:size=test --config.optim.lr=3e-4 ...

``arg`` is the text after a colon (comma-separated ``key=value`` pairs and bare ``flag``s, True):
config args are kept for what sets several fields at once (a size variant, paths).
Every single field is set with an override ``--config.a.b=value``. :func:`parse_arg` turns
``arg`` into a ConfigDict whose types follow the defaults given; :func:`load_config` imports a
config file, calls its ``get_config`` and applies overrides (what ``quickstart`` does in-process);
:func:`parse_command_line` is the entry points' flag parsing.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any, Callable, Mapping, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags


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
      raise ValueError(f"unknown config arg {key!r}; known: {', '.join(sorted(defaults))} "
                       "(set any other field with --config.<field>=value)")
    try:
      values[key] = _convert(key, text.strip(), defaults[key]) if eq else True
    except ValueError as e:
      raise ValueError(f"config arg {key!r}: cannot parse {text!r} ({e})") from None
  return ml_collections.ConfigDict(values)


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]
                    ) -> ml_collections.ConfigDict:
  """Sets ``config.a.b = value`` for each ``"a.b": value``, as ``--config.a.b=value`` does; a key
  the config does not have is an error naming it (a typo would otherwise be ignored)."""
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for i, parent in enumerate(parents):
      if parent not in node:
        raise KeyError(f"--config.{key}: the config has no field {'.'.join(parents[:i + 1])}")
      node = node[parent]
    if leaf not in node:
      raise KeyError(f"--config.{key}: the config has no field {key}")
    node[leaf] = value
  return config


def load_config(spec: str, overrides: Mapping[str, Any] | None = None
                ) -> ml_collections.ConfigDict:
  """Imports ``path.py[:arg]``, returns ``get_config(arg)`` with ``overrides`` applied."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path!r} not found")
  module_name = "_config_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise AttributeError(f"config file {path!r} defines no get_config(arg)")
  return apply_overrides(module.get_config(arg or None), overrides or {})


def parse_command_line(argv: Sequence[str] | None, prog: str, description: str,
                       define: Callable[[flags.FlagValues], None],
                       config_required: bool = True
                       ) -> tuple[ml_collections.ConfigDict | None, flags.FlagValues]:
  """(config, flag values) of an entry point's command line ``argv`` (without the program name,
as argparse takes it; None: ``sys.argv[1:]``).

  ``--config FILE.py[:arg]`` is an ``ml_collections`` config file with ``--config.a.b=value``
  overrides (``config_flags``); ``define(flag_values)`` adds the command's own flags. Flags live
  in a FlagValues of their own, so the entry point can be imported and run in-process (the
  docs generator, tests) any number of times. ``--help`` prints the usage and every flag; a bad
  flag exits with a one-line message that names it.
  """
  argv = [prog] + list(sys.argv[1:] if argv is None else argv)
  flag_values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file(
      "config", None, "an ml_collections config file, configs/<name>.py[:arg]; override any "
      "field with --config.<field>=value (e.g. --config.optim.lr=3e-4)", flag_values=flag_values,
      lock_config=True, sys_argv=argv)
  define(flag_values)
  if any(a in ("-h", "--help", "-help") for a in argv[1:]):
    config = "--config FILE.py[:ARG]" if config_required else "[--config FILE.py[:ARG]]"
    print(f"usage: {prog} {config} [--config.FIELD=VALUE ...] [flags]\n\n{description}\n\n"
          + flag_values.get_help(include_special_flags=False))
    raise SystemExit(0)
  try:
    flag_values(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    # config_flags raises these for a config file that fails to load and for an override of a
    # field the config does not have (naming the last part of the field only).
    missing = str(e.args[0] if e.args else e).strip("'\"")
    named = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")
             and missing in a.split("=", 1)[0].split(".")]
    if isinstance(e, (KeyError, AttributeError)) and named:
      raise SystemExit(f"{prog}: {named[0]}: the config has no field "
                       f"{named[0][len('--config.'):]}") from None
    raise SystemExit(f"{prog}: {e}") from None
  if config_required and holder.value is None:
    raise SystemExit(f"{prog}: --config is required (configs/<name>.py[:arg])")
  return holder.value, flag_values
