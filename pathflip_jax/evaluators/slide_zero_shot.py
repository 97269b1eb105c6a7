"""Zero-shot slide classification from class prompts (stage "align"; no training on labels).

``type="slide_zero_shot"``. Each class is described by prompts (``prompts``: class name -> list of
phrases; default: the class name). Two scores of a slide for a class exist in PathFLIP:

  slide   cosine between the slide embedding and the class's mean prompt embedding (CLIP-style)
  region  mean over the class's prompts of cos(prompt, its text-conditioned region embedding):
          the prompt picks the regions it describes, as subcaptions do in training

``score`` ("slide", "region" or "both": their sum) chooses the prediction that the headline
metrics describe; the balanced accuracy of each score alone is reported too. Metrics: balanced
accuracy, weighted F1, macro one-vs-rest AUC, accuracy, with the chance level (1 / classes
present) and the majority-class rate beside them.

Config: ``split`` ("test"), ``every``, ``batch_size``, ``prompts``, ``score``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from pathflip_jax import input_pipeline
from pathflip_jax.evaluators import common, metrics

SCORES = ("slide", "region", "both")


class Evaluator(common.EvaluatorBase):

  def __init__(self, config: ml_collections.ConfigDict, task: Any, mesh: Mesh):
    super().__init__(config, task, mesh)
    self.score = config.get("score", "slide")
    if self.score not in SCORES:
      raise ValueError(f"config.evals.*.score={self.score!r}: expected one of {SCORES}")
    common.check_slide_split(task, self.split, "split")
    texts, self.prompt_class = common.class_prompts(config, task.class_names)
    self.tokens = task.tokenizer.encode_batch(texts, task.example_config.subcaption_len)
    self.embed = common.SlideEmbeddings(task, mesh, config.get("batch_size", 8))

    @jax.jit
    def region_scores(graphdef, state, prompts_te, regions_bme, valid_bm):
      model = nnx.merge(graphdef, state)
      text_bte = jnp.broadcast_to(prompts_te, (regions_bme.shape[0],) + prompts_te.shape)
      return model.region_scores(text_bte, regions_bme, valid_bm)

    self._region_scores = region_scores

  def class_scores(self, model: nnx.Module) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per-score [slides, classes] matrices and the slides' labels (-1: unlabelled)."""
    out = self.embed(model, self.split)
    prompt_te = self.embed.texts(model, self.tokens)
    num_classes = len(self.task.class_names)
    class_ce = common.class_embeddings(prompt_te, self.prompt_class, num_classes)
    slide_score = out["slide"] @ class_ce.T
    graphdef, state = nnx.split(model)
    per_prompt = []
    size = self.embed.batch_size
    for start in range(0, len(out["slide"]), size):
      regions = out["regions"][start:start + size]
      valid = out["region_valid"][start:start + size]
      count = len(regions)
      pad = size - count
      regions = np.concatenate([regions, np.repeat(regions[-1:], pad, axis=0)])
      valid = np.concatenate([valid, np.repeat(valid[-1:], pad, axis=0)])
      inputs = input_pipeline.to_global({"r": regions, "v": valid}, self.mesh)
      scores = self._region_scores(graphdef, state, prompt_te, inputs["r"], inputs["v"])
      per_prompt.append(np.asarray(jax.device_get(scores))[:count])
    per_prompt = np.concatenate(per_prompt)
    region_score = np.stack([per_prompt[:, self.prompt_class == c].mean(1)
                             for c in range(num_classes)], axis=1)
    return ({"slide": slide_score, "region": region_score, "both": slide_score + region_score},
            out["label"])

  def run(self, model: nnx.Module) -> dict[str, float]:
    scores, labels = self.class_scores(model)
    keep = labels >= 0
    labels = labels[keep]
    result = {}
    for name, matrix in scores.items():
      predicted = matrix[keep].argmax(1)
      result[f"{name}_score_balanced_accuracy"] = metrics.balanced_accuracy(labels, predicted)
    matrix = scores[self.score][keep]
    predicted = matrix.argmax(1)
    counts = np.bincount(labels, minlength=len(self.task.class_names))
    result.update({
        "balanced_accuracy": metrics.balanced_accuracy(labels, predicted),
        "weighted_f1": metrics.weighted_f1(labels, predicted),
        "macro_auc": metrics.macro_auc(labels, matrix),
        "accuracy": float((predicted == labels).mean()),
        "chance_balanced_accuracy": 1.0 / len(np.unique(labels)),
        "majority_class_accuracy": float(counts.max() / counts.sum()),
        "num_slides": float(len(labels)),
    })
    return result
