r"""The trainer: one entry point for every stage (``config.stage``).

  python -m pathflip_jax.train --config configs/pathflip_demo.py[:arg] [--config.a.b=value ...] \
      --workdir W

``--config`` is an ml_collections config file (``configs/``); ``--config.total_steps=5``,
``--config.optim.lr=3e-4`` and the like override single fields (``config_args``).

Reading order: mesh -> data -> model/optimizer -> sharding -> step -> checkpoint -> evaluators
-> loop. What a stage trains (its data, model and loss) comes from ``pathflip_jax/tasks``;
everything here is shared.

Writes into W (see WORKSPACE.md): ``config.json`` (the resolved config), ``checkpoints/<step>``
(Orbax: params, optimizer state, step, data-iterator position), ``best/<step>`` (optional),
``metrics.jsonl`` (train scalars every ``log_steps``, evaluator metrics), ``results.json`` (the
final evaluation) and the tokenizer a stage trained, if any. With ``config.checkpoint.use_best``
the run's model is the best checkpoint by ``config.checkpoint.best_metric`` (early stopping on a
validation metric): the final evaluation is of that checkpoint, ``results.json`` names its
``checkpoint_step``, and later stages, ``evaluate`` and ``infer`` load it.

Resume order: the latest checkpoint in W, else ``config.resume`` (another run's workdir), else
``config.model_init`` (parameters matching ``config.model_init_include`` copied from another
run), else scratch. Re-running the same command after a kill therefore continues where the last
checkpoint left off, with the same data order.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import flags
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pathflip_jax import (checkpointing, config_args, evaluators as evaluators_lib,
                          input_pipeline, metric_writer, multihost, optim,
                          progress as progress_lib, sharding, storage, tasks)

TrainState = dict[str, Any]   # {"params": nnx.State, "opt_state": optax state, "step": int32}


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or infinite; the run stopped without saving."""


# --------------------------------------------------------------------------- model and state


def create_train_state(model_factory: Callable[[], nnx.Module], tx: optax.GradientTransformation,
                       mesh: Mesh) -> tuple[nnx.GraphDef, TrainState, Any]:
  """(graphdef, state, state shardings) with every array created already sharded.

  The state is traced abstractly first (``abstract_train_state``: no memory), and the jitted
  initialisation writes each array directly in its layout.
  """
  graphdef, init, _, shardings = abstract_train_state(model_factory, tx, mesh)
  state = jax.jit(init, out_shardings=shardings)()
  return graphdef, state, shardings


def abstract_train_state(model_factory: Callable[[], nnx.Module],
                         tx: optax.GradientTransformation, mesh: Mesh
                         ) -> tuple[nnx.GraphDef, Callable[[], TrainState], TrainState, Any]:
  """(graphdef, init, abstract state, state shardings), allocating nothing.

  ``init()`` builds the state; the abstract state is its ``jax.eval_shape`` (ShapeDtypeStructs),
  whose shardings follow the parameters' logical axis names (optimizer moments inherit them,
  since optax builds them as trees of the same annotated variables). Benchmarks compile the step
  from these shapes alone (``benchmarks/train_step.py``).
  """
  def init() -> TrainState:
    graphdef, params, rest = nnx.split(model_factory(), nnx.Param, ...)
    if jax.tree.leaves(rest):
      raise ValueError("the model holds non-parameter state (e.g. nnx.Rngs or batch stats); "
                       "the trainer only carries nnx.Param variables")
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

  graphdef = nnx.graphdef(nnx.eval_shape(model_factory))
  abstract = jax.eval_shape(init)
  return graphdef, init, abstract, state_shardings(abstract, mesh)


def state_shardings(abstract_state: TrainState, mesh: Mesh) -> Any:
  """Shardings of a train state: annotated variables by their logical axes, the rest replicated."""
  specs = sharding.tree_shardings(abstract_state, mesh)
  return jax.tree.map(lambda s: s if isinstance(s, NamedSharding) else NamedSharding(mesh, P()),
                      specs, is_leaf=lambda x: isinstance(x, NamedSharding))


