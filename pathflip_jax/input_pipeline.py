"""grain input pipelines: deterministic shuffling, per-process shards, workers, global arrays.

Training data is a ``grain.MapDataset`` (random access over ArrayRecord shards), so the whole
order is a function of the seed alone, not of the number of processes: :func:`train_iterator`
shuffles it anew every epoch, applies random augmentation seeded by element index, gives each
process its rows of every global batch, batches and prefetches in worker processes. The
iterator's state (how far it got) is saved in every checkpoint
(``grain.checkpoint.CheckpointSave``), which is why a resumed run sees exactly the batches an
uninterrupted one would have.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Mapping, Sequence

import grain
import jax
import numpy as np
from jax.sharding import Mesh

from pathflip_jax import sharding


def local_batch_size(global_batch_size: int) -> int:
  """This process's share of the global batch (the batch is split evenly over processes)."""
  count = jax.process_count()
  if global_batch_size % count:
    raise ValueError(f"batch_size {global_batch_size} is not divisible by the "
                     f"{count} JAX processes")
  return global_batch_size // count


def _exit_with_parent(parent_pid: int, worker_index: int = 0, worker_count: int = 1) -> None:
  """grain ``worker_init_fn``: the worker dies with the process that started it.

  A worker blocks on its output queue, so a trainer killed with SIGKILL (the usual way to stop
  a hung job) would otherwise leave it alive, holding memory and file handles, forever.
  """
  del worker_index, worker_count
  if sys.platform.startswith("linux"):
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:   # the parent died before prctl took effect
      os._exit(1)
    return

  def watch():  # elsewhere: poll, since only Linux has a parent-death signal
    while os.getppid() == parent_pid:
      time.sleep(1.0)
    os._exit(1)

  threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def prefetch_in_workers(dataset: grain.IterDataset, num_workers: int,
                        buffer_size: int) -> grain.IterDataset:
  """``dataset.mp_prefetch`` over ``num_workers`` processes that die with this one."""
  return dataset.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=buffer_size),
      worker_init_fn=functools.partial(_exit_with_parent, os.getpid()))


def check_batch_divides_mesh(global_batch_size: int, mesh: Mesh, key: str = "batch_size") -> None:
  """The batch is split over the mesh's data and fsdp axes: it must divide evenly."""
  shards = sharding.batch_shards(mesh)
  if global_batch_size % shards:
    raise ValueError(f"config.{key}={global_batch_size} must be divisible by the "
                     f"data x fsdp mesh size {shards} (mesh {dict(mesh.shape)})")


class ProcessRows(grain.MapDataset):
  """One process's rows of each global batch of ``parent``: with global batch B over P
  processes (L = B / P rows each), element j is ``parent[(j // L) * B + p * L + j % L]``."""

  def __init__(self, parent: grain.MapDataset, global_batch_size: int, process_index: int,
               process_count: int):
    super().__init__(parent)
    self._global = global_batch_size
    if global_batch_size % process_count:
      raise ValueError(f"batch_size {global_batch_size} is not divisible by the "
                       f"{process_count} JAX processes")
    self._local = global_batch_size // process_count
    self._offset = process_index * self._local
    self._length = len(parent) // global_batch_size * self._local

  def __len__(self) -> int:
    return self._length

  def _parent_index(self, index: int) -> int:
    step, row = divmod(index, self._local)
    return step * self._global + self._offset + row

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._parent_index(index)]

  def _getitems(self, indices: Sequence[int]):
    parent_indices = [self._parent_index(i) for i in indices]
    return self._parent._getitems(parent_indices)  # pylint: disable=protected-access

  def __str__(self) -> str:
    return f"ProcessRows(batch={self._global}, rows={self._offset}:{self._offset + self._local})"


def train_iterator(source: grain.MapDataset, *, global_batch_size: int, seed: int,
                   transform: grain.transforms.RandomMap | grain.transforms.Map | None = None,
                   batch_fn: Callable[[Sequence[Any]], Any] | None = None,
                   worker_count: int = 0, worker_buffer_size: int = 2,
                   reader_threads: int = 1) -> grain.DatasetIterator:
  """An endless, shuffled, augmented, batched iterator over this process's part of ``source``.

  Epochs are reshuffled (seeded by ``seed`` and the epoch); ``transform`` (a ``RandomMap``) gets
  a generator seeded by ``seed`` and the element's position in the endless sequence, so every
  epoch augments differently and a restored iterator repeats nothing and skips nothing.
  ``batch_fn`` replaces grain's stacking (e.g. padding variable-length slides per batch).
  """
  if len(source) == 0:
    raise ValueError("the training dataset is empty")
  # One global order, whatever the number of processes: every process shuffles and augments
  # the same endless sequence and reads only its rows of each global batch, so a run on 2 hosts
  # x 4 devices trains on exactly the batches of 1 host x 8 devices.
  ds = source.seed(seed).shuffle().repeat(None)
  if isinstance(transform, grain.transforms.RandomMap):
    ds = ds.random_map(transform)
  elif transform is not None:
    ds = ds.map(transform)
  ds = ProcessRows(ds, global_batch_size, jax.process_index(), jax.process_count())
  ds = ds.batch(local_batch_size(global_batch_size), drop_remainder=True, batch_fn=batch_fn)
  # grain's default read-ahead (16 threads, 500 elements, i.e. 500 *batches* here) would decode
  # thousands of images ahead and starve the training step of CPU; a few batches ahead suffice.
  iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=reader_threads,
                                                 prefetch_buffer_size=worker_buffer_size))
  if worker_count > 0:
    iter_ds = prefetch_in_workers(iter_ds, worker_count, worker_buffer_size)
  return iter(iter_ds)


def to_global(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's batch rows -> global arrays split over the mesh's data and fsdp axes."""
  return {k: jax.make_array_from_process_local_data(
      sharding.batch_sharding(mesh, np.ndim(v)), np.asarray(v)) for k, v in batch.items()}


def full_batch_to_global(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """A batch that every process holds whole (evaluation: each process reads the same split)
  -> global arrays split over the mesh's data and fsdp axes, each process placing the rows of
  its own devices."""
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    out[k] = jax.make_array_from_callback(v.shape, sharding.batch_sharding(mesh, v.ndim),
                                          lambda index, v=v: v[index])
  return out


def agree_padding(batch: dict[str, np.ndarray], padded_axes: Mapping[str, int],
                  name: str = "padding") -> dict[str, np.ndarray]:
  """Pads this process's batch so that every process's has the same shape: each array of
  ``padded_axes`` (key -> the axis a collate function padded to the batch's longest member) is
  zero-padded on that axis to the longest any process has (``multihost.agree_max``; one
  process: unchanged)."""
  if jax.process_count() == 1 or not padded_axes:
    return batch
  from pathflip_jax import multihost  # pylint: disable=import-outside-toplevel
  local = max(batch[k].shape[axis] for k, axis in padded_axes.items())
  length = multihost.agree_max(name, local)
  if length == local and all(batch[k].shape[a] == length for k, a in padded_axes.items()):
    return batch
  out = dict(batch)
  for key, axis in padded_axes.items():
    widths = [(0, 0)] * batch[key].ndim
    widths[axis] = (0, length - batch[key].shape[axis])
    out[key] = np.pad(batch[key], widths)
  return out
