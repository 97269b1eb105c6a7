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

Object stores: a workdir may be a URL. Orbax writes local paths and ``gs://`` itself; on other
stores (``s3://``: Orbax and tensorstore refuse it at the pinned versions) the checkpoints of
``W/checkpoints`` and ``W/best`` are written to a local mirror in the cache
(``storage.cache()``) and each finished step is uploaded whole, a marker file
(:data:`UPLOADED`) last: a step without its marker is incomplete and is never read. Reading such
a run downloads the step it needs into the mirror. With several processes the mirror must be a
folder they all see (one machine, or ``PATHFLIP_CACHE_DIR`` on a shared disk); the trainer
checks that at start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
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

from pathflip_jax import multihost, optim, storage

# The parameter and config layout checkpoints are written in. 2: the shared layers of
# models/layers.py (renamed ViT and text-tower attention parameters) and the experiment
# switches retired; checkpoints of git 0d3432e and earlier record none (layout 1).
LAYOUT = 2
LAYOUT_NOTE = ("the layout of 2026-12-07 (the shared layers of models/layers.py; the experiment "
               "switches retired, docs/experiments/README.md)")


class LayoutError(ValueError):
  """A checkpoint, or the config of a run, written in an earlier layout."""


UPLOADED = "pathflip_uploaded"   # the marker of a step uploaded whole to an object store


def orbax_writes(path: str) -> bool:
  """Whether Orbax reads and writes ``path`` itself (local paths and gs://)."""
  return not storage.is_url(path) or storage.scheme(path) == "gs"


class Mirror:
  """A checkpoint folder on a store Orbax cannot write, and its local copy in the cache."""

  def __init__(self, url: str):
    self.url = url.rstrip("/")
    cache = storage.cache()
    self.local = os.path.join(cache.directory, "checkpoints", cache.key(self.url))

  def remote_steps(self) -> list[int]:
    """Steps uploaded whole (their marker is there), ascending."""
    return sorted(int(name) for name in storage.listdir(self.url) if name.isdigit()
                  and storage.exists(storage.join(self.url, name, UPLOADED)))

  def _local_complete(self, step: int) -> bool:
    return os.path.exists(os.path.join(self.local, str(step), UPLOADED))

  def reconcile(self) -> None:
    """Makes the local copy hold no step the store lacks (a save killed before its upload
    finished) and the store's latest step (a copy on another machine, or a fresh cache)."""
    remote = self.remote_steps()
    os.makedirs(self.local, exist_ok=True)
    for name in os.listdir(self.local):
      if name.isdigit() and int(name) not in remote or ".orbax-checkpoint-tmp" in name:
        shutil.rmtree(os.path.join(self.local, name), ignore_errors=True)
    if remote:
      self.pull(remote[-1])

  def pull(self, step: int) -> str:
    """The local folder of ``step``, downloaded if the copy lacks it."""
    folder = os.path.join(self.local, str(step))
    if not self._local_complete(step):
      if not storage.exists(storage.join(self.url, str(step), UPLOADED)):
        raise FileNotFoundError(f"{self.url}/{step}: no complete checkpoint there")
      shutil.rmtree(folder, ignore_errors=True)
      storage.download(storage.join(self.url, str(step)), folder + ".download")
      os.replace(folder + ".download", folder)
    return folder

  def push(self, step: int) -> None:
    """Uploads local step ``step``, its marker last; then deletes the store's steps that the
    local copy no longer keeps (Orbax's max_to_keep removed them)."""
    folder = os.path.join(self.local, str(step))
    target = storage.join(self.url, str(step))
    storage.upload(folder, target)
    storage.write_text(storage.join(target, UPLOADED), json.dumps({"time": time.time()}))
    with open(os.path.join(folder, UPLOADED), "w") as f:
      f.write("{}")
    kept = {int(n) for n in os.listdir(self.local) if n.isdigit()}
    for old in self.remote_steps():
      if old not in kept:
        storage.remove(storage.join(self.url, str(old), UPLOADED))
        storage.remove(storage.join(self.url, str(old)))


def _read_json(path: str) -> dict[str, Any]:
  return json.loads(storage.read_text(path))


def checkpoint_layout(step_dir: str) -> int:
  """The layout a checkpoint folder (``.../checkpoints/<step>``) was written in."""
  path = storage.join(step_dir, "meta", "metadata")
  if not storage.exists(path):
    return 1
  return int(_read_json(path).get("layout", 1))


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
    self.workdir = storage.absolute(workdir)
    self.best_metric = best_metric
    self._mirrors: dict[str, Mirror] = {}
    options = dict(enable_async_checkpointing=async_save, create=True)
    self.latest = ocp.CheckpointManager(
        self._folder("checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, **options))
    self.best = None
    if best_metric:
      if best_mode not in ("max", "min"):
        raise ValueError(f"config.checkpoint.best_mode must be 'max' or 'min', got {best_mode!r}")
      self.best = ocp.CheckpointManager(
          self._folder("best"),
          options=ocp.CheckpointManagerOptions(
              max_to_keep=keep_best, best_fn=lambda m: m[best_metric], best_mode=best_mode,
              **options))

  def _folder(self, name: str) -> str:
    """Where Orbax writes W/<name>: there itself, or a local mirror uploaded step by step."""
    url = storage.join(self.workdir, name)
    if orbax_writes(url):
      return url
    mirror = Mirror(url)
    if jax.process_index() == 0:
      mirror.reconcile()
    _check_shared(mirror.local, url)
    self._mirrors[name] = mirror
    return mirror.local

  def _upload(self, name: str, manager: ocp.CheckpointManager, step: int) -> None:
    mirror = self._mirrors.get(name)
    if mirror is None:
      return
    manager.wait_until_finished()        # Orbax has committed the step (every process's part)
    multihost.barrier(f"checkpoint/{name}/{step}")
    if jax.process_index() == 0:
      mirror.push(step)

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def save(self, step: int, state: Any, data_iterator: Any = None,
           metrics: dict[str, float] | None = None) -> None:
    """Saves ``state`` (and the data iterator's position) as checkpoint ``step``."""
    self.latest.save(step, args=_save_args(state, data_iterator, step, metrics))
    self._upload("checkpoints", self.latest, step)

  def save_best(self, step: int, state: Any, metrics: dict[str, float]) -> bool:
    """Saves ``state`` under W/best when ``metrics[best_metric]`` is among the best kept."""
    if self.best is None:
      return False
    if self.best_metric not in metrics:
      raise KeyError(f"config.checkpoint.best_metric={self.best_metric!r} is not among the "
                     f"evaluation metrics {sorted(metrics)}")
    clean = {k: float(v) for k, v in metrics.items()}
    saved = self.best.save(step, args=_save_args(state, None, step, clean), metrics=clean)
    if saved:
      self._upload("best", self.best, step)
    return saved

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


def _check_shared(folder: str, url: str) -> None:
  """With several processes, the local mirror of ``url`` must be one folder they all see: each
  process writes its part of a checkpoint there and process 0 uploads the whole."""
  if jax.process_count() == 1:
    return
  token = time.time_ns() % (2 ** 62) if jax.process_index() == 0 else 0
  if token:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ".process0"), "w") as f:
      f.write(str(token))
  token = multihost.agree_max(f"mirror/{url}", token)
  mark = os.path.join(folder, ".process0")
  seen = open(mark).read().strip() if os.path.exists(mark) else ""
  if seen != str(token):
    raise storage.StorageError(
        f"checkpoints on {url} with {jax.process_count()} processes: Orbax cannot write that "
        f"store, so each process writes its part to the local mirror {folder}, which this "
        f"process does not share with process 0. Set PATHFLIP_CACHE_DIR to a folder every "
        "process sees, or use a gs:// or shared-disk workdir")


def _save_args(state, data_iterator, step, metrics):
  meta = {"step": int(step), "time": time.time(), "layout": LAYOUT,
          "metrics": {k: float(v) for k, v in (metrics or {}).items()}}
  items = {"state": ocp.args.PyTreeSave(state), "meta": ocp.args.JsonSave(meta)}
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
  return ocp.args.Composite(**items)


def uses_best(workdir: str) -> bool:
  """Whether the run in ``workdir`` was trained with ``config.checkpoint.use_best``."""
  path = storage.join(workdir, "config.json")
  if not storage.exists(path):
    return False
  checkpoint = _read_json(path).get("checkpoint") or {}
  return bool(checkpoint.get("use_best"))


def model_dir(path: str) -> str:
  """Where the model of the run in ``path`` lies: W/best for a run trained with
  ``config.checkpoint.use_best``, else W/checkpoints; a checkpoint folder as given."""
  path = storage.absolute(path)
  if not storage.isdir(storage.join(path, "checkpoints")):
    return path
  if uses_best(path):
    best = storage.join(path, "best")
    if not storage.isdir(best):
      raise FileNotFoundError(f"{best} not found: {path} was trained with "
                              "config.checkpoint.use_best but holds no best checkpoint")
    return best
  return storage.join(path, "checkpoints")


def _manager(path: str, model: bool = True, step: int | None = None) -> ocp.CheckpointManager:
  """A read-only manager over ``path``: a workdir, its checkpoints/ or best/ folder. For a
  workdir, ``model``: the folder holding the run's model (``model_dir``); else checkpoints/.
  On a store Orbax cannot read, a local mirror holding ``step`` (default: the latest)."""
  path = storage.absolute(path)
  if storage.isdir(storage.join(path, "checkpoints")):
    path = model_dir(path) if model else storage.join(path, "checkpoints")
  if not orbax_writes(path):
    mirror = Mirror(path)
    # A folder of its own: a training run on this machine may be writing the other one.
    mirror.local += "-read"
    steps = mirror.remote_steps()
    if not steps:
      raise FileNotFoundError(f"{path}: no complete checkpoint in it")
    mirror.reconcile()
    mirror.pull(steps[-1] if step is None else step)
    path = mirror.local
  if not storage.isdir(path):
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
  return storage.join(str(manager.directory), str(manager.latest_step()))


def restore_from(manager: ocp.CheckpointManager | str, abstract_state: Any,
                 data_iterator: Any = None, step: int | None = None
                 ) -> tuple[Any, dict[str, Any]]:
  """Restores state (onto ``abstract_state``'s shardings) and, if given, the data iterator; a
  workdir given by path restores from its checkpoints/ (to continue training it)."""
  if isinstance(manager, str):
    manager = _manager(manager, model=False, step=step)
  step = manager.latest_step() if step is None else step
  # A checkpoint of an earlier layout would fail inside Orbax with a message about tree
  # structure; this says what it is instead.
  check_layout(storage.join(str(manager.directory), str(step)))
  # Explicit restore args: each array is read straight into the target's sharding (the mesh of
  # this run, whatever the mesh of the run that saved it).
  restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
  items = {"state": ocp.args.PyTreeRestore(abstract_state, restore_args=restore_args),
           "meta": ocp.args.JsonRestore()}
  has_data = storage.isdir(storage.join(str(manager.directory), str(step), "data"))
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
  manager = _manager(path, step=step)
  step = manager.latest_step() if step is None else step
  check_layout(storage.join(str(manager.directory), str(step)))
  state_dir = storage.join(str(manager.directory), str(step), "state")
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
  path = storage.join(workdir, "config.json")
  if not storage.exists(path):
    raise FileNotFoundError(f"{path} not found: {name} is not a training workdir "
                            "(python -m pathflip_jax.train --workdir ...)")
  config = ml_collections.ConfigDict(_read_json(path))
  checkpoints = storage.join(workdir, "checkpoints")
  steps = (sorted(int(s) for s in storage.listdir(checkpoints) if s.isdigit())
           if orbax_writes(checkpoints) else Mirror(checkpoints).remote_steps())
  if steps:
    check_layout(storage.join(checkpoints, str(steps[-1])), f"{name} ({path})")
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
