"""Metrics of a run: ``W/metrics.jsonl`` and TensorBoard event files in ``W/tensorboard/``.

One JSON line per write: ``{"step": N, "time": unix, "<name>": value, ...}``. A resumed run
appends; rows of steps after the checkpoint it resumed from are dropped first, so the file reads
as one run. Every write also goes to TensorBoard as scalars (tensorboardX, a required dependency:
``tensorboard --logdir W/tensorboard``); a resumed run starts a new event file that tells
TensorBoard to hide the events of steps after its checkpoint, the same cut as the JSON file.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping

from tensorboardX import SummaryWriter


class MetricWriter:
  """Writes from one process only (``enabled``; the trainer enables process 0 of a multi-host
  run, whose metrics are global means that every process holds)."""

  def __init__(self, workdir: str, resume_step: int = 0, enabled: bool = True):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = enabled
    self._tensorboard: SummaryWriter | None = None
    if not enabled:
      return
    if os.path.exists(self.path):
      self._truncate_after(resume_step)
    self._tensorboard = _tensorboard_writer(os.path.join(workdir, "tensorboard"), resume_step)

  def _truncate_after(self, step: int) -> None:
    with open(self.path) as f:
      lines = [line for line in f if line.strip()]
    kept = []
    for line in lines:
      try:
        if json.loads(line).get("step", 0) <= step:
          kept.append(line)
      except json.JSONDecodeError:   # a line cut by a kill
        continue
    with open(self.path, "w") as f:
      f.writelines(kept)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), "time": round(time.time(), 3)}
    for key, value in metrics.items():
      value = float(value)
      row[key] = value if math.isfinite(value) else str(value)
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tensorboard is not None:
      for key, value in metrics.items():
        self._tensorboard.add_scalar(key, float(value), int(step))
      self._tensorboard.flush()

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()


def _tensorboard_writer(logdir: str, resume_step: int) -> SummaryWriter:
  """A SummaryWriter on ``logdir``. Where earlier event files are there (a resumed or restarted
  run), its ``purge_step`` hides their events after ``resume_step`` in TensorBoard, as
  ``_truncate_after`` drops those rows of metrics.jsonl; the old files themselves are kept."""
  earlier = [name for name in (os.listdir(logdir) if os.path.isdir(logdir) else [])
             if name.startswith("events.out.tfevents.")]
  if not earlier:
    return SummaryWriter(logdir)
  # tensorboardX names a file by the second and host and opens it with "wb": a run resumed within
  # the second of the last one would otherwise truncate that run's file.
  return SummaryWriter(logdir, purge_step=int(resume_step) + 1,
                       filename_suffix=f".{len(earlier)}")


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The rows of ``W/metrics.jsonl``."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]
