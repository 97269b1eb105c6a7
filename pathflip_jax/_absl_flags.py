"""Marks absl flags as parsed when no absl.app.run did (see pathflip_jax/__init__.py)."""

from absl import flags


def ensure_parsed() -> None:
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
