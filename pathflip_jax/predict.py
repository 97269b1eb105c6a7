"""A trained run's models for inference: what ``evaluate``, ``infer``, the instruct stage (its
frozen align run) and the localization evaluator's reference load.

Each loader reads the run's ``config.json`` (``checkpointing.run_config``: it names the stage and
says when a run predates the current layout), rebuilds the stage's task from it and fills the
model with the checkpoint's parameters (``checkpointing.model_from_checkpoint``: the run's model,
its best checkpoint for a run trained with ``config.checkpoint.use_best``, or a given step).

  load_run(W)            (task, model) of any stage
  load_align(W)          (AlignTask, PathFlip): data, tokenizer and model of an align run
  load_patch_clip(W)     (PatchClip, tokenizer, text length): both towers of a patch_clip run
  load_image_encoder(W)  (VisionTransformer, PatchClipConfig, name): its image tower alone
"""

from __future__ import annotations

from typing import Any

import ml_collections
from flax import nnx

from pathflip_jax import checkpointing, storage, tasks, tokenizer as tokenizer_lib
from pathflip_jax.models import patch_clip, vit
from pathflip_jax.tasks import align, patch_clip as patch_clip_task


def load_run(workdir: str, step: int | None = None,
             config: ml_collections.ConfigDict | None = None, task: Any = None
             ) -> tuple[Any, nnx.Module]:
  """(task, model) of the run in ``workdir`` (or a checkpoint folder of it) at ``step`` (None:
  the run's model). ``config``: the run's own ``config.json`` when None (evaluating with other
  evaluators passes one); ``task``: built from the config when None."""
  if config is None:
    config = checkpointing.run_config(workdir, tuple(tasks.STAGES), f"--workdir {workdir}")
  if task is None:
    task = tasks.build(config, workdir)
  model = checkpointing.model_from_checkpoint(
      lambda: task.create_model(nnx.Rngs(config.seed)), workdir, step)
  return task, model


def load_align(workdir: str, features_dir: str = "", name: str = ""
               ) -> tuple[align.AlignTask, nnx.Module]:
  """The task (data, tokenizer, splits) and trained model of an align run. ``features_dir``
  replaces the run's (features moved since); ``name``: how the user gave the workdir, for the
  errors (e.g. "config.align_workdir=W")."""
  name = name or f"config.align_workdir={workdir}"
  config = checkpointing.run_config(workdir, "align", name)
  if features_dir:
    config.features_dir = features_dir
  if not storage.isdir(config.features_dir):
    raise FileNotFoundError(f"{storage.join(workdir, 'config.json')}: its features_dir="
                            f"{config.features_dir} does not exist (set config.features_dir to "
                            "where the features are now)")
  # The tokenizer the run trained with: its config's, or the one it trained into its workdir.
  if not config.get("tokenizer"):
    config.tokenizer = storage.join(workdir, "tokenizer.model")
    if not storage.exists(config.tokenizer):
      raise FileNotFoundError(f"{config.tokenizer} not found: the tokenizer of the align run "
                              f"{workdir} is missing")
  task = align.AlignTask(config, workdir)
  return task, checkpointing.model_from_checkpoint(lambda: task.create_model(nnx.Rngs(0)),
                                                   workdir)


def load_patch_clip(workdir: str, step: int | None = None
                    ) -> tuple[patch_clip.PatchClip, tokenizer_lib.Tokenizer, int]:
  """The whole trained model of a patch_clip run, both towers: (model, tokenizer, text length)."""
  config = checkpointing.run_config(workdir, "patch_clip")
  tokenizer = tokenizer_lib.Tokenizer(patch_clip_task.tokenizer_path(config, workdir))
  clip_config = patch_clip_task.model_config(config, tokenizer.num_embeddings, tokenizer.pad_id)
  model = checkpointing.model_from_checkpoint(
      lambda: patch_clip.PatchClip(clip_config, rngs=nnx.Rngs(0)), workdir, step)
  return model, tokenizer, int(config.text_len)


def load_image_encoder(workdir: str, step: int | None = None
                       ) -> tuple[vit.VisionTransformer, patch_clip.PatchClipConfig, str]:
  """The trained ViT of a patch_clip run (its latest checkpoint): (model, config, name).

  ``model`` outputs the pooled features the linear probe scored (before the projection into the
  joint space); normalise inputs with ``config.mean``/``config.std``.
  """
  config = checkpointing.run_config(workdir, "patch_clip")
  # The text side is not rebuilt.
  clip_config = patch_clip_task.model_config(config, vocab_size=1, pad_id=0)
  model = checkpointing.model_from_checkpoint(
      lambda: vit.VisionTransformer(clip_config.vision, rngs=nnx.Rngs(0)), workdir, step,
      prefix="vision/")
  return model, clip_config, f"patch_clip:{storage.basename(workdir)}"
