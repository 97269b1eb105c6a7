"""The trainer: sharded steps, checkpoints and resume, the NaN guard, partial init."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from pathflip_jax import checkpointing, config_args, losses, metric_writer, optim, sharding, train
from pathflip_jax.models import patch_clip, text_encoder, vit
from tests import toy_task

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _clip_config():
  vision = vit.get_config("vit_tiny_test", image_size=32, patch_size=8, width=32, depth=1,
                          num_heads=2, pool="mean", class_token=False)
  text = text_encoder.TextConfig(vocab_size=40, max_len=12, width=32, depth=1, num_heads=2)
  return patch_clip.PatchClipConfig(vision=vision, text=text, embed_dim=16)


def _clip_loss(model, batch, rng):
  image, text, scale = model(batch["image"], batch["tokens"])
  return losses.contrastive_loss(image, text, scale, batch["text_id"])


def _one_step(mesh, batch):
  # SGD: an update is the gradient, so float noise stays noise (Adam's first step would blow the
  # ~1e-9 gradient of the key biases, zero in exact arithmetic, up to a full +-lr step).
  tx, schedule = optim.make_optimizer(
      ml_collections.ConfigDict(dict(optimizer="sgd", lr=0.5, momentum=0.9)), 10)
  graphdef, state, shardings = train.create_train_state(
      lambda: patch_clip.PatchClip(_clip_config(), rngs=nnx.Rngs(0)), tx, mesh)
  step = jax.jit(train.make_train_step(graphdef, _clip_loss, tx, schedule, seed=0),
                 out_shardings=(shardings, None))
  from pathflip_jax import input_pipeline
  new_state, metrics = step(state, input_pipeline.to_global(batch, mesh))
  return new_state, metrics


def test_sharded_step_equals_single_device_step():
  """(data=2, fsdp=2, model=2) on 8 devices vs 1 device: same loss and same new parameters,
  and the big kernels really are split (each device holds a quarter of an mlp kernel)."""
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 255, (8, 32, 32, 3), dtype=np.uint8),
           "tokens": np.concatenate([np.full((8, 1), 2), rng.integers(5, 40, (8, 9)),
                                     np.zeros((8, 2), int)], axis=1).astype(np.int32),
           "text_id": np.array([0, 1, 2, 3, 0, 1, 4, 5], np.int32)}
  single, m1 = _one_step(sharding.make_mesh(devices=jax.devices()[:1]), batch)
  mesh8 = sharding.make_mesh(data=2, fsdp=2, model=2)
  sharded, m8 = _one_step(mesh8, batch)
  np.testing.assert_allclose(float(m8["loss"]), float(m1["loss"]), rtol=1e-5)
  np.testing.assert_allclose(float(m8["grad_norm"]), float(m1["grad_norm"]), rtol=1e-4)
  flat1 = dict(jax.tree_util.tree_leaves_with_path(single["params"]))
  for path, leaf in jax.tree_util.tree_leaves_with_path(sharded["params"]):
    # float32 sums in another order: an entry near 0 of a leaf whose entries reach ~8 (lr 0.5)
    # moves by a few 1e-6, so the absolute tolerance scales with the leaf's largest entry.
    expected = np.asarray(flat1[path])
    np.testing.assert_allclose(np.asarray(leaf), expected, rtol=2e-5,
                               atol=2e-6 * max(1.0, float(np.abs(expected).max())),
                               err_msg=optim.param_path(path))
  fc1 = sharded["params"]["vision"]["blocks"][0]["mlp"]["fc1"]["kernel"][...]
  assert fc1.sharding.spec == jax.sharding.PartitionSpec("fsdp", "model")
  assert fc1.addressable_shards[0].data.shape == (16, 64)       # [32, 128] over fsdp x model
  # Optimizer state (momentum) lives where its parameter lives.
  moments = [x for x in jax.tree.leaves(sharded["opt_state"]) if x.shape == fc1.shape]
  assert moments and all(x.sharding == fc1.sharding for x in moments)
  assert float(m8["loss"]) > 0 and np.isfinite(float(m8["param_norm"]))


def _params(workdir):
  return checkpointing.load_params(str(workdir))


def test_nan_stops_with_last_checkpoint_intact_and_resume_matches(tmp_path):
  """A NaN at step 7 stops the run (checkpoint 4 intact and restorable); running the same
  config again resumes from 4 and ends exactly where an uninterrupted run ends."""
  reference = train.train_and_evaluate(toy_task.get_config(), str(tmp_path / "ref"))
  with pytest.raises(train.NonFiniteLossError, match=r"step 7.*checkpoint is step 4"):
    train.train_and_evaluate(toy_task.get_config("nan_at_step=7"), str(tmp_path / "run"))
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["4"]
  restored = _params(tmp_path / "run")
  assert all(np.isfinite(v).all() for v in restored.values())

  resumed = train.train_and_evaluate(toy_task.get_config(), str(tmp_path / "run"))
  assert resumed["origin"].startswith("resumed from") and resumed["origin"].endswith("/4")
  assert reference["origin"] == "initialised from scratch"
  ref_params, run_params = _params(tmp_path / "ref"), _params(tmp_path / "run")
  assert ref_params.keys() == run_params.keys()
  for name in ref_params:
    np.testing.assert_array_equal(run_params[name], ref_params[name], err_msg=name)
  rows = metric_writer.read_metrics(str(tmp_path / "run"))
  ref_rows = metric_writer.read_metrics(str(tmp_path / "ref"))
  assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] == [4, 8, 12]
  assert [r["train/loss"] for r in rows] == [r["train/loss"] for r in ref_rows]
  config = json.loads((tmp_path / "run" / "config.json").read_text())
  assert config["stage"] == "tests.toy_task:ToyTask" and config["total_steps"] == 12


def test_restore_onto_a_different_mesh(tmp_path):
  """Saved from (data=2, fsdp=2, model=2) on 8 devices, restored onto 1 device (and back)."""
  tx, _ = optim.make_optimizer(ml_collections.ConfigDict(dict(lr=1e-2)), 10)
  factory = lambda: toy_task.ToyModel(nnx.Rngs(3))
  mesh8 = sharding.make_mesh(data=2, fsdp=2, model=2)
  _, state8, shardings8 = train.create_train_state(factory, tx, mesh8)
  kernel8 = state8["params"]["hidden"]["kernel"][...]
  assert kernel8.addressable_shards[0].data.shape == (8, 32)
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  ckpt.save(5, state8)
  ckpt.close()

  mesh1 = sharding.make_mesh(devices=jax.devices()[:1])
  _, fresh1, shardings1 = train.create_train_state(lambda: toy_task.ToyModel(nnx.Rngs(9)), tx,
                                                   mesh1)
  restored, meta = checkpointing.Checkpointer(str(tmp_path)).restore(
      checkpointing.abstract(fresh1, shardings1))
  assert meta["step"] == 5
  kernel1 = restored["params"]["hidden"]["kernel"][...]
  assert len(kernel1.sharding.device_set) == 1
  np.testing.assert_array_equal(np.asarray(kernel1), np.asarray(kernel8))
  back, _ = checkpointing.Checkpointer(str(tmp_path)).restore(
      checkpointing.abstract(state8, shardings8))
  assert back["params"]["hidden"]["kernel"][...].sharding == kernel8.sharding


def test_model_init_copies_matching_parameters(tmp_path):
  train.train_and_evaluate(toy_task.get_config("total_steps=4"), str(tmp_path / "a"))
  config = toy_task.get_config("total_steps=1")
  config.model_init = str(tmp_path / "a")
  config.model_init_include = ("^hidden/",)
  config.optim.lr = 1e-12            # one near-zero step: parameters stay what was loaded
  result = train.train_and_evaluate(config, str(tmp_path / "b"))
  assert "initialised 2 parameters from config.model_init" in result["origin"]
  a, b = _params(tmp_path / "a"), _params(tmp_path / "b")
  np.testing.assert_allclose(b["hidden/kernel"], a["hidden/kernel"], atol=1e-6)
  assert not np.allclose(b["out/kernel"], a["out/kernel"], atol=1e-3)

  config.model_init_include = ("^nothing/",)
  with pytest.raises(ValueError, match="matches no parameter"):
    train.train_and_evaluate(config, str(tmp_path / "c"))


def test_frozen_parameters_stay_put_through_save_and_resume(tmp_path):
  """optim.frozen: the optimizer state holds no slots for frozen parameters (optax.MaskedNode);
  checkpoints of such a state restore, and the frozen parameters never move."""
  config = toy_task.get_config("total_steps=4")
  config.optim.frozen = ("^hidden/",)
  train.train_and_evaluate(config, str(tmp_path))
  at4 = _params(tmp_path)
  config.total_steps = 8
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result["origin"].startswith("resumed from")
  at8 = _params(tmp_path)
  np.testing.assert_array_equal(at8["hidden/kernel"], at4["hidden/kernel"])
  assert not np.allclose(at8["out/kernel"], at4["out/kernel"])


def test_best_checkpoint_keeps_the_best_metric(tmp_path):
  tx, _ = optim.make_optimizer(ml_collections.ConfigDict(dict(lr=1e-2)), 10)
  _, state, _ = train.create_train_state(lambda: toy_task.ToyModel(nnx.Rngs(0)), tx,
                                         sharding.make_mesh())
  ckpt = checkpointing.Checkpointer(str(tmp_path), best_metric="probe/accuracy")
  for step, accuracy in [(1, 0.5), (2, 0.9), (3, 0.7)]:
    ckpt.save_best(step, state, {"probe/accuracy": accuracy})
  with pytest.raises(KeyError, match="best_metric"):
    ckpt.save_best(4, state, {"other": 1.0})
  ckpt.close()
  assert sorted(os.listdir(tmp_path / "best")) == ["2"]


def test_use_best_makes_the_best_checkpoint_the_runs_model(tmp_path, monkeypatch):
  from pathflip_jax import evaluate, evaluators
  monkeypatch.setitem(evaluators.TYPES, "toy", "tests.toy_task")
  config = toy_task.get_config("total_steps=12,checkpoint_every=4")
  config.evals = {"probe": dict(type="toy", every=4, scores=[0.2, 0.9, 0.5, 0.0])}
  config.checkpoint.best_metric = "probe/scripted"
  config.checkpoint.use_best = True
  result = train.train_and_evaluate(config, str(tmp_path))
  # Steps 4, 8 and 12 score 0.2, 0.9 and 0.5: step 8 is the run's model and its final evaluation.
  assert result["checkpoint_step"] == 8 and result["step"] == 12
  assert sorted(os.listdir(tmp_path / "best")) == ["8"]
  logged = {r["step"]: r for r in metric_writer.read_metrics(str(tmp_path))
            if "probe/weight_sum" in r}
  assert result["probe/weight_sum"] == pytest.approx(logged[8]["probe/weight_sum"])
  assert result["probe/weight_sum"] != pytest.approx(logged[12]["probe/weight_sum"])
  # Loading the workdir reads the best checkpoint; resuming it continues from the latest.
  best = checkpointing.load_params(str(tmp_path))
  assert checkpointing.model_checkpoint(str(tmp_path)) == str(tmp_path / "best" / "8")
  np.testing.assert_array_equal(best["out/kernel"],
                                checkpointing.load_params(str(tmp_path / "best"))["out/kernel"])
  assert not np.allclose(best["out/kernel"],
                         checkpointing.load_params(str(tmp_path / "checkpoints"))["out/kernel"])
  tx, _ = optim.make_optimizer(config.optim, 12)
  _, state, shardings = train.create_train_state(lambda: toy_task.ToyModel(nnx.Rngs(0)), tx,
                                                 sharding.make_mesh())
  _, meta = checkpointing.restore_from(str(tmp_path), checkpointing.abstract(state, shardings))
  assert meta["step"] == 12
  # evaluate: the best checkpoint by default, any kept step on request.
  config.evals.probe.scores = [0.0]
  default = evaluate.evaluate(config, str(tmp_path), output_dir=str(tmp_path / "e8"))
  assert default["probe"]["weight_sum"] == pytest.approx(logged[8]["probe/weight_sum"])
  with open(tmp_path / "e8" / "probe.json") as f:
    assert json.load(f)["step"] == 8
  latest = evaluate.evaluate(config, str(tmp_path), step=12, output_dir=str(tmp_path / "e12"))
  assert latest["probe"]["weight_sum"] == pytest.approx(logged[12]["probe/weight_sum"])


def test_best_metric_config_errors_name_the_key(tmp_path, monkeypatch):
  from pathflip_jax import evaluators
  config = toy_task.get_config("total_steps=2")
  config.checkpoint.use_best = True
  with pytest.raises(ValueError, match="config.checkpoint.best_metric"):
    train.train_and_evaluate(config, str(tmp_path / "a"))
  config.checkpoint.best_metric = "probe/scripted"
  with pytest.raises(ValueError, match="'probe' is not an evaluator of config.evals"):
    train.train_and_evaluate(config, str(tmp_path / "b"))
  # A metric its evaluator does not give is named at the first step that evaluator runs.
  monkeypatch.setitem(evaluators.TYPES, "toy", "tests.toy_task")
  config.evals = {"probe": dict(type="toy", every=2, scores=[0.5])}
  config.checkpoint.best_metric = "probe/scriptd"
  with pytest.raises(KeyError, match="best_metric='probe/scriptd'"):
    train.train_and_evaluate(config, str(tmp_path / "c"))


def test_unknown_stage_and_bad_batch_are_named():
  config = toy_task.get_config()
  config.stage = "nope"
  with pytest.raises(ValueError, match="config.stage='nope'"):
    train.train_and_evaluate(config, "/tmp/unused_workdir_for_error")
  config = toy_task.get_config("batch_size=6")      # 8 devices on the data axis
  with pytest.raises(ValueError, match=r"config.batch_size=6 must be divisible"):
    train.train_and_evaluate(config, "/tmp/unused_workdir_for_error")


def _children(pid: int) -> list[int]:
  """Direct child processes of ``pid`` (Linux /proc: every process whose PPid is ``pid``; not
  the per-thread ``children`` files, whose threads may exit while being read)."""
  pids = []
  for entry in os.listdir("/proc"):
    try:
      with open(f"/proc/{entry}/status") as f:
        ppid = next(line.split()[1] for line in f if line.startswith("PPid:"))
    except (FileNotFoundError, ProcessLookupError, NotADirectoryError, StopIteration):
      continue  # not a process, or one that exited meanwhile
    if ppid == str(pid):
      pids.append(int(entry))
  return pids


@pytest.mark.slow
def test_sigkill_then_rerun_matches_uninterrupted_run(tmp_path):
  """The real command, killed with SIGKILL after a checkpoint, run again: same final params
  as an uninterrupted run; grain worker processes (and their data position) included. The
  killed trainer's worker processes die with it (they used to outlive it forever; checked
  where /proc lists them, i.e. on Linux)."""
  env = dict(os.environ, PYTHONPATH=REPO)
  command = [sys.executable, "-m", "pathflip_jax.train", "--config",
             "tests/toy_config.py:total_steps=24,workers=1,sleep=0.01", "--workdir"]
  subprocess.run(command + [str(tmp_path / "ref")], cwd=REPO, env=env, check=True,
                 capture_output=True)
  run = tmp_path / "run"
  process = subprocess.Popen(command + [str(run)], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not (run / "checkpoints" / "8").is_dir() and time.time() < deadline:
    assert process.poll() is None, "the run ended before it could be killed"
    time.sleep(0.05)
  on_linux = sys.platform.startswith("linux")
  # grain's worker and multiprocessing's resource tracker.
  workers = _children(process.pid) if on_linux else []
  assert workers or not on_linux, "no grain worker process to check"
  process.send_signal(signal.SIGKILL)
  process.wait()
  deadline = time.time() + 30
  while any(os.path.exists(f"/proc/{pid}") for pid in workers) and time.time() < deadline:
    time.sleep(0.1)
  alive = [pid for pid in workers if os.path.exists(f"/proc/{pid}")]
  assert not alive, f"processes {alive} outlived the killed trainer"
  done = sorted(int(s) for s in os.listdir(run / "checkpoints") if s.isdigit())
  assert 24 not in done, "killed too late to test anything"
  out = subprocess.run(command + [str(run)], cwd=REPO, env=env, check=True,
                       capture_output=True, text=True)
  assert "resumed from" in out.stderr
  ref, resumed = _params(tmp_path / "ref"), _params(run)
  for name in ref:
    np.testing.assert_array_equal(resumed[name], ref[name], err_msg=name)


@pytest.mark.slow
def test_two_process_run_shares_one_workdir(tmp_path):
  """Multi-host JAX on one machine: two processes (2 CPU devices each, gloo collectives) train
  the toy stage into one workdir through jax.distributed; one of them writes the run's files,
  both their parts of each checkpoint, and the checkpoint restores in a single process."""
  import socket  # noqa: PLC0415
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, PYTHONPATH=REPO,
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  workdir = tmp_path / "w"
  command = [sys.executable, "-m", "pathflip_jax.train", "--config",
             "tests/toy_config.py:total_steps=8,batch_size=8", "--workdir", str(workdir),
             "--jax_distributed", "--coordinator_address", f"127.0.0.1:{port}",
             "--num_processes", "2", "--process_id"]
  processes = [subprocess.Popen(command + [str(i)], cwd=REPO, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for i in range(2)]
  outputs = [p.communicate(timeout=300) for p in processes]
  for i, (p, (_, err)) in enumerate(zip(processes, outputs)):
    assert p.returncode == 0, err[-3000:]
    assert f"process {i} of 2: 2 local of 4 devices" in err
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  steps = [r["step"] for r in rows if "train/loss" in r]
  assert steps == sorted(set(steps)) and steps[-1] == 8          # one writer, no duplicates
  assert json.load(open(workdir / "results.json"))["step"] == 8
  # Each process saved its own data-iterator position.
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(
      os.listdir(workdir / "checkpoints" / "8" / "data"))
  params = _params(workdir)
  assert params and all(np.isfinite(v).all() for v in params.values())


def test_bfloat16_on_several_cpu_devices_is_a_clear_error():
  """XLA:CPU aborts the whole process compiling a bfloat16 step sharded over several devices;
  the trainer says so before compiling anything."""
  config = config_args.load_config("configs/pathflip_demo.py:size=test")
  with config.unlocked():
    config.dtype = "bfloat16"
  if jax.default_backend() != "cpu" or jax.device_count() < 2:
    pytest.skip("needs several CPU devices (tests/conftest.py provides 8)")
  with pytest.raises(ValueError, match="config.dtype='bfloat16' on a mesh of 8 CPU devices"):
    train.train_and_evaluate(config, "/tmp/unused_workdir_for_error")


def test_loading_another_run_is_quiet(tmp_path, caplog):
  """Orbax's expected read-only notices (three per loaded run) are dropped; other warnings
  of the same logger still show."""
  train.train_and_evaluate(toy_task.get_config(), str(tmp_path / "run"))
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    assert _params(tmp_path / "run")
    logging.getLogger("absl").warning("a warning that matters")
  messages = [r.getMessage() for r in caplog.records]
  assert messages == ["a warning that matters"], messages


def test_command_line_overrides_any_config_field(tmp_path, capsys):
  """big_vision-style: --config FILE:arg, then --config.a.b=value for any field; a field the
  config lacks is an error that names it."""
  workdir = tmp_path / "w"
  train.main(["--config", "tests/toy_config.py:total_steps=12",
              "--config.total_steps=3", "--config.optim.lr=0.02", "--config.log_steps=3",
              "--workdir", str(workdir)])
  saved = json.load(open(workdir / "config.json"))
  assert saved["total_steps"] == 3 and saved["optim"]["lr"] == 0.02
  assert json.load(open(workdir / "results.json"))["step"] == 3
  capsys.readouterr()
  with pytest.raises(SystemExit, match="optim.lerning_rate"):
    train.main(["--config", "tests/toy_config.py", "--config.optim.lerning_rate=1",
                "--workdir", str(tmp_path / "x")])
  with pytest.raises(SystemExit, match="--workdir is required"):
    train.main(["--config", "tests/toy_config.py"])
  with pytest.raises(SystemExit) as exit_info:
    train.main(["--help"])
  assert exit_info.value.code == 0
  usage = capsys.readouterr().out
  assert usage.startswith("usage: python -m pathflip_jax.train --config FILE.py[:ARG]")
  assert "jax_distributed:" in usage and "--workdir:" in usage and "--config:" in usage


def test_demo_config_fields_follow_their_references():
  """A shorter run of the demo config: warmup cut to the run, the checkpoint interval and the
  final learning rate follow log_steps and lr."""
  config = config_args.load_config("configs/pathflip_demo.py",
                                   {"total_steps": 5, "log_steps": 2, "optim.lr": 1e-3})
  assert config.checkpoint.every == 2 and config.optim.end_lr == pytest.approx(5e-5)
  tx, schedule = optim.make_optimizer(config.optim, config.total_steps)
  assert float(schedule(5)) == pytest.approx(1e-3)     # warmup of 50 cut to the 5 steps
  with pytest.raises(KeyError, match="--config.optim.lrr"):
    config_args.load_config("configs/pathflip_demo.py", {"optim.lrr": 1.0})


def test_runs_of_an_earlier_layout_say_they_predate_it(tmp_path):
  """Checkpoints record their layout; one of an earlier layout (none recorded) is not loaded,
  neither as a model, nor to resume, nor through its run's config, and the error says why."""
  config = toy_task.get_config("total_steps=2,checkpoint_every=2")
  train.train_and_evaluate(config, str(tmp_path / "run"))
  meta_path = tmp_path / "run" / "checkpoints" / "2" / "meta" / "metadata"
  assert json.load(open(meta_path))["layout"] == checkpointing.LAYOUT
  assert checkpointing.run_config(str(tmp_path / "run"), config.stage).stage == config.stage
  meta = json.load(open(meta_path))
  del meta["layout"]                      # what git 0d3432e and earlier wrote
  meta_path.write_text(json.dumps(meta))
  with pytest.raises(checkpointing.LayoutError, match="predates the layout of 2026-12-07"):
    checkpointing.load_params(str(tmp_path / "run"))
  with pytest.raises(checkpointing.LayoutError, match="predates .*git commit 0d3432e"):
    checkpointing.run_config(str(tmp_path / "run"), config.stage, "--workdir W")
  with pytest.raises(checkpointing.LayoutError, match="predates"):
    train.train_and_evaluate(toy_task.get_config("total_steps=4,checkpoint_every=2"),
                             str(tmp_path / "run"))
