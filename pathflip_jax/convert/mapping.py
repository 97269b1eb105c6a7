"""What every weight importer shares: the error type, the key -> parameter mapping entry, and
filling an abstract NNX model with the mapped values."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, TypeVar

import jax.numpy as jnp
import numpy as np
from flax import nnx

Path = tuple[Any, ...]
Transform = Callable[[np.ndarray], np.ndarray]
ModuleT = TypeVar("ModuleT", bound=nnx.Module)
_MAX_LISTED = 20


class ConversionError(ValueError):
  """A checkpoint does not fit the model it is loaded into; the message names files, keys and
  shapes, so a half-loaded model cannot go unnoticed."""


@dataclasses.dataclass(frozen=True)
class Entry:
  path: Path              # where the tensor goes in the NNX state
  shape: tuple[int, ...]  # its shape in the source checkpoint
  transform: Transform = lambda x: x


def listing(lines: list[str]) -> str:
  """The first problems of a list, one per line, and how many more there are."""
  more = len(lines) - _MAX_LISTED
  return "\n  ".join(lines[:_MAX_LISTED] + ([f"... and {more} more"] if more > 0 else []))


def fill(abstract: ModuleT, values: Mapping[Path, np.ndarray], source: str) -> ModuleT:
  """``abstract`` (from ``nnx.eval_shape``) with every parameter taken from ``values``.

  ``values`` must hold exactly the model's parameters with their shapes: the importer's mapping
  was checked against the checkpoint before, so a mismatch here is a bug in that mapping.
  """
  values = dict(values)
  graphdef, state = nnx.split(abstract)
  for path, variable in nnx.to_flat_state(state):
    value = values.pop(path, None)
    assert value is not None, f"no {source} key maps to model parameter {path}"
    assert value.shape == variable.shape, (path, value.shape, variable.shape)
    variable.set_value(jnp.asarray(value, variable.dtype))
  assert not values, f"mapped keys with no model parameter: {sorted(values)}"
  return nnx.merge(graphdef, state)
