"""Device mesh and the one mapping from logical axis names to mesh axes.

Models annotate parameters with *logical* names (``"embed"``, ``"mlp"``, ``"heads"`` ...) through
:func:`param_init`; :data:`LOGICAL_RULES` below is the only place that says which mesh axis each
name is split over. The mesh has three axes:

  data    data parallelism: the batch is split, parameters are replicated
  fsdp    fully sharded data parallelism: the batch *and* the parameters' ``embed`` dim are split
  model   tensor parallelism: ``mlp``/``heads``/``vocab`` dims of parameters are split

On one device every axis has size 1 and the same code runs unchanged.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence, TypeVar

import jax
import numpy as np
from flax import nnx
from flax.core import spmd
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")

LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("vocab", "model"),
    ("patch_in", None),     # flattened pixels of a patch (ViT stem)
    ("tokens", None),       # position embeddings
)

ModuleT = TypeVar("ModuleT", bound=nnx.Module)


def param_init(initializer: Callable[..., jax.Array], *names: str | None):
  """An initializer whose parameter carries logical axis names (one per dimension).

  The annotation is metadata only (``eager_sharding=False``): modules can be built without a mesh
  (tests, notebooks), and :func:`create_sharded` / :func:`shard_module` place them on one.
  """
  return nnx.with_partitioning(initializer, names, eager_sharding=False)


def make_mesh(data: int = -1, fsdp: int = 1, model: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ``(data, fsdp, model)`` mesh over ``devices`` (default: all); -1 takes what is left."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = [data, fsdp, model]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} model={model}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not divide into mesh axes {sizes}")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh data={sizes[0]} fsdp={sizes[1]} model={sizes[2]} needs "
                     f"{int(np.prod(sizes))} devices, {len(devices)} are available")
  # jax.make_mesh orders the devices by the physical topology (TPU/GPU interconnect) so the
  # mesh axes map onto fast links. Auto axes: jit's sharding propagation (pjit semantics)
  # decides intermediate layouts, and code indexes results the same way on 1 or many devices
  # (see NOTES-dependencies.md, item 1).
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def logical_to_spec(names: Sequence[str | None]) -> P:
  """PartitionSpec of an array whose dimensions have the given logical names."""
  return spmd.get_pspec(tuple(names), LOGICAL_RULES)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading (batch) dimension split over data and fsdp; the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def batch_shards(mesh: Mesh) -> int:
  """How many pieces the batch is split into (the product of the data and fsdp axes)."""
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


@contextlib.contextmanager
def logical_rules() -> Iterator[None]:
  with spmd.logical_axis_rules(LOGICAL_RULES):
    yield


def state_shardings(module: nnx.Module, mesh: Mesh) -> Any:
  """NamedShardings for every variable of ``module`` (concrete or abstract)."""
  return tree_shardings(nnx.state(module), mesh)


def tree_shardings(state: Any, mesh: Mesh) -> Any:
  """NamedShardings for an ``nnx.State`` (or any tree of annotated variables)."""
  with logical_rules():
    specs = nnx.get_partition_spec(state)
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                      is_leaf=lambda x: isinstance(x, P))


def create_sharded(factory: Callable[[], ModuleT], mesh: Mesh) -> ModuleT:
  """Builds ``factory()`` with every parameter created directly in its sharded layout.

  The module is traced abstractly first (no memory), then initialised inside ``jax.jit`` with
  ``out_shardings``, so a model larger than one device's memory never exists unsharded.
  """
  abstract = nnx.eval_shape(factory)
  graphdef, _ = nnx.split(abstract)
  shardings = state_shardings(abstract, mesh)

  state = jax.jit(lambda: nnx.state(factory()), out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def shard_module(module: ModuleT, mesh: Mesh) -> ModuleT:
  """Places an existing module's variables (e.g. imported weights) in their sharded layout."""
  shardings = state_shardings(module, mesh)
  state = jax.device_put(nnx.state(module), shardings)
  nnx.update(module, state)
  return module


def replicate_module(module: ModuleT, mesh: Mesh) -> ModuleT:
  """Places a module's variables whole on every device of ``mesh`` (evaluation: with several
  processes, each then holds the whole model; the values must be the same on every process)."""
  state = jax.device_put(nnx.state(module), replicated(mesh))
  nnx.update(module, state)
  return module
