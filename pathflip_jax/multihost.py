"""What the processes of a multi-host run agree on without touching the devices.

A training step's batch shape must be the same on every process (the global arrays are built
from each process's rows), but each process pads its own rows to the bucket its slides need.
:func:`agree_max` settles that through ``jax.distributed``'s key-value store on the coordinator:
a host-side exchange of one integer per process, which (unlike a device collective) does not wait
for the previous step's computation. With one process it is the identity.
"""

from __future__ import annotations

import sys

import jax
from absl import flags

_TIMEOUT_MS = 10 * 60 * 1000   # a process that does not answer in 10 minutes is gone
_PREFIX = "pathflip_jax"


def _client():
  from jax._src import distributed  # pylint: disable=import-outside-toplevel
  client = distributed.global_state.client
  if client is None:
    raise RuntimeError(f"{jax.process_count()} JAX processes but no jax.distributed client: "
                       "start every process with jax.distributed.initialize() (the trainer's "
                       "--jax_distributed)")
  return client


_calls: dict[str, int] = {}


def agree_max(name: str, value: int) -> int:
  """The largest ``value`` any process passes to its n-th call under ``name`` (every process
  makes the same calls in the same order, e.g. one per training step)."""
  count = jax.process_count()
  if count == 1:
    return int(value)
  client = _client()
  me = jax.process_index()
  call = _calls.get(name, 0)
  _calls[name] = call + 1
  key = f"{_PREFIX}/{name}/{call}"
  client.key_value_set(f"{key}/{me}", str(int(value)))
  values = [int(client.blocking_key_value_get(f"{key}/{p}", _TIMEOUT_MS)) for p in range(count)]
  # Every process set its value of this call after reading all values of the previous one, so
  # that key is no longer needed: removing it keeps a long run from filling the store.
  if call:
    client.key_value_delete(f"{_PREFIX}/{name}/{call - 1}/{me}")
  return max(values)


def barrier(name: str) -> None:
  """Waits until every process reaches ``name`` (nothing with one process)."""
  if jax.process_count() > 1:
    # A barrier id may be used once: the n-th call under ``name`` gets its own.
    call = _calls.get(f"barrier/{name}", 0)
    _calls[f"barrier/{name}"] = call + 1
    _client().wait_at_barrier(f"{_PREFIX}/barrier/{name}/{call}", _TIMEOUT_MS)


def define_flags(flag_values: flags.FlagValues) -> None:
  """The command-line flags that start a process of a multi-host job (train, evaluate)."""
  flags.DEFINE_bool("jax_distributed", False,
                    "multi-host: jax.distributed.initialize() first; on Cloud TPU pods and SLURM "
                    "its settings are detected, elsewhere give the three below",
                    flag_values=flag_values)
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0",
                      flag_values=flag_values)
  flags.DEFINE_integer("num_processes", None, "processes in all", flag_values=flag_values)
  flags.DEFINE_integer("process_id", None, "this process's index", flag_values=flag_values)


def initialize(args, command: str) -> None:
  """jax.distributed.initialize() when ``args.jax_distributed`` (flags of define_flags)."""
  if not args.jax_distributed:
    return
  jax.distributed.initialize(coordinator_address=args.coordinator_address,
                             num_processes=args.num_processes, process_id=args.process_id)
  print(f"[{command}] process {jax.process_index()} of {jax.process_count()}: "
        f"{jax.local_device_count()} local of {jax.device_count()} devices",
        file=sys.stderr, flush=True)