def make_train_step(graphdef: nnx.GraphDef, loss_fn: Callable, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, seed: int, accum_steps: int = 1,
                    nan_at_step: int = 0, trainable: Any = None
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """One optimizer (micro-)step: loss and grads, update, norms; returns the new state.

  ``trainable`` (a bool tree like the params, from ``optim.trainable_mask``) stops gradients at
  frozen parameters, so their backward pass is never computed (e.g. a locked text branch); the
  optimizer leaves them unchanged either way.
  """

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    step = state["step"]
    rng = jax.random.fold_in(jax.random.key(seed), step)

    def objective(params):
      if trainable is not None:
        params = jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params,
                              trainable)
      loss, metrics = loss_fn(nnx.merge(graphdef, params), batch, rng)
      if nan_at_step:  # a test hook: config.debug.nan_at_step
        loss = jnp.where(step + 1 == nan_at_step, jnp.nan, loss)
      return loss, metrics

    (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads),
                   param_norm=optax.global_norm(params), update_norm=optax.global_norm(updates),
                   lr=schedule(step // accum_steps))
    return {"params": params, "opt_state": opt_state, "step": step + 1}, metrics

  return train_step


def jit_train_step(train_step: Callable, shardings: Any) -> Callable:
  """The step as the trainer compiles it: the incoming state is donated (XLA writes the new
  parameters and optimizer state into its buffers, so one copy of them is alive, not two) and
  the new state keeps the state's shardings."""
  return jax.jit(train_step, donate_argnums=(0,), out_shardings=(shardings, None))


# --------------------------------------------------------------------------- resume


def restore_or_init(config: ml_collections.ConfigDict, ckpt: checkpointing.Checkpointer,
                    state: TrainState, shardings: Any, data_iterator: Any, task: Any = None
                    ) -> tuple[TrainState, str]:
  """Workdir checkpoint -> config.resume -> config.model_init -> the task's own
  ``initial_params(params)`` (e.g. align's text branch from a patch_clip run) -> scratch."""
  target = checkpointing.abstract(state, shardings)
  if ckpt.latest_step() is not None:
    restored, meta = ckpt.restore(target, data_iterator)
    return restored, f"resumed from {ckpt.workdir}/checkpoints/{meta['step']}"
  if config.get("resume"):
    restored, meta = checkpointing.restore_from(config.resume, target, data_iterator)
    data = "" if meta["data_restored"] else " (data order starts afresh: none saved there)"
    return restored, f"resumed from config.resume={config.resume} step {meta['step']}{data}"
  if config.get("model_init"):
    loaded = checkpointing.load_params(config.model_init)
    include = tuple(config.get("model_init_include", None) or (".*",))
    params, taken = checkpointing.partial_init(state["params"], loaded, include,
                                               source=config.model_init)
    return dict(state, params=params), (f"initialised {len(taken)} parameters from "
                                        f"config.model_init={config.model_init}")
  initial = getattr(task, "initial_params", None)
  result = initial(state["params"]) if initial is not None else None
  if result is not None:
    params, origin = result
    return dict(state, params=params), origin
  return state, "initialised from scratch"


# --------------------------------------------------------------------------- logging


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """W/config.json; a resumed run whose config differs says so (it still runs)."""
  path = storage.join(workdir, "config.json")
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  if storage.exists(path) and storage.read_text(path) != text:
    print(f"[train] note: {path} differs from this run's config; overwriting", file=sys.stderr)
  storage.write_text(path, text)


def _due(evaluators, step: int, log_steps: int, force: bool) -> list:
  """The evaluators that run at ``step`` (each every ``evaluator.every`` or ``log_steps``)."""
  return [e for e in evaluators if force or ((e.every or log_steps)
                                             and step % (e.every or log_steps) == 0)]


def _evaluate(evaluators, make_model: Callable[[], nnx.Module], step: int, total: int,
              log_steps: int, force: bool) -> dict[str, float]:
  """Runs the evaluators due at ``step``; the model is assembled only if one is due."""
  out = {}
  model = None
  for evaluator in _due(evaluators, step, log_steps, force):
    t0 = time.time()
    model = model or make_model()
    for key, value in evaluator.run(model).items():
      out[f"{evaluator.name}/{key}"] = float(value)
    # The log line leaves the intervals out (results.json and REPORT.md have them).
    if jax.process_index() == 0:
      print(f"[train] eval {evaluator.name} at step {step}/{total} ({time.time() - t0:.1f}s): "
            + ", ".join(f"{k.split('/', 1)[1]} {v:.4f}" for k, v in out.items()
                        if k.startswith(evaluator.name + "/") and "/ci_" not in k),
            file=sys.stderr, flush=True)
  return out


def evaluation_model(graphdef: nnx.GraphDef, params: Any, mesh: Mesh) -> nnx.Module:
  """The model for the evaluators. With several processes its parameters are replicated over
  the mesh: every process then holds them whole, and an evaluator's own computations (on the
  full split, which every process reads) give every process the same, fully addressable
  results."""
  if jax.process_count() > 1:
    params = jax.jit(lambda p: p, out_shardings=sharding.replicated(mesh))(params)
  return nnx.merge(graphdef, params)


# --------------------------------------------------------------------------- metrics on device


@jax.jit
def _accumulate(window: dict[str, jax.Array], metrics: dict[str, jax.Array], step: jax.Array
                ) -> dict[str, jax.Array]:
  """Adds one step's metrics to the running sums on device; ``first_bad`` keeps the first step
  whose loss was not finite (0: none). Nothing leaves the device until the trainer fetches it."""
  out = {k: window.get(k, jnp.zeros((), jnp.float32)) + v.astype(jnp.float32)
         for k, v in metrics.items()}
  out["count"] = window["count"] + 1
  finite = jnp.isfinite(metrics["loss"])
  out["first_bad"] = jnp.where((window["first_bad"] == 0) & ~finite, step, window["first_bad"])
  return out


def _empty_window() -> dict[str, np.ndarray]:
  # Host values (numpy), not device arrays: with several processes a jitted function takes
  # them as the same value on every process.
  return {"count": np.zeros((), np.float32), "first_bad": np.zeros((), np.int32)}


def _check_best_metric(config: ml_collections.ConfigDict) -> tuple[bool, str]:
  """Checks ``config.checkpoint.best_metric`` / ``use_best``; returns ``use_best`` and the
  evaluator that gives the metric ("" without one)."""
  best_metric = config.checkpoint.get("best_metric") or ""
  use_best = bool(config.checkpoint.get("use_best", False))
  if use_best and not best_metric:
    raise ValueError("config.checkpoint.use_best=True needs config.checkpoint.best_metric (the "
                     "evaluation metric that chooses the checkpoint)")
  evaluator = best_metric.split("/", 1)[0]
  if best_metric and evaluator not in (config.get("evals") or {}):
    raise ValueError(f"config.checkpoint.best_metric={best_metric!r}: {evaluator!r} is not an "
                     f"evaluator of config.evals ({sorted(config.get('evals') or {})}); expected "
                     "'<evaluator>/<metric>'")
  return use_best, evaluator


# --------------------------------------------------------------------------- the loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains ``config.stage`` in ``workdir`` (resuming if it holds a checkpoint); returns the
  final evaluation metrics (also in ``W/results.json``)."""
  workdir = storage.absolute(workdir)
  storage.check_reachable(workdir, "--workdir")
  storage.makedirs(workdir)
  # A multi-host run (jax.distributed initialised) shares one workdir: one process writes the
  # run's files, every process writes its part of each checkpoint (Orbax, grain).
  primary = jax.process_index() == 0
  if primary:
    save_config(config, workdir)
  total_steps = int(config.total_steps)
  accum = int(config.optim.get("grad_accum_steps", 1))
  micro_steps = total_steps * accum

  # Mesh.
  mesh = sharding.make_mesh(**dict(config.mesh))
  input_pipeline.check_batch_divides_mesh(config.batch_size, mesh)
  if (jax.default_backend() == "cpu" and mesh.size > 1
      and str(config.get("dtype", "float32")) == "bfloat16"):
    # Measured with jax 0.10.2: the process aborts in the compiler with no Python error.
    raise ValueError(f"config.dtype='bfloat16' on a mesh of {mesh.size} CPU devices aborts "
                     "XLA:CPU's compiler ('Invalid binary instruction opcode copy'); use "
                     "config.dtype='float32' on CPU (bfloat16 is for GPU/TPU, or one CPU device)")

  # Data.
  task = tasks.build(config, workdir)
  task.mesh = mesh   # losses that gather over the batch (shard_map) need it
  task.workdir = workdir   # evaluators write their per-slide rows under W/eval
  train_iter = input_pipeline.train_iterator(
      task.train_source(), global_batch_size=config.batch_size, seed=config.seed,
      transform=task.train_transform(), batch_fn=getattr(task, "collate", None),
      worker_count=config.input.worker_count,
      worker_buffer_size=config.input.worker_buffer_size)

  # Model and optimizer, created sharded.
  tx, schedule = optim.make_optimizer(config.optim, total_steps)
  model_factory = lambda: task.create_model(nnx.Rngs(config.seed))
  graphdef, state, shardings = create_train_state(model_factory, tx, mesh)
  print(f"[train] stage {config.stage} | mesh {dict(mesh.shape)} | "
        f"{optim.describe(state['params'], config.optim)}", file=sys.stderr)

  # Checkpoints and resume.
  use_best, best_evaluator = _check_best_metric(config)
  ckpt = checkpointing.Checkpointer(
      workdir, keep=config.checkpoint.keep, best_metric=config.checkpoint.best_metric,
      best_mode=config.checkpoint.best_mode, async_save=config.checkpoint.async_save)
  state, origin = restore_or_init(config, ckpt, state, shardings, train_iter, task)
  start = int(jax.device_get(state["step"]))
  print(f"[train] {origin}; step {start}/{micro_steps}", file=sys.stderr, flush=True)

  # The step.
  train_step = jit_train_step(
      make_train_step(graphdef, task.loss, tx, schedule, seed=config.seed, accum_steps=accum,
                      nan_at_step=config.debug.nan_at_step,
                      trainable=optim.trainable_mask_from_config(state["params"], config.optim)),
      shardings)

  evaluators = evaluators_lib.build(config.get("evals"), task, mesh)
  make_eval_model = lambda: evaluation_model(graphdef, state["params"], mesh)  # noqa: E731
  writer = metric_writer.MetricWriter(workdir, resume_step=start, enabled=primary)
  # The first step compiles: the rate (and ETA) is measured from it on.
  progress = progress_lib.Progress(micro_steps, "steps", "train", config.progress_seconds,
                                   start=start, skip_first=True)
  padded_axes = getattr(task, "padded_axes", {})
  window = _empty_window()
  last_loss: dict[str, float] = {}
  eval_metrics: dict[str, float] = {}
  checkpoint_step = micro_steps
  try:
    for step in range(start + 1, micro_steps + 1):
      # Every process pads to the same length (the longest bucket any picked for this step).
      local = input_pipeline.agree_padding(next(train_iter), padded_axes, "train_batch")
      state, metrics = train_step(state, input_pipeline.to_global(local, mesh))
      # Metrics stay on device (no host sync per step) until a log, checkpoint or evaluation
      # step fetches them; a non-finite loss is caught there, before anything is saved.
      window = _accumulate(window, metrics, np.int32(step))
      final = step == micro_steps
      log_now = step % config.log_steps == 0 or final
      save_now = step % config.checkpoint.every == 0 or final
      if log_now or save_now or _due(evaluators, step, config.log_steps, final):
        fetched = jax.device_get(window)
        if int(fetched["first_bad"]):
          ckpt.wait()
          bad = int(fetched["first_bad"])
          raise NonFiniteLossError(
              f"non-finite loss at step {bad}; stopped without saving. The last good "
              f"checkpoint is step {ckpt.latest_step()} in {workdir}/checkpoints (it "
              "restores); lower config.optim.lr, set config.optim.grad_clip_norm, or check "
              "the input data.")
        if log_now:
          count = float(fetched.pop("count"))
          fetched.pop("first_bad")
          means = {f"train/{k}": float(v) / count for k, v in fetched.items()}
          rate = progress.rate()
          means["train/steps_per_second"] = float("nan") if rate is None else rate
          writer.write(step, means)
          last_loss = {"loss": means["train/loss"]}
          window = _empty_window()
      progress.update(step, **last_loss)
      eval_metrics = _evaluate(evaluators, make_eval_model, step, micro_steps,
                               config.log_steps, final)
      if eval_metrics:
        writer.write(step, eval_metrics)
        # Only steps where the metric's evaluator ran (evaluators can have their own ``every``);
        # there save_best names a metric that evaluator does not give.
        if best_evaluator and any(k.startswith(best_evaluator + "/") for k in eval_metrics):
          ckpt.save_best(step, state, eval_metrics)
      if save_now:
        ckpt.save(step, state, train_iter, eval_metrics)
    final_done = start < micro_steps
    if use_best and ckpt.best_step() != micro_steps:
      # The run's model is the checkpoint its best evaluation chose: evaluate that one.
      state, meta = ckpt.restore_best(checkpointing.abstract(state, shardings))
      checkpoint_step, final_done = int(meta["step"]), False
      value = meta["metrics"][config.checkpoint.best_metric]
      if primary:
        print(f"[train] the run's model is its best checkpoint, step {checkpoint_step} "
              f"({config.checkpoint.best_metric} {value:.4f}); evaluating it",
              file=sys.stderr, flush=True)
    if not final_done:  # evaluate what the checkpoint holds
      eval_metrics = _evaluate(evaluators, make_eval_model, checkpoint_step, micro_steps,
                               config.log_steps, True)
  finally:
    ckpt.close()
    writer.close()
    close = getattr(train_iter, "close", None)
    if close is not None:
      close()
  results = {"step": micro_steps, "origin": origin, "checkpoint_step": checkpoint_step,
             **eval_metrics}
  if primary:
    storage.write_text(storage.join(workdir, "results.json"),
                       json.dumps(results, indent=1, sort_keys=True))
  multihost.barrier("results")
  return results


def _define_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_string("workdir", None, "the run's directory, or a URL (s3://, gs://); created; "
                      "a re-run resumes there", flag_values=flag_values)
  multihost.define_flags(flag_values)


def main(argv=None) -> None:
  config, args = config_args.parse_command_line(
      argv, "python -m pathflip_jax.train", __doc__.split("\n\n")[0], _define_flags)
  if not args.workdir:
    raise SystemExit("python -m pathflip_jax.train: --workdir is required")
  multihost.initialize(args, "train")
  from pathflip_jax import compilation_cache  # pylint: disable=import-outside-toplevel
  compilation_cache.enable()
  try:
    results = train_and_evaluate(config, args.workdir)
  except (NonFiniteLossError, FileNotFoundError, checkpointing.LayoutError,
          storage.StorageError) as e:
    # Input the run cannot use (the message names the file or config key), not a bug.
    raise SystemExit(f"[train] {e}") from None
  print(json.dumps(results, indent=1, sort_keys=True))


if __name__ == "__main__":
  from pathflip_jax import train
  train.main()
