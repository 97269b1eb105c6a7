"""Zero-shot slide classification from class prompts (stage "align"; no training on labels).

``type="slide_zero_shot"``. Each class is described by prompts (``prompts``: class name -> list of
phrases; default: the class name). Two scores of a slide for a class exist in PathFLIP:

  slide   cosine between the slide embedding and the class's mean prompt embedding (CLIP-style)
  region  mean over the class's prompts of cos(prompt, its text-conditioned region embedding):
          the prompt picks the regions it describes, as subcaptions do in training

``score`` ("slide", "region" or "both": their sum) chooses the prediction that the headline
metrics describe; the balanced accuracy of each score alone is reported too
(``<score>_score_balanced_accuracy``). Metrics: balanced accuracy, weighted F1, macro
one-vs-rest AUC, accuracy, each with its 95% bootstrap interval over the split's slides
(``<metric>/ci_low``, ``<metric>/ci_high``; ``stats``). Beside them:

  chance_balanced_accuracy          1 / classes present (a constant)
  majority_class_accuracy           always the training split's most frequent class
  minus_majority/accuracy           the model's accuracy minus it, paired over the same slides
  minus_chance/balanced_accuracy    the model's balanced accuracy minus chance
  reference/<metric>                with ``reference`` (a patch_clip workdir): the patch
                                    encoder's own text alignment, each patch feature projected
                                    into its joint space, mean-pooled per slide and scored by
                                    cosine with the class prompts embedded by its text tower
  minus_reference/<metric>          the model minus the reference (balanced accuracy, macro
                                    AUC), paired over the same slides

Per slide (label, class scores of the headline score and of the reference) the rows go to
``<workdir>/eval/<name>_<split>_slides.jsonl`` for ``pathflip_jax.compare``.

Config: ``split`` ("test"), ``every``, ``batch_size``, ``prompts``, ``score`` ("slide"),
``reference`` ("": none).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from pathflip_jax import input_pipeline, sharding
from pathflip_jax.evaluators import common, metrics, stats

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
    self.texts = texts
    self.slide_ids = common.slide_ids(task, self.split)
    self.majority = common.majority_class(task, "train")
    self.reference = config.get("reference", "")
    # The reference does not train: its class scores are computed once, at the first run.
    self._reference_scores: np.ndarray | None = None

    @functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))
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
      inputs = input_pipeline.full_batch_to_global({"r": regions, "v": valid}, self.mesh)
      scores = self._region_scores(graphdef, state, prompt_te, inputs["r"], inputs["v"])
      per_prompt.append(np.asarray(jax.device_get(scores))[:count])
    per_prompt = np.concatenate(per_prompt)
    region_score = np.stack([per_prompt[:, self.prompt_class == c].mean(1)
                             for c in range(num_classes)], axis=1)
    return ({"slide": slide_score, "region": region_score, "both": slide_score + region_score},
            out["label"])

  def reference_scores(self) -> np.ndarray:
    """[slides, classes] cosines of the reference's mean-pooled patch embeddings with its own
    class prompt embeddings (computed once)."""
    if self._reference_scores is None:
      reference = common.PatchClipReference(self.reference)
      num_classes = len(self.task.class_names)
      class_ce = reference.class_embeddings(self.texts, self.prompt_class, num_classes)
      source = self.task.source(self.split)
      slides = [reference.slide_embedding(source[i]["features"], self.slide_ids[i])
                for i in range(len(source))]
      self._reference_scores = np.stack(slides) @ class_ce.T
    return self._reference_scores

  def run(self, model: nnx.Module) -> dict[str, float]:
    scores, labels = self.class_scores(model)
    keep = labels >= 0
    labels = labels[keep]
    scores = {name: matrix[keep] for name, matrix in scores.items()}
    headline = common.classification_metrics(labels, scores[self.score])
    predicted = {name: matrix.argmax(1) for name, matrix in scores.items()}
    majority = self.majority if self.majority is not None else -1
    chance = 1.0 / len(np.unique(labels)) if len(labels) else float("nan")
    reference_metrics, reference = None, None
    if self.reference:
      reference = self.reference_scores()[keep]
      reference_metrics = common.classification_metrics(labels, reference, "reference/")

    def metric(idx: np.ndarray) -> dict[str, float]:
      out = {f"{name}_score_balanced_accuracy":
             metrics.balanced_accuracy(labels[idx], predicted[name][idx]) for name in scores}
      out.update(headline(idx))
      majority_accuracy = float(np.mean(labels[idx] == majority))
      out["majority_class_accuracy"] = majority_accuracy
      out["minus_majority/accuracy"] = out["accuracy"] - majority_accuracy
      out["minus_chance/balanced_accuracy"] = out["balanced_accuracy"] - chance
      if reference_metrics is not None:
        out.update(reference_metrics(idx))
        for key in ("balanced_accuracy", "macro_auc"):
          out[f"minus_reference/{key}"] = out[key] - out[f"reference/{key}"]
      return out

    result: dict[str, float] = {}
    stats.add_intervals(result, metric, len(labels))
    result["chance_balanced_accuracy"] = chance
    result["num_slides"] = float(len(labels))
    ids = [s for s, k in zip(self.slide_ids, keep) if k]
    self.write_rows([{"slide_id": sid, "label": int(labels[i]),
                      "scores": [float(v) for v in scores[self.score][i]]}
                     | ({"reference_scores": [float(v) for v in reference[i]]}
                        if reference is not None else {})
                     for i, sid in enumerate(ids)])
    return result
