"""JAX's persistent compilation cache for the command-line jobs.

XLA:CPU takes seconds to compile a model's random initialisation and forward pass; a job run twice
with the same model and shapes (a resumed extraction, the next training run) then starts in a
fraction of the time. Libraries should not change global JAX settings behind a user's back, so
only the ``main()`` of a job calls :func:`enable`, and an explicit ``JAX_COMPILATION_CACHE_DIR``
wins.
"""

from __future__ import annotations

import os

import jax

DEFAULT_DIR = os.path.join(os.path.expanduser("~"), ".cache", "pathflip_jax", "jax")


def enable(directory: str | None = None) -> str:
  """Turns the cache on (compilations over 0.5 s); returns the directory used."""
  directory = os.environ.get("JAX_COMPILATION_CACHE_DIR") or directory or DEFAULT_DIR
  os.makedirs(directory, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return directory
