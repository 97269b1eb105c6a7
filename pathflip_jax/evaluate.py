r"""Evaluates a trained run: every evaluator its config lists, on a checkpoint of the run.

  python -m pathflip_jax.evaluate --workdir W [--step S] [--only name,...] [--output_dir D] \
      [--config configs/<name>.py[:arg] [--config.evals.NAME.FIELD=value ...]]

Without ``--config`` the config is the one the run saved (``W/config.json``); its ``evals``
section chooses the evaluators by ``type``. With ``--config`` (the run's config file, with
overrides) evaluators can be added or changed. Without ``--step`` it evaluates the run's model:
its latest checkpoint, or the best one for a run trained with ``config.checkpoint.use_best``.

``--workdir`` may be a URL (``s3://``, ``gs://``); with ``--jax_distributed`` every process of a
multi-host job evaluates (process 0 writes). Writes ``D/<name>.json`` per evaluator (its
metrics, the checkpoint step, the workdir and the evaluator's config) and ``D/metrics.md``, one
Markdown table of every metric; ``D`` defaults to ``W/eval``. ``evaluate(config, workdir)``
does the same from Python.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import jax
import ml_collections
from absl import flags

from pathflip_jax import (checkpointing, config_args, evaluators as evaluators_lib, multihost,
                          predict, report, sharding, storage, tasks)


def evaluate(config: ml_collections.ConfigDict | None, workdir: str, step: int | None = None,
             only: list[str] | None = None, output_dir: str = "") -> dict[str, dict[str, Any]]:
  """{evaluator name: metrics} of the run in ``workdir`` at ``step`` (None: the run's model,
  its latest checkpoint or, if it trained with ``config.checkpoint.use_best``, its best).
  ``config`` None: the run's own (``W/config.json``)."""
  workdir = storage.absolute(workdir)
  storage.check_reachable(workdir, "--workdir", must_exist=True)
  if not storage.isdir(storage.join(workdir, "checkpoints")):
    raise FileNotFoundError(f"{workdir}/checkpoints not found: --workdir {workdir} holds no "
                            "trained run (python -m pathflip_jax.train --config ... --workdir ...)")
  if config is None:
    config = checkpointing.run_config(workdir, tuple(tasks.STAGES), f"--workdir {workdir}")
  evals = ml_collections.ConfigDict(dict(config.get("evals") or {}))
  if only:
    unknown = sorted(set(only) - set(evals))
    if unknown:
      raise ValueError(f"--only names {unknown}, not evaluators of the config "
                       f"(config.evals: {sorted(evals)})")
    evals = ml_collections.ConfigDict({k: v for k, v in evals.items() if k in only})
  if not evals:
    raise ValueError("the config lists no evaluators (config.evals is empty)")
  output_dir = output_dir or storage.join(workdir, "eval")
  storage.makedirs(output_dir)
  primary = jax.process_index() == 0

  mesh = sharding.make_mesh(**dict(config.mesh))
  task = tasks.build(config, workdir)
  task.mesh = mesh
  task.workdir = workdir   # evaluators write their per-slide rows under W/eval
  built = evaluators_lib.build(evals, task, mesh)
  # The run's model (its best checkpoint if it trained with config.checkpoint.use_best), or
  # any step kept in W/checkpoints.
  source = checkpointing.model_dir(workdir)
  steps = checkpointing.checkpoint_steps(source)
  if step is None:
    step = steps[-1]
  elif step not in steps:
    source = storage.join(workdir, "checkpoints")
    kept = checkpointing.checkpoint_steps(source)
    if step not in kept:
      raise ValueError(f"--step {step}: {workdir} has checkpoints at steps {kept}")
  _, model = predict.load_run(source, step, config, task)
  # Replicated over the mesh: every process of a multi-host evaluation holds the whole model
  # and evaluates the whole split, so each gets the same metrics (process 0 writes them).
  model = sharding.replicate_module(model, mesh)
  if primary:
    print(f"[evaluate] {source} step {step}: {len(built)} evaluators -> {output_dir}",
          file=sys.stderr, flush=True)
  results: dict[str, dict[str, Any]] = {}
  for evaluator in built:
    t0 = time.time()
    values = {k: float(v) for k, v in evaluator.run(model).items()}
    seconds = time.time() - t0
    results[evaluator.name] = values
    record = {"evaluator": evaluator.name, "type": evals[evaluator.name].type, "step": step,
              "checkpoint": source,
              "workdir": workdir, "seconds": round(seconds, 2), "metrics": values,
              "config": evals[evaluator.name].to_dict()}
    if primary:
      storage.write_text(storage.join(output_dir, f"{evaluator.name}.json"),
                         json.dumps(record, indent=1, sort_keys=True, default=str))
      print(f"[evaluate] {evaluator.name} ({seconds:.1f}s): "
            + ", ".join(f"{k} {v:.4f}" for k, v in values.items()), file=sys.stderr, flush=True)
  if primary:
    storage.write_text(storage.join(output_dir, "metrics.md"),
                       markdown_table(results, title=f"{workdir}, step {step}"))
  multihost.barrier("evaluate")
  return results


def markdown_table(results: dict[str, dict[str, float]], title: str = "") -> str:
  """One table: evaluator | metric | value."""
  lines = [f"# Evaluation: {title}", ""] if title else []
  rows = [(name, key, float(value)) for name, values in results.items()
          for key, value in values.items()]
  return "\n".join(lines + report.markdown_table(["evaluator", "metric", "value"], rows, 4))


def _define_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_string("workdir", None, "the run's workdir", flag_values=flag_values)
  flags.DEFINE_integer("step", None, "checkpoint step (default: the run's model: the latest "
                       "checkpoint, or the best one if it trained with checkpoint.use_best)",
                       flag_values=flag_values)
  flags.DEFINE_list("only", [], "evaluator names to run (default: all)", flag_values=flag_values)
  flags.DEFINE_string("output_dir", "", "default: WORKDIR/eval", flag_values=flag_values)
  multihost.define_flags(flag_values)


def main(argv=None) -> None:
  config, args = config_args.parse_command_line(
      argv, "python -m pathflip_jax.evaluate", __doc__.split("\n\n")[0], _define_flags,
      config_required=False)
  if not args.workdir:
    raise SystemExit("python -m pathflip_jax.evaluate: --workdir is required")
  multihost.initialize(args, "evaluate")
  from pathflip_jax import compilation_cache  # pylint: disable=import-outside-toplevel
  compilation_cache.enable()
  try:
    results = evaluate(config, args.workdir, args.step, args.only or None, args.output_dir)
  except (FileNotFoundError, ValueError, KeyError, storage.StorageError) as e:
    # A KeyError's str() quotes its message.
    raise SystemExit(f"[evaluate] {e.args[0] if isinstance(e, KeyError) else e}") from None
  print(json.dumps(results, indent=1, sort_keys=True))


if __name__ == "__main__":
  from pathflip_jax import evaluate as evaluate_module
  evaluate_module.main()
