"""Finished-looking training workdirs for tests of what reads them (instruct, infer): config.json,
the stage's tokenizer and a checkpoint of the freshly initialised model, without training."""

from __future__ import annotations

from typing import Any

import ml_collections
from flax import nnx

from pathflip_jax import checkpointing, config_args, tasks, train


def save_untrained_run(config: ml_collections.ConfigDict, workdir: str, step: int = 1) -> Any:
  """Writes ``workdir`` as if ``config`` had trained to ``step``; returns the stage's task."""
  task = tasks.build(config, workdir)
  train.save_config(config, workdir)
  ckpt = checkpointing.Checkpointer(workdir)
  ckpt.save(step, {"params": nnx.state(task.create_model(nnx.Rngs(0)), nnx.Param)})
  ckpt.close()
  return task


def untrained_demo_runs(root, patches_dir, questions_csv) -> None:
  """``root/features`` (the tiny test encoder over ``patches_dir``), and untrained runs
  ``root/align`` and ``root/instruct`` (its decoder over the align run) of the demo configs."""
  from data_prep import extract_features  # pylint: disable=import-outside-toplevel
  extract_features.run(["--patches", str(patches_dir), "--output_dir", str(root / "features"),
                        "--config", "configs/extract_features.py:variant=vit_tiny_test,"
                        "num_workers=0,batch_size=16", "--progress_interval", "0"])
  config = config_args.load_config(
      f"configs/pathflip_demo.py:size=test,features_dir={root / 'features'}",
      {"input.worker_count": 0})
  align_dir = str(root / "align")
  save_untrained_run(config, align_dir)
  config = config_args.load_config(
      f"configs/pathflip_instruct_demo.py:size=test,align_workdir={align_dir},"
      f"questions={questions_csv},eval_split=")
  save_untrained_run(config, str(root / "instruct"))
