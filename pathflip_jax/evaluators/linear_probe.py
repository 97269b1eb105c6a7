"""Linear probe of frozen patch features: multinomial logistic regression, train split -> val.

``type="patch_linear_probe"``. Features are the patch encoder's pooled output (what
``extract_features`` exports). The L2 strength is chosen by cross-validation grouped by slide
inside the training split only; the probe is then refit on the whole training split and scored
on ``split``. The same probe on each patch's mean RGB (the colour-mean baseline) and the majority
class rate (the training split's most frequent class) are reported beside it, so the number
can be judged against what colour alone gives; ``minus_colour_mean/accuracy`` and
``minus_colour_mean/balanced_accuracy`` are the probe minus the colour-mean probe, paired over
the same patches. Every metric but the counts and ``l2`` has a 95% bootstrap interval
(``/ci_low``, ``/ci_high``) over the split's *slides*, each slide's patches resampled together
(``num_slides``), or over patches when the task does not say which slide a patch comes from.
Per slide (patch labels and both probes' predictions) the rows go to
``<workdir>/eval/<name>_<split>_slides.jsonl`` when the task has a workdir.

Config: ``split`` ("val"), ``train_split`` ("train"), ``every`` (0: the trainer's log_steps),
``batch_size``, ``l2_grid``, ``folds``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import ml_collections
import numpy as np
import scipy.optimize
from flax import nnx
from jax.sharding import Mesh

from pathflip_jax.evaluators import common, metrics


def fit_logistic_regression(x: np.ndarray, y: np.ndarray, num_classes: int, l2: float,
                            max_iter: int = 500) -> tuple[np.ndarray, np.ndarray]:
  """Weights [D, C] and bias [C] minimising mean cross-entropy + l2/2 * |W|^2 (L-BFGS)."""
  n, d = x.shape
  onehot = np.eye(num_classes)[y]

  def objective(theta):
    w, b = theta[:d * num_classes].reshape(d, num_classes), theta[d * num_classes:]
    logits = x @ w + b
    logits -= logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    loss = -(onehot * log_p).sum() / n + 0.5 * l2 * (w * w).sum()
    grad_logits = (np.exp(log_p) - onehot) / n
    grad_w = x.T @ grad_logits + l2 * w
    return loss, np.concatenate([grad_w.ravel(), grad_logits.sum(axis=0)])

  theta0 = np.zeros(d * num_classes + num_classes)
  result = scipy.optimize.minimize(objective, theta0, jac=True, method="L-BFGS-B",
                                   options={"maxiter": max_iter})
  theta = result.x
  return theta[:d * num_classes].reshape(d, num_classes), theta[d * num_classes:]


def fit_probe(train_x: np.ndarray, train_y: np.ndarray, train_groups: np.ndarray,
              num_classes: int, l2_grid: Sequence[float] = (1e-3, 1e-2, 1e-1), folds: int = 3
              ) -> tuple[Callable[[np.ndarray], np.ndarray], float]:
  """Standardises, chooses L2 by cross-validation grouped by ``train_groups`` (inside the
  training data only), refits on all of it; returns (x -> logits [n, C], the chosen L2)."""
  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  train_z = (train_x - mean) / std
  groups = np.unique(train_groups)
  fold_of = {g: i % folds for i, g in enumerate(groups)}
  fold = np.array([fold_of[g] for g in train_groups])
  best_l2, best_score = l2_grid[0], -1.0
  if len(groups) >= folds:
    for l2 in l2_grid:
      hits = 0
      for k in range(folds):
        held = fold == k
        w, b = fit_logistic_regression(train_z[~held], train_y[~held], num_classes, l2)
        hits += int(((train_z[held] @ w + b).argmax(1) == train_y[held]).sum())
      if hits / len(train_y) > best_score:
        best_l2, best_score = l2, hits / len(train_y)
  w, b = fit_logistic_regression(train_z, train_y, num_classes, best_l2)
  return (lambda x: ((x - mean) / std) @ w + b), float(best_l2)


def probe(train_x: np.ndarray, train_y: np.ndarray, train_groups: np.ndarray,
          test_x: np.ndarray, test_y: np.ndarray, num_classes: int,
          l2_grid: Sequence[float] = (1e-3, 1e-2, 1e-1), folds: int = 3
          ) -> dict[str, float]:
  """Standardise, choose L2 by grouped CV on train, refit, score test (accuracy, balanced)."""
  logits_fn, l2 = fit_probe(train_x, train_y, train_groups, num_classes, l2_grid, folds)
  predicted = logits_fn(test_x).argmax(1)
  return {"accuracy": float((predicted == test_y).mean()),
          "balanced_accuracy": metrics.balanced_accuracy(test_y, predicted), "l2": l2}


class Evaluator(common.EvaluatorBase):
  """Linear probe of ``task.images(split)`` features against the patches' tissue labels."""

  default_split = "val"

  def __init__(self, config: ml_collections.ConfigDict, task: Any, mesh: Mesh):
    super().__init__(config, task, mesh)
    self.train_split = config.get("train_split", "train")
    self.embed = common.BatchedApply(lambda model, x: model.image_features(x), mesh,
                                     config.get("batch_size", 64))
    # The colour-mean probe does not depend on the model: its predictions, at the first run.
    self._baseline: np.ndarray | None = None
    common.check_split(task, config, self.split, "split")
    common.check_split(task, config, self.train_split, "train_split")

  def _predict(self, train_x, test_x) -> tuple[np.ndarray, float]:
    """(predicted classes of the evaluated patches, chosen L2) of the probe."""
    train_y = self.task.images(self.train_split)[1]
    groups = self.task.splits[self.train_split].slide_ids
    logits_fn, l2 = fit_probe(train_x, train_y, groups, len(self.task.class_names),
                              tuple(self.config.get("l2_grid", (1e-3, 1e-2, 1e-1))),
                              self.config.get("folds", 3))
    return logits_fn(test_x).argmax(1), l2

  def run(self, model: nnx.Module) -> dict[str, float]:
    train_images, train_y = self.task.images(self.train_split)
    test_images, test_y = self.task.images(self.split)
    num_classes = len(self.task.class_names)
    if self._baseline is None:
      colour = lambda images: images.reshape(len(images), -1, 3).mean(1).astype(np.float64)
      self._baseline = self._predict(colour(train_images), colour(test_images))[0]
    colour_predicted = self._baseline
    train_x = self.embed(model, train_images).astype(np.float64)
    test_x = self.embed(model, test_images).astype(np.float64)
    predicted, l2 = self._predict(train_x, test_x)
    majority = int(np.bincount(train_y, minlength=num_classes).argmax())

    def metric(i: np.ndarray) -> dict[str, float]:
      y = test_y[i]
      out = {"accuracy": float(np.mean(predicted[i] == y)),
             "balanced_accuracy": metrics.balanced_accuracy(y, predicted[i]),
             "colour_mean_accuracy": float(np.mean(colour_predicted[i] == y)),
             "colour_mean_balanced_accuracy": metrics.balanced_accuracy(y, colour_predicted[i]),
             "majority_class_accuracy": float(np.mean(y == majority))}
      for key in ("accuracy", "balanced_accuracy"):
        out[f"minus_colour_mean/{key}"] = out[key] - out[f"colour_mean_{key}"]
      return out

    result = common.patch_intervals(self.task, self.split, test_y, metric)
    common.write_patch_rows(self, test_y, {"predicted": predicted,
                                           "colour_mean_predicted": colour_predicted})
    return {**result, "l2": l2, "num_train": float(len(train_images)),
            "num_eval": float(len(test_images))}
