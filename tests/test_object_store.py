"""The whole path on an object store: moto's S3 server on 127.0.0.1 (tests/conftest.py
``s3_bucket``) stands in for a bucket. Slides and manifest uploaded there are tiled to s3://,
features extracted to s3:// by two processes, PathFLIP trained by two JAX processes with its
workdir on s3:// (one killed mid-run, both restarted), evaluated by two processes and inferred
from s3://; the run matches one process on local disk."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

from data_prep import extract_features, tile_slides
from pathflip_jax import (checkpointing, config_args, evaluate, infer, metric_writer, storage,
                          train)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 20
ENCODER = (f"{os.path.join(REPO, 'configs', 'extract_features.py')}:variant=vit_tiny_test,"
           "num_workers=0,batch_size=8,slides_per_shard=2")


OVERRIDES = {"total_steps": STEPS, "log_steps": 4, "checkpoint.every": 4,
             "input.worker_count": 0}


def _config_spec(features: str) -> str:
  # Evaluated on the 7 training slides: the 8-slide cohort's test split has one.
  return f"configs/pathflip_demo.py:size=test,features_dir={features},eval_split=train"


def _align_args(features: str) -> list[str]:
  return ["--config", _config_spec(features)] + [f"--config.{k}={v}" for k, v in OVERRIDES.items()]


def _port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _processes(module: str, args: list[str], log_dir) -> list[subprocess.Popen]:
  """Two JAX processes of 4 CPU devices each, joined through jax.distributed."""
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS=(
      "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"))
  port = _port()
  out = []
  for i in range(2):
    log = open(log_dir / f"{module.rsplit('.', 1)[-1]}-{i}-{time.time_ns()}.log", "w")
    out.append(subprocess.Popen(
        [sys.executable, "-m", module, *args, "--jax_distributed", "--coordinator_address",
         f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(i)],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True))
    out[-1].log_path = log.name
  return out


def _wait(processes, timeout=240) -> list[str]:
  logs = []
  for p in processes:
    p.wait(timeout=timeout)
    logs.append(open(p.log_path).read())
  for p, log in zip(processes, logs):
    assert p.returncode == 0, log[-4000:]
  return logs


@pytest.fixture
def store(s3_bucket, tmp_path, monkeypatch):
  """A fresh prefix of the bucket and a fresh local cache."""
  monkeypatch.setenv("PATHFLIP_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.setattr(storage, "_DEFAULT_CACHE", None)
  return f"{s3_bucket}/{uuid.uuid4().hex[:8]}"


@pytest.mark.slow
def test_tile_extract_train_evaluate_infer_on_s3(store, demo_cohort, tmp_path):
  # Slides and manifest on the store, with one slide that is not a slide.
  storage.upload(str(demo_cohort / "slides"), f"{store}/cohort/slides")
  rows = [json.loads(line) for line in (demo_cohort / "manifest.jsonl").read_text().splitlines()]
  rows.append({**rows[0], "slide_id": "broken", "path": "slides/broken.tif"})
  storage.write_bytes(f"{store}/cohort/slides/broken.tif", b"II*\x00" + b"\x00" * 64)
  storage.write_text(f"{store}/cohort/manifest.jsonl", "".join(json.dumps(r) + "\n" for r in rows))

  tiled = tile_slides.run(["--manifest", f"{store}/cohort/manifest.jsonl", "--output_dir",
                           f"{store}/patches", "--direct_running_mode=in_memory",
                           "--direct_num_workers=1", "--progress_interval=0"])
  assert (tiled["slides_ok"], tiled["slides_failed"]) == (8, 1)
  failures = storage.read_text(f"{store}/patches/failures.jsonl")
  assert "broken" in failures and "corrupt" in failures or "not_a_slide" in failures
  assert not os.path.exists("s3:")                 # nothing written to a local "s3:" folder
  assert any(n.startswith("patches-") for n in storage.listdir(f"{store}/patches"))

  # Features: two parts written at once into one s3:// directory, then a re-run with no split
  # that finds everything done.
  features = f"{store}/features"
  for part in range(2):
    extract_features.run(["--patches", f"{store}/patches", "--output_dir", features,
                          "--config", ENCODER, "--progress_interval", "0", "--num_shards", "2",
                          "--shard_index", str(part)])
  again = extract_features.run(["--patches", f"{store}/patches", "--output_dir", features,
                                "--config", ENCODER, "--progress_interval", "0"])
  assert again["slides_written"] == 0 and again["slides_skipped"] == 8
  index = [json.loads(line) for line in storage.read_text(f"{features}/slides.jsonl").splitlines()]
  assert sorted(r["slide_id"] for r in index) == sorted(r["slide_id"] for r in rows[:8])

  # The reference: one process, 8 devices, local disk.
  local = str(tmp_path / "local")
  reference = train.train_and_evaluate(config_args.load_config(_config_spec(features), OVERRIDES),
                                       local)

  # Two processes x 4 devices, workdir on s3://: kill one when checkpoint 4 is up, restart both.
  workdir = f"{store}/align"
  first = _processes("pathflip_jax.train", _align_args(features) + ["--workdir", workdir],
                     tmp_path)
  marker = f"{workdir}/checkpoints/4/{checkpointing.UPLOADED}"
  deadline = time.time() + 240
  while not storage.exists(marker):
    assert time.time() < deadline and all(p.poll() is None for p in first), \
        open(first[0].log_path).read()[-3000:]
    time.sleep(0.2)
  first[1].send_signal(signal.SIGKILL)
  first[0].send_signal(signal.SIGKILL)        # its partner gone, it would wait in a collective
  for p in first:
    p.wait()
  assert not storage.exists(f"{workdir}/results.json")
  logs = _wait(_processes("pathflip_jax.train", _align_args(features) + ["--workdir", workdir],
                          tmp_path))
  assert "resumed from" in logs[0]
  results = json.loads(storage.read_text(f"{workdir}/results.json"))
  metrics = [k for k in reference if "/" in k]
  assert metrics
  for key in metrics:
    np.testing.assert_allclose(results[key], reference[key], atol=1e-5, err_msg=key)
  # The 20 steps themselves: the training loss at every log step, through the kill and resume.
  losses = [{r["step"]: r["train/loss"] for r in metric_writer.read_metrics(w)
             if "train/loss" in r} for w in (workdir, local)]
  assert sorted(losses[0]) == list(range(4, STEPS + 1, 4)) == sorted(losses[1])
  for step, loss in losses[1].items():
    np.testing.assert_allclose(losses[0][step], loss, atol=1e-4, err_msg=f"loss at step {step}")
  mine, theirs = checkpointing.load_params(workdir), checkpointing.load_params(local)
  assert mine.keys() == theirs.keys()
  for name in mine:
    np.testing.assert_allclose(mine[name], theirs[name], atol=1e-4, err_msg=name)

  # Evaluation: two processes from s3:// match one.
  _wait(_processes("pathflip_jax.evaluate", ["--workdir", workdir, "--output_dir",
                                             f"{store}/eval2"], tmp_path))
  one = evaluate.evaluate(None, workdir, output_dir=str(tmp_path / "eval1"))
  for name, values in one.items():
    two = json.loads(storage.read_text(f"{store}/eval2/{name}.json"))["metrics"]
    for key, value in values.items():
      np.testing.assert_allclose(two[key], value, atol=1e-5, err_msg=f"{name}/{key}")

  # Inference from s3:// (the run, its features' encoder record, the slide), written there too.
  slide = f"{store}/cohort/slides/{rows[0]['slide_id']}.tif"
  summary = infer.infer(workdir, slide, f"{store}/infer", queries=["invasive carcinoma"])
  assert summary["num_patches"] > 0 and summary["page"].startswith(f"{store}/infer")
  assert "summary.json" in storage.listdir(f"{store}/infer")


def test_bad_urls_fail_at_start_with_one_line(store, tmp_path):
  closed = f"http://127.0.0.1:{_port()}"
  env = dict(os.environ, PYTHONPATH=REPO, AWS_ENDPOINT_URL=closed)
  done = subprocess.run([sys.executable, "-m", "pathflip_jax.train", "--config",
                         "tests/toy_config.py", "--workdir", "s3://nowhere-bucket/run"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert done.returncode != 0
  last = done.stderr.strip().splitlines()[-1]
  assert last.startswith("[train] --workdir s3://nowhere-bucket/run: unreachable"), last
  with pytest.raises(storage.StorageError, match="--patches s3://no-such-bucket-x/p: no bucket"):
    storage.check_reachable("s3://no-such-bucket-x/p", "--patches")
  with pytest.raises(SystemExit, match="--manifest .*missing.jsonl: not found"):
    tile_slides.run(["--manifest", f"{store}/missing.jsonl", "--output_dir", f"{store}/p"])
