"""Orbax checkpoints of a training run: train state, data-iterator state, metadata.

Layout of a workdir::

  W/checkpoints/<step>/state   params, optimizer state, step (Orbax PyTree, sharded arrays)
  W/checkpoints/<step>/data    the grain iterator's position (one JSON file per process)
  W/checkpoints/<step>/meta    step, wall time, the metrics of that step (JSON)
  W/best/<step>/...            the same for the best evaluation so far (``best_metric``)

A run trained with ``config.checkpoint.use_best`` has W/best as its result: loading the workdir's
model (``load_params``, ``model_from_checkpoint``, ``python -m pathflip_jax.evaluate``) reads the
checkpoint its best evaluation chose, while resuming still continues from W/checkpoints.

Saves are asynchronous (arrays are copied to host before ``save`` returns, so the train state can
be donated to the next step right away); a save is complete only once Orbax has renamed its
temporary directory, so a killed run never leaves a checkpoint that half-restores. Restoring
takes an abstract target (shapes, dtypes and the *current* mesh's shardings), so a run saved on
8 devices restores onto 1 and vice versa.

Layout: each checkpoint's meta records ``layout`` (:data:`LAYOUT`); reading a checkpoint of an
earlier layout (or the config of a run whose checkpoints are) stops with :class:`LayoutError`,
which says that the run predates the layout and what to do.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from typing import Any, Callable, Sequence

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from pathflip_jax import optim

# The parameter and config layout checkpoints are written in. 2: the shared layers of
# models/layers.py (renamed ViT and text-tower attention parameters) and the experiment
# switches retired; checkpoints of git 0d3432e and earlier record none (layout 1).
LAYOUT = 2
LAYOUT_NOTE = ("the layout of 2026-12-07 (the shared layers of models/layers.py; the experiment "
               "switches retired, docs/experiments/README.md)")


class LayoutError(ValueError):
  """A checkpoint, or the config of a run, written in an earlier layout."""


def checkpoint_layout(step_dir: str) -> int:
  """The layout a checkpoint folder (``.../checkpoints/<step>``) was written in."""
  path = os.path.join(step_dir, "meta", "metadata")
  if not os.path.exists(path):
    return 1
  with open(path) as f:
    return int(json.load(f).get("layout", 1))


def check_layout(step_dir: str, source: str = "") -> None:
  """Raises :class:`LayoutError` for a checkpoint of an earlier layout: its parameters (and the
  config that built them) no longer mean what they did, so nothing of it is loaded."""
  if checkpoint_layout(step_dir) < LAYOUT:
    raise LayoutError(f"{source or step_dir} predates {LAYOUT_NOTE}; it does not load with "
                      "this version: retrain it, or use it with git commit 0d3432e")


class Checkpointer:
  """Latest-N checkpoints for resuming, plus optionally the best-N by an evaluation metric."""

  def __init__(self, workdir: str, *, keep: int = 2, best_metric: str = "",
               best_mode: str = "max", keep_best: int = 1, async_save: bool = True):
    self.workdir = os.path.abspath(workdir)
    self.best_metric = best_metric
    options = dict(enable_async_checkpointing=async_save, create=True)
    self.latest = ocp.CheckpointManager(
        os.path.join(self.workdir, "checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, **options))
    self.best = None
    if best_metric:
      if best_mode not in ("max", "min"):
        raise ValueError(f"config.checkpoint.best_mode must be 'max' or 'min', got {best_mode!r}")
      self.best = ocp.CheckpointManager(
          os.path.join(self.workdir, "best"),
          options=ocp.CheckpointManagerOptions(
              max_to_keep=keep_best, best_fn=lambda m: m[best_metric], best_mode=best_mode,
              **options))

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def save(self, step: int, state: Any, data_iterator: Any = None,
           metrics: dict[str, float] | None = None) -> None:
    """Saves ``state`` (and the data iterator's position) as checkpoint ``step``."""
    self.latest.save(step, args=_save_args(state, data_iterator, step, metrics))

  def save_best(self, step: int, state: Any, metrics: dict[str, float]) -> bool:
    """Saves ``state`` under W/best when ``metrics[best_metric]`` is among the best kept."""
    if self.best is None:
      return False
    if self.best_metric not in metrics:
      raise KeyError(f"config.checkpoint.best_metric={self.best_metric!r} is not among the "
                     f"evaluation metrics {sorted(metrics)}")
    clean = {k: float(v) for k, v in metrics.items()}
    return self.best.save(step, args=_save_args(state, None, step, clean), metrics=clean)

  def best_step(self) -> int | None:
    """The step of the best checkpoint kept (None without ``best_metric`` or before a save)."""
    if self.best is None:
      return None
    self.best.wait_until_finished()
    return self.best.best_step()

  def restore_best(self, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """(state, meta) of the best checkpoint kept."""
    step = self.best_step()
    if step is None:
      raise FileNotFoundError(f"{self.workdir}/best holds no checkpoint: no evaluation gave "
                              f"config.checkpoint.best_metric={self.best_metric!r}")
    return restore_from(self.best, abstract_state, None, step)

  def restore(self, abstract_state: Any, data_iterator: Any = None,
              step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """(state, meta) of checkpoint ``step`` (default: latest); the iterator is set in place."""
    return restore_from(self.latest, abstract_state, data_iterator, step)

  def wait(self) -> None:
    self.latest.wait_until_finished()
    if self.best is not None:
      self.best.wait_until_finished()

  def close(self) -> None:
    self.wait()
    self.latest.close()
    if self.best is not None:
      self.best.close()


def _save_args(state, data_iterator, step, metrics):
  meta = {"step": int(step), "time": time.time(), "layout": LAYOUT,
          "metrics": {k: float(v) for k, v in (metrics or {}).items()}}
  items = {"state": ocp.args.PyTreeSave(state), "meta": ocp.args.JsonSave(meta)}
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
  return ocp.args.Composite(**items)


def uses_best(workdir: str) -> bool:
  """Whether the run in ``workdir`` was trained with ``config.checkpoint.use_best``."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return False
  with open(path) as f:
    checkpoint = json.load(f).get("checkpoint") or {}
  return bool(checkpoint.get("use_best"))


def model_dir(path: str) -> str:
  """Where the model of the run in ``path`` lies: W/best for a run trained with
  ``config.checkpoint.use_best``, else W/checkpoints; a checkpoint folder as given."""
  path = os.path.abspath(path)
  if not os.path.isdir(os.path.join(path, "checkpoints")):
    return path
  if uses_best(path):
    best = os.path.join(path, "best")
    if not os.path.isdir(best):
      raise FileNotFoundError(f"{best} not found: {path} was trained with "
                              "config.checkpoint.use_best but holds no best checkpoint")
    return best
  return os.path.join(path, "checkpoints")


def _manager(path: str, model: bool = True) -> ocp.CheckpointManager:
  """A read-only manager over ``path``: a workdir, its checkpoints/ or best/ folder. For a
  workdir, ``model``: the folder holding the run's model (``model_dir``); else checkpoints/."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    path = model_dir(path) if model else os.path.join(path, "checkpoints")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no such checkpoint directory")
  with _quiet_read_only():
    manager = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(read_only=True))
  if manager.latest_step() is None:
    raise FileNotFoundError(f"{path}: no complete checkpoint in it")
  return manager


def checkpoint_steps(path: str) -> list[int]:
  """The complete checkpoint steps of a workdir's model folder (``model_dir``) or of a checkpoint
  folder, ascending; a folder without one is an error that names it."""
  return sorted(int(s) for s in _manager(path).all_steps())


def model_checkpoint(path: str) -> str:
  """The checkpoint folder ``load_params(path)`` reads: ``model_dir``'s latest step."""
  manager = _manager(path)
  return os.path.join(str(manager.directory), str(manager.latest_step()))


def restore_from(manager: ocp.CheckpointManager | str, abstract_state: Any,
                 data_iterator: Any = None, step: int | None = None
                 ) -> tuple[Any, dict[str, Any]]:
  """Restores state (onto ``abstract_state``'s shardings) and, if given, the data iterator; a
  workdir given by path restores from its checkpoints/ (to continue training it)."""
  if isinstance(manager, str):
    manager = _manager(manager, model=False)
  step = manager.latest_step() if step is None else step
  # A checkpoint of an earlier layout would fail inside Orbax with a message about tree
  # structure; this says what it is instead.
  check_layout(os.path.join(str(manager.directory), str(step)))
  # Explicit restore args: each array is read straight into the target's sharding (the mesh of
  # this run, whatever the mesh of the run that saved it).
  restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
  items = {"state": ocp.args.PyTreeRestore(abstract_state, restore_args=restore_args),
           "meta": ocp.args.JsonRestore()}
  has_data = os.path.isdir(os.path.join(str(manager.directory), str(step), "data"))
  if data_iterator is not None and has_data:
    items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  meta = dict(restored.meta)
  meta["data_restored"] = data_iterator is not None and has_data
  return restored.state, meta


def abstract(state: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of ``state`` laid out by ``shardings`` (a restore target).

  Optimizer slots of frozen parameters are ``optax.MaskedNode`` (no arrays) inside a variable
  whose sharding was still computed; they stay as they are.
  """
  masked = lambda x: isinstance(x, optax.MaskedNode)
  return jax.tree.map(
      lambda x, s: x if masked(x) else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      state, shardings, is_leaf=masked)


def param_name(path: tuple) -> str:
  """"blocks/0/attn/qkv_kernel" for a parameter's key path, in a live ``nnx.State`` or in a tree
  restored without a target (where each variable is a dict holding its array under "value")."""
  return re.sub(r"(^|/)value$", "", optim.param_path(path))


def named_leaves(tree: Any) -> dict[str, Any]:
  """{``param_name``: leaf} of a parameter tree (live or restored), leaves left where they are."""
  return {param_name(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


class _DropReadOnlyNotices(logging.Filter):
  """Orbax warns on every read-only load of another run: that a read-only manager will not
  create its directory, that the directory is read-only, and that a step's
  ``_CHECKPOINT_METADATA`` is missing when one item directory (``<step>/state``) is read on its
  own (the file is at the step level, where the manager wrote it). All three are expected
  here; three warnings per loaded run only bury the messages that matter."""

  NOTICES = ("CheckpointManagerOptions.read_only=True", "Given directory is read only=",
             "Metadata file does not exist: ")

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(self.NOTICES)


@contextlib.contextmanager
def _quiet_read_only():
  logger, quiet = logging.getLogger("absl"), _DropReadOnlyNotices()
  logger.addFilter(quiet)
  try:
    yield
  finally:
    logger.removeFilter(quiet)


def load_params(path: str, step: int | None = None) -> dict[str, np.ndarray]:
  """Every parameter of another run's checkpoint as {path: array} (no target needed).

  Arrays are read onto one local device whatever mesh saved them: a checkpoint of a multi-host
  run (devices of other processes) loads in a single process too.
  """
  manager = _manager(path)
  step = manager.latest_step() if step is None else step
  check_layout(os.path.join(str(manager.directory), str(step)))
  state_dir = os.path.join(str(manager.directory), str(step), "state")
  with _quiet_read_only():
    metadata = ocp.PyTreeCheckpointer().metadata(state_dir)
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          tree)
    restored = ocp.PyTreeCheckpointer().restore(
        state_dir, args=ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
  return {k: np.asarray(v) for k, v in named_leaves(restored["params"]).items()}


def run_config(workdir: str, stage: str | Sequence[str], name: str = ""
               ) -> ml_collections.ConfigDict:
  """The config a training run saved (``workdir/config.json``), checked to be of ``stage`` (or
  of one of several stages).

  ``name`` is how the user gave the workdir (e.g. "config.align_workdir=W"), for the errors."""
  name = name or workdir
  stages = (stage,) if isinstance(stage, str) else tuple(stage)
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {name} is not a training workdir "
                            "(python -m pathflip_jax.train --workdir ...)")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  checkpoints = os.path.join(workdir, "checkpoints")
  steps = sorted(int(s) for s in os.listdir(checkpoints) if s.isdigit()) \
      if os.path.isdir(checkpoints) else []
  if steps:
    check_layout(os.path.join(checkpoints, str(steps[-1])), f"{name} ({path})")
  if config.get("stage") not in stages:
    wanted = (f"a {stages[0]!r} run" if len(stages) == 1 else
              "a run of stage " + " or ".join(repr(s) for s in stages))
    raise ValueError(f"{path}: stage is {config.get('stage')!r}; {name} must be {wanted}")
  return config


def model_from_checkpoint(model_factory: Callable[[], nnx.Module], path: str,
                          step: int | None = None, prefix: str = "") -> nnx.Module:
  """The model ``model_factory`` builds, with every parameter from the checkpoint of the run in
  ``path`` (latest step, or ``step``; ``prefix``: where the model sits in the run's parameter
  tree, e.g. "vision/"); a parameter missing there or of another shape is an error that names
  it (the config does not match the run)."""
  params = load_params(path, step)
  graphdef, state = nnx.split(nnx.eval_shape(model_factory))

  def take(leaf_path, leaf):
    name = prefix + param_name(leaf_path)
    if name not in params:
      raise KeyError(f"{path}: the checkpoint has no parameter {name!r}")
    if tuple(params[name].shape) != tuple(leaf.shape):
      raise ValueError(f"{path}: parameter {name!r} is {params[name].shape}, its config "
                       f"builds {leaf.shape}")
    return jnp.asarray(params[name], leaf.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(take, state))


def partial_init(params: Any, loaded: dict[str, np.ndarray], include: Sequence[str] = (".*",),
                 source: str = "") -> tuple[Any, list[str]]:
  """Replaces the leaves of ``params`` whose path matches ``include`` by ``loaded`` values.

  Matching leaves must exist in ``loaded`` with the same shape; anything else is an error that
  names the parameter (a silent partial load would train from scratch without saying so).
  Returns the new tree (each leaf keeps its sharding) and the list of paths loaded.
  """
  patterns = [re.compile(p) for p in include]
  where = f" in {source}" if source else ""
  taken = []

  def replace(path, leaf):
    name = param_name(path)
    if not any(p.search(name) for p in patterns):
      return leaf
    if name not in loaded:
      raise KeyError(f"config.model_init: parameter {name!r} not found{where}")
    value = loaded[name]
    if tuple(value.shape) != tuple(leaf.shape):
      raise ValueError(f"config.model_init: parameter {name!r} has shape {tuple(value.shape)}"
                       f"{where}, the model needs {tuple(leaf.shape)}")
    taken.append(name)
    return jax.device_put(value.astype(leaf.dtype), leaf.sharding)

  new = jax.tree_util.tree_map_with_path(replace, params)
  if not taken:
    raise ValueError(f"config.model_init_include={list(include)} matches no parameter")
  return new, taken
