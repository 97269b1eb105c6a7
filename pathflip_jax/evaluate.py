r"""Evaluates a trained run: every evaluator its config lists, on a checkpoint of the run.

  python -m pathflip_jax.evaluate --config configs/<name>.py[:key=value,...] --workdir W \
      [--step S] [--only name,...] [--output_dir D]

Without ``--step`` it evaluates the run's model: its latest checkpoint, or the best one for a run
trained with ``config.checkpoint.use_best``.

The config is the one the run was trained with (its ``evals`` section chooses the evaluators by
``type``; add or change evaluators with config args). Writes ``D/<name>.json`` per evaluator
(its metrics, the checkpoint step, the workdir and the evaluator's config) and ``D/metrics.md``,
one Markdown table of every metric; ``D`` defaults to ``W/eval``. ``evaluate(config, workdir)``
does the same from Python.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import ml_collections
from flax import nnx

from pathflip_jax import (checkpointing, config_args, evaluators as evaluators_lib, report,
                          sharding, tasks)


def evaluate(config: ml_collections.ConfigDict, workdir: str, step: int | None = None,
             only: list[str] | None = None, output_dir: str = "") -> dict[str, dict[str, Any]]:
  """{evaluator name: metrics} of the run in ``workdir`` at ``step`` (None: the run's model,
  its latest checkpoint or, if it trained with ``config.checkpoint.use_best``, its best)."""
  workdir = os.path.abspath(workdir)
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise FileNotFoundError(f"{workdir}/checkpoints not found: --workdir {workdir} holds no "
                            "trained run (python -m pathflip_jax.train --config ... --workdir ...)")
  evals = ml_collections.ConfigDict(dict(config.get("evals") or {}))
  if only:
    unknown = sorted(set(only) - set(evals))
    if unknown:
      raise ValueError(f"--only names {unknown}, not evaluators of the config "
                       f"(config.evals: {sorted(evals)})")
    evals = ml_collections.ConfigDict({k: v for k, v in evals.items() if k in only})
  if not evals:
    raise ValueError("the config lists no evaluators (config.evals is empty)")
  output_dir = output_dir or os.path.join(workdir, "eval")
  os.makedirs(output_dir, exist_ok=True)

  mesh = sharding.make_mesh(**dict(config.mesh))
  task = tasks.build(config, workdir)
  task.mesh = mesh
  built = evaluators_lib.build(evals, task, mesh)
  # The run's model (its best checkpoint if it trained with config.checkpoint.use_best), or
  # any step kept in W/checkpoints.
  source = checkpointing.model_dir(workdir)
  steps = checkpointing.checkpoint_steps(source)
  if step is None:
    step = steps[-1]
  elif step not in steps:
    source = os.path.join(workdir, "checkpoints")
    kept = checkpointing.checkpoint_steps(source)
    if step not in kept:
      raise ValueError(f"--step {step}: {workdir} has checkpoints at steps {kept}")
  model = checkpointing.model_from_checkpoint(lambda: task.create_model(nnx.Rngs(config.seed)),
                                             source, step)
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
    with open(os.path.join(output_dir, f"{evaluator.name}.json"), "w") as f:
      json.dump(record, f, indent=1, sort_keys=True, default=str)
    print(f"[evaluate] {evaluator.name} ({seconds:.1f}s): "
          + ", ".join(f"{k} {v:.4f}" for k, v in values.items()), file=sys.stderr, flush=True)
  with open(os.path.join(output_dir, "metrics.md"), "w") as f:
    f.write(markdown_table(results, title=f"{workdir}, step {step}"))
  return results


def markdown_table(results: dict[str, dict[str, float]], title: str = "") -> str:
  """One table: evaluator | metric | value."""
  lines = [f"# Evaluation: {title}", ""] if title else []
  rows = [(name, key, float(value)) for name, values in results.items()
          for key, value in values.items()]
  return "\n".join(lines + report.markdown_table(["evaluator", "metric", "value"], rows, 4))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True,
                      help="configs/<name>.py[:key=value,...]: the config the run trained with")
  parser.add_argument("--workdir", required=True, help="the run's workdir")
  parser.add_argument("--step", type=int, default=None,
                      help="checkpoint step (default: the run's model: the latest checkpoint, or "
                           "the best one if it trained with checkpoint.use_best)")
  parser.add_argument("--only", default="", help="comma-separated evaluator names to run")
  parser.add_argument("--output_dir", default="", help="default: WORKDIR/eval")
  args = parser.parse_args(argv)
  from pathflip_jax import compilation_cache  # pylint: disable=import-outside-toplevel
  compilation_cache.enable()
  config = config_args.load_config(args.config)
  only = [x.strip() for x in args.only.split(",") if x.strip()] or None
  try:
    results = evaluate(config, args.workdir, args.step, only, args.output_dir)
  except (FileNotFoundError, ValueError, KeyError) as e:
    raise SystemExit(f"[evaluate] {e}") from None
  print(json.dumps(results, indent=1, sort_keys=True))


if __name__ == "__main__":
  main()
