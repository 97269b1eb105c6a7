"""Linear and few-shot probes on frozen slide embeddings, and zero-shot AUROC from prompts.

``type="slide_linear_probe"`` (stage "align"). The label is a column of the slides' rows
(``label_key``, e.g. the demo's ``biomarker`` standing in for a mutation); slides without it are
left out. Three readings of the same frozen slide embeddings:

  linear probe   logistic regression (L2 chosen by cross-validation grouped by patient inside
                 ``train_split`` only), refit on all of it, scored on ``split``: accuracy,
                 balanced accuracy, AUC (binary: of P(positive); more classes: macro one-vs-rest)
  few-shot       the same probe on ``k`` random training slides per class (``shots``), averaged
                 over ``draws`` draws: balanced accuracy and AUC per k
  zero-shot      binary labels with ``prompts`` ({label value: phrases}): AUROC of
                 cos(slide, positive prompts) - cos(slide, negative prompts), no training (the
                 paper's CPTAC protocol)

Beside them: the same linear probe on the mean of each slide's patch features (what the slide
encoder adds; ``mean_patch_feature/...``), and the model minus it paired over the same slides
(``minus_mean_patch_feature/{auc,balanced_accuracy}``), the accuracy of always answering the
training split's most frequent value (``majority_class_accuracy``) and chance AUC 0.5. Every
metric but the counts, ``l2`` and chance has a 95% bootstrap interval over the evaluated slides
(``/ci_low``, ``/ci_high``; few-shot: of the mean over draws). Per slide (label, the probe's
logits, the baseline's, the zero-shot score) the rows go to
``<workdir>/eval/<name>_<split>_slides.jsonl``.

Config: ``label_key``, ``split`` ("test"), ``train_split`` ("train"), ``l2_grid``, ``folds``,
``shots`` ((1, 2, 4, 8)), ``draws`` (10), ``prompts``, ``batch_size``, ``seed``.
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from pathflip_jax.evaluators import common, linear_probe, metrics, stats


def _auc(labels: np.ndarray, logits: np.ndarray) -> float:
  logits = logits - logits.max(1, keepdims=True)
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  if probs.shape[1] == 2:
    return metrics.binary_auc(labels, probs[:, 1])
  return metrics.macro_auc(labels, probs)


class Evaluator(common.EvaluatorBase):

  def __init__(self, config: ml_collections.ConfigDict, task: Any, mesh: Mesh):
    super().__init__(config, task, mesh)
    self.train_split = config.get("train_split", "train")
    self.label_key = config.get("label_key", "")
    if not self.label_key:
      raise ValueError("config.evals.*.label_key is not set (the slide column to predict)")
    for key, split in (("split", self.split), ("train_split", self.train_split)):
      common.check_slide_split(task, split, key)
    self.rows = {s: [task.shards.rows[i] for i in task.splits[s].indices]
                 for s in (self.split, self.train_split)}
    values = sorted({str(r[self.label_key]) for rows in self.rows.values() for r in rows
                     if r.get(self.label_key) not in (None, "")})
    if len(values) < 2:
      raise ValueError(f"config.evals.*.label_key={self.label_key!r}: the slides of splits "
                       f"{self.train_split!r} and {self.split!r} have {len(values)} distinct "
                       f"values ({values}); a probe needs at least 2")
    self.values = values
    prompts = {str(k): list(v) for k, v in dict(config.get("prompts", None) or {}).items()}
    if prompts:
      if len(values) != 2 or sorted(prompts) != values:
        raise ValueError(f"config.evals.*.prompts: zero-shot AUROC needs a binary label with "
                         f"prompts for each of its values {values} (got keys {sorted(prompts)})")
      texts = [p for v in values for p in prompts[v]]
      self.prompt_value = np.array([i for i, v in enumerate(values) for _ in prompts[v]])
      self.prompt_tokens = task.tokenizer.encode_batch(texts, task.example_config.subcaption_len)
    else:
      self.prompt_tokens = None
    self.embed = common.SlideEmbeddings(task, mesh, config.get("batch_size", 8))
    # The baseline does not depend on the model: (its test logits, constants), at the first run.
    self._baseline: tuple[np.ndarray, dict[str, float]] | None = None

  def _labels(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(keep mask, label index, patient group) of the split's slides."""
    rows = self.rows[split]
    keep = np.array([r.get(self.label_key) not in (None, "") for r in rows])
    labels = np.array([self.values.index(str(r[self.label_key])) if k else -1
                       for r, k in zip(rows, keep)])
    groups = np.array([str(r.get("patient_id") or r["slide_id"]) for r in rows])
    return keep, labels, groups

  def _mean_patch_features(self, split: str) -> np.ndarray:
    out = []
    for example in self.task.eval_examples(split):
      valid = np.asarray(example["patch_valid"], bool)
      out.append(np.asarray(example["features"], np.float64)[valid].mean(0))
    return np.stack(out)

  def _fit(self, train_x, train_y, groups, test_x) -> tuple[np.ndarray, float]:
    """(test logits, chosen L2) of the probe fitted on the training slides."""
    logits_fn, l2 = linear_probe.fit_probe(
        train_x, train_y, groups, len(self.values),
        tuple(self.config.get("l2_grid", (1e-3, 1e-2, 1e-1, 1.0))), self.config.get("folds", 3))
    return logits_fn(test_x), l2

  def run(self, model: nnx.Module) -> dict[str, float]:
    train_keep, train_y, groups = self._labels(self.train_split)
    test_keep, test_y = self._labels(self.split)[:2]
    train_y, groups, test_y = train_y[train_keep], groups[train_keep], test_y[test_keep]
    if self._baseline is None:
      base_logits, _ = self._fit(self._mean_patch_features(self.train_split)[train_keep],
                                 train_y, groups,
                                 self._mean_patch_features(self.split)[test_keep])
      self._baseline = (base_logits, {"chance_auc": 0.5, "num_train": float(len(train_y)),
                                      "num_eval": float(len(test_y))})
    base_logits, constants = self._baseline
    # The majority value is the training split's: nothing is chosen on the evaluated slides.
    majority = int(np.bincount(train_y, minlength=len(self.values)).argmax())
    train_x = self.embed(model, self.train_split)["slide"][train_keep].astype(np.float64)
    test_out = self.embed(model, self.split)
    test_x = test_out["slide"][test_keep].astype(np.float64)
    logits, l2 = self._fit(train_x, train_y, groups, test_x)
    rng = np.random.default_rng(self.config.get("seed", 0))
    few_shot: dict[int, list[np.ndarray]] = {}
    for k in self.config.get("shots", (1, 2, 4, 8)):
      per_class = [np.nonzero(train_y == c)[0] for c in range(len(self.values))]
      if min(len(p) for p in per_class) < k:
        continue
      few_shot[k] = []
      for _ in range(int(self.config.get("draws", 10))):
        picked = np.concatenate([rng.choice(p, k, replace=False) for p in per_class])
        # Few slides: the L2 the full probe chose, no cross-validation (more folds than
        # slides skips it).
        logits_fn, _ = linear_probe.fit_probe(train_x[picked], train_y[picked],
                                              groups[picked], len(self.values),
                                              (l2,), folds=len(picked) + 1)
        few_shot[k].append(logits_fn(test_x))
    zero_shot = None
    if self.prompt_tokens is not None:
      prompt_te = self.embed.texts(model, self.prompt_tokens)
      value_ce = common.class_embeddings(prompt_te, self.prompt_value, 2)
      similarity = test_x @ value_ce.T
      zero_shot = similarity[:, 1] - similarity[:, 0]

    def metric(idx: np.ndarray) -> dict[str, float]:
      y = test_y[idx]
      predicted, base_predicted = logits[idx].argmax(1), base_logits[idx].argmax(1)
      out = {"accuracy": float(np.mean(predicted == y)),
             "balanced_accuracy": metrics.balanced_accuracy(y, predicted),
             "auc": _auc(y, logits[idx]),
             "mean_patch_feature/balanced_accuracy": metrics.balanced_accuracy(y, base_predicted),
             "mean_patch_feature/auc": _auc(y, base_logits[idx]),
             "majority_class_accuracy": float(np.mean(y == majority))}
      for key in ("auc", "balanced_accuracy"):
        out[f"minus_mean_patch_feature/{key}"] = out[key] - out[f"mean_patch_feature/{key}"]
      for k, draws in few_shot.items():
        out[f"few_shot/k{k}/balanced_accuracy"] = float(np.mean(
            [metrics.balanced_accuracy(y, d[idx].argmax(1)) for d in draws]))
        out[f"few_shot/k{k}/auc"] = float(np.mean([_auc(y, d[idx]) for d in draws]))
      if zero_shot is not None:
        out["zero_shot_auc"] = metrics.binary_auc(y, zero_shot[idx])
      return out

    result: dict[str, float] = {}
    stats.add_intervals(result, metric, len(test_y))
    result["l2"] = l2
    ids = [r["slide_id"] for r, k in zip(self.rows[self.split], test_keep) if k]
    self.write_rows([{"slide_id": sid, "label": int(test_y[i]),
                      "scores": [float(v) for v in logits[i]],
                      "mean_patch_feature_scores": [float(v) for v in base_logits[i]]}
                     | ({"zero_shot_score": float(zero_shot[i])} if zero_shot is not None else {})
                     for i, sid in enumerate(ids)])
    return {**result, **constants}
