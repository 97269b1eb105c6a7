"""The metric writer: ``W/metrics.jsonl`` and the TensorBoard event files in ``W/tensorboard/``,
read back from the files (TFRecord framing, CRCs checked, ``Event`` protos)."""

import math
import os
import struct

from tensorboardX.crc32c import crc32c
from tensorboardX.proto import event_pb2

from pathflip_jax import metric_writer


def _masked_crc(data: bytes) -> int:
  # TFRecord's masked CRC32C (the same mask as tensorboardX's record_writer).
  crc = crc32c(data) & 0xFFFFFFFF
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _read_events(path: str) -> list[event_pb2.Event]:
  """The Event protos of one event file; fails on a torn record or a bad CRC."""
  with open(path, "rb") as f:
    data = f.read()
  events, offset = [], 0
  while offset < len(data):
    header = data[offset:offset + 8]
    (length,) = struct.unpack("<Q", header)
    (header_crc,) = struct.unpack("<I", data[offset + 8:offset + 12])
    assert header_crc == _masked_crc(header), f"{path}: bad length CRC at byte {offset}"
    body = data[offset + 12:offset + 12 + length]
    assert len(body) == length, f"{path}: record cut at byte {offset}"
    (body_crc,) = struct.unpack("<I", data[offset + 12 + length:offset + 16 + length])
    assert body_crc == _masked_crc(body), f"{path}: bad data CRC at byte {offset}"
    events.append(event_pb2.Event.FromString(body))
    offset += 16 + length
  return events


def _event_files(workdir: str) -> list[str]:
  logdir = os.path.join(workdir, "tensorboard")
  return sorted(os.path.join(logdir, name) for name in os.listdir(logdir)
                if name.startswith("events.out.tfevents."))


def _tensorboard_scalars(workdir: str) -> dict[tuple[int, str], float]:
  """{(step, tag): value} as TensorBoard shows it: files in name order, and a SessionLog START at
  step s (a writer's purge_step) hides the events of steps >= s read before it."""
  scalars = {}
  for path in _event_files(workdir):
    for event in _read_events(path):
      if event.HasField("session_log") and event.session_log.status == event.session_log.START:
        scalars = {key: v for key, v in scalars.items() if key[0] < event.step}
      for value in event.summary.value:
        scalars[(event.step, value.tag)] = value.simple_value
  return scalars


def test_event_file_holds_the_scalars(tmp_path):
  writer = metric_writer.MetricWriter(str(tmp_path))
  writer.write(1, {"train/loss": 2.5, "train/lr": 0.125})
  writer.write(2, {"train/loss": 1.75, "val/acc": float("nan")})
  writer.close()

  assert len(_event_files(str(tmp_path))) == 1
  scalars = _tensorboard_scalars(str(tmp_path))
  assert sorted(scalars) == [(1, "train/loss"), (1, "train/lr"), (2, "train/loss"), (2, "val/acc")]
  assert scalars[(1, "train/loss")] == 2.5
  assert scalars[(1, "train/lr")] == 0.125
  assert scalars[(2, "train/loss")] == 1.75
  assert math.isnan(scalars[(2, "val/acc")])
  # The JSON file has the same rows (a non-finite value as its string).
  rows = metric_writer.read_metrics(str(tmp_path))
  assert [{k: v for k, v in r.items() if k != "time"} for r in rows] == [
      {"step": 1, "train/loss": 2.5, "train/lr": 0.125},
      {"step": 2, "train/loss": 1.75, "val/acc": "nan"}]


def test_resume_hides_steps_after_the_checkpoint(tmp_path):
  writer = metric_writer.MetricWriter(str(tmp_path))
  for step in (1, 2, 3, 4):
    writer.write(step, {"loss": float(step)})
  writer.close()

  # Killed after step 4, resumed from the checkpoint of step 2 (within the same second: the first
  # file must survive) and killed again after step 3: step 4 of the first run is gone.
  writer = metric_writer.MetricWriter(str(tmp_path), resume_step=2)
  writer.write(3, {"loss": 30.0})
  writer.close()

  assert len(_event_files(str(tmp_path))) == 2
  assert _tensorboard_scalars(str(tmp_path)) == {(1, "loss"): 1.0, (2, "loss"): 2.0,
                                                 (3, "loss"): 30.0}
  assert [(r["step"], r["loss"]) for r in metric_writer.read_metrics(str(tmp_path))] == [
      (1, 1.0), (2, 2.0), (3, 30.0)]


def test_disabled_writes_nothing(tmp_path):
  writer = metric_writer.MetricWriter(str(tmp_path), enabled=False)
  writer.write(1, {"loss": 1.0})
  writer.close()
  assert os.listdir(tmp_path) == []


def test_fresh_workdir_has_no_purge(tmp_path):
  # A run that starts from config.resume (resume_step > 0) in a new workdir has nothing to hide.
  metric_writer.MetricWriter(str(tmp_path), resume_step=5).close()
  (path,) = _event_files(str(tmp_path))
  assert not any(e.HasField("session_log") for e in _read_events(path))
