"""Zero-shot patch classification from text prompts (no training on labels).

``type="patch_zero_shot"``. Each class is described by a few prompts (``prompts``: a dict class
name -> list of phrases, default: the class name); a class's text embedding is the normalised mean
of its prompts' embeddings, and a patch goes to the class whose embedding is nearest (cosine), as
in CLIP/CONCH prompt ensembling. Reports accuracy, balanced accuracy and the chance level
(1 / number of classes for balanced accuracy; for accuracy, always the training split's most
frequent class when the task has one, else the evaluated split's).

Accuracy, balanced accuracy and the majority-class accuracy have 95% bootstrap intervals
(``/ci_low``, ``/ci_high``) over *slides*: patches of one slide are resampled together (the
task's ``splits[split].slide_ids``; ``num_slides`` says how many), or over patches where the
task does not say which slide a patch comes from (then ``num_slides`` is absent). Per slide
(patch labels and predicted classes) the rows go to ``<workdir>/eval/<name>_<split>_slides.jsonl``
when the task has a workdir.

Config: ``split`` ("val"), ``every``, ``batch_size``, ``prompts``.
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from pathflip_jax.evaluators import common, metrics


class Evaluator(common.EvaluatorBase):

  default_split = "val"

  def __init__(self, config: ml_collections.ConfigDict, task: Any, mesh: Mesh):
    super().__init__(config, task, mesh)
    common.check_split(task, config, self.split, "split")
    texts, self.prompt_class = common.class_prompts(config, task.class_names)
    self.tokens = task.tokenizer.encode_batch(texts, task.config.text_len)
    batch_size = config.get("batch_size", 64)
    self.embed_images = common.BatchedApply(lambda m, x: m.encode_images(x), mesh, batch_size)
    self.embed_texts = common.BatchedApply(lambda m, t: m.encode_texts(t), mesh, batch_size)

  def run(self, model: nnx.Module) -> dict[str, float]:
    images, labels = self.task.images(self.split)
    prompt_emb = self.embed_texts(model, self.tokens)
    num_classes = len(self.task.class_names)
    class_emb = common.class_embeddings(prompt_emb, self.prompt_class, num_classes)
    predicted = (self.embed_images(model, images) @ class_emb.T).argmax(1)
    majority = common.patch_majority(self.task, labels, num_classes)
    result = common.patch_intervals(
        self.task, self.split, labels,
        lambda i: {"accuracy": float(np.mean(predicted[i] == labels[i])),
                   "balanced_accuracy": metrics.balanced_accuracy(labels[i], predicted[i]),
                   "majority_class_accuracy": float(np.mean(labels[i] == majority))})
    result["chance_balanced_accuracy"] = 1.0 / len(np.unique(labels))
    common.write_patch_rows(self, labels, {"predicted": predicted})
    return result
