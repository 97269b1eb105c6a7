"""The training order does not depend on the number of processes."""

import grain
import pytest

from pathflip_jax.input_pipeline import ProcessRows


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_process_rows_rebuild_the_global_batches(processes):
  """Each process's rows of each global batch, put side by side, are the one-process order."""
  batch = 8
  endless = grain.MapDataset.range(37).seed(3).shuffle().repeat(None)
  parts = [ProcessRows(endless, batch, p, processes) for p in range(processes)]
  rows = batch // processes
  rebuilt = [parts[p][step * rows + r] for step in range(10) for p in range(processes)
             for r in range(rows)]
  assert rebuilt == [endless[i] for i in range(10 * batch)]
  # Batched as the trainer does, each process reads distinct elements.
  firsts = [next(iter(part.batch(rows).to_iter_dataset())).tolist() for part in parts]
  assert sum(firsts, []) == [endless[i] for i in range(batch)]


def test_process_rows_need_a_divisible_batch():
  with pytest.raises(ValueError, match="batch_size 6 is not divisible by the 4 JAX processes"):
    ProcessRows(grain.MapDataset.range(10), 6, 0, 4)
