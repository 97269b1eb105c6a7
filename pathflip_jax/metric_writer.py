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

from pathflip_jax import storage


class MetricWriter:
  """Writes from one process only (``enabled``; the trainer enables process 0 of a multi-host
  run, whose metrics are global means that every process holds). A workdir on an object store
  gets metrics.jsonl rewritten whole at each write, and the TensorBoard event file written in a
  local staging folder and uploaded after each write."""

  def __init__(self, workdir: str, resume_step: int = 0, enabled: bool = True):
    self.path = storage.join(workdir, "metrics.jsonl")
    self.enabled = enabled
    self._remote = storage.is_url(workdir)
    self._lines: list[str] = []
    self._tensorboard: SummaryWriter | None = None
    self._tensorboard_url = storage.join(workdir, "tensorboard")
    self._tensorboard_dir = self._tensorboard_url
    if not enabled:
      return
    if storage.exists(self.path):
      self._truncate_after(resume_step)
    if self._remote:
      self._tensorboard_dir = storage.cache().staging(self._tensorboard_url)
      for name in storage.listdir(self._tensorboard_url):   # earlier runs' files: kept there
        open(os.path.join(self._tensorboard_dir, name), "wb").close()
    self._tensorboard = _tensorboard_writer(self._tensorboard_dir, resume_step)

  def _truncate_after(self, step: int) -> None:
    kept = []
    for line in storage.read_text(self.path).splitlines(keepends=True):
      if not line.strip():
        continue
      try:
        if json.loads(line).get("step", 0) <= step:
          kept.append(line if line.endswith("\n") else line + "\n")
      except json.JSONDecodeError:   # a line cut by a kill
        continue
    self._lines = kept
    storage.write_text(self.path, "".join(kept))

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), "time": round(time.time(), 3)}
    for key, value in metrics.items():
      value = float(value)
      row[key] = value if math.isfinite(value) else str(value)
    line = json.dumps(row) + "\n"
    if self._remote:
      self._lines.append(line)
      storage.write_text(self.path, "".join(self._lines))
    else:
      with open(self.path, "a") as f:
        f.write(line)
    if self._tensorboard is not None:
      for key, value in metrics.items():
        self._tensorboard.add_scalar(key, float(value), int(step))
      self._tensorboard.flush()
      self._upload_tensorboard()

  def _upload_tensorboard(self) -> None:
    if not self._remote:
      return
    for name in os.listdir(self._tensorboard_dir):
      local = os.path.join(self._tensorboard_dir, name)
      if os.path.getsize(local):     # placeholders of earlier runs' files stay as they are
        storage.upload(local, storage.join(self._tensorboard_url, name))

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()
      self._upload_tensorboard()


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
  text = storage.read_text(storage.join(workdir, "metrics.jsonl"))
  return [json.loads(line) for line in text.splitlines() if line.strip()]
