"""Classification and retrieval metrics in plain numpy (no scikit-learn at run time).

Definitions follow scikit-learn's where it has one (the tests compare against it): balanced
accuracy over the classes present in the labels, support-weighted F1, ROC AUC with average ranks
for ties, one-vs-rest macro AUC. Retrieval recall breaks ties pessimistically, so a constant
similarity scores chance, not perfect recall.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def balanced_accuracy(labels: np.ndarray, predicted: np.ndarray) -> float:
  """Mean per-class recall over the classes present in ``labels``."""
  labels, predicted = np.asarray(labels), np.asarray(predicted)
  classes = np.unique(labels)
  return float(np.mean([np.mean(predicted[labels == c] == c) for c in classes]))


def weighted_f1(labels: np.ndarray, predicted: np.ndarray) -> float:
  """Per-class F1 averaged with weights = class support (sklearn ``average="weighted"``).

  A class with no true and no predicted sample scores 0 (``zero_division=0``); classes only
  predicted have no support and so no weight.
  """
  labels, predicted = np.asarray(labels), np.asarray(predicted)
  classes = np.unique(np.concatenate([labels, predicted]))
  true_c = labels[None, :] == classes[:, None]
  pred_c = predicted[None, :] == classes[:, None]
  tp_c = np.sum(true_c & pred_c, axis=1)
  # 2tp / (2tp + fp + fn) = 2tp / (true + predicted): equal to 2PR / (P + R) where defined.
  denom_c = true_c.sum(axis=1) + pred_c.sum(axis=1)
  f1_c = np.divide(2.0 * tp_c, denom_c, out=np.zeros(len(classes)), where=denom_c > 0)
  support_c = true_c.sum(axis=1)
  return float(np.sum(f1_c * support_c) / support_c.sum())


def _average_ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks of ``x``, tied values sharing the mean of their ranks."""
  _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
  last = np.cumsum(counts)
  return ((last - counts + 1 + last) / 2.0)[inverse.reshape(-1)]


def binary_auc(labels01: np.ndarray, scores: np.ndarray) -> float:
  """ROC AUC as the Mann-Whitney U statistic (ties count half); nan with one class only."""
  positive = np.asarray(labels01).astype(bool).reshape(-1)
  scores = np.asarray(scores, np.float64).reshape(-1)
  num_pos = int(positive.sum())
  num_neg = positive.size - num_pos
  if num_pos == 0 or num_neg == 0:
    return float("nan")
  rank_sum = _average_ranks(scores)[positive].sum()
  return float((rank_sum - num_pos * (num_pos + 1) / 2.0) / (num_pos * num_neg))


def macro_auc(labels: np.ndarray, scores_nc: np.ndarray) -> float:
  """One-vs-rest AUC (class c scored by column c) averaged over the classes in ``labels``.

  Classes absent from ``labels`` have no AUC and are skipped; nan with fewer than two present.
  """
  labels = np.asarray(labels)
  scores_nc = np.asarray(scores_nc)
  present = np.unique(labels)
  if present.size and (present.min() < 0 or present.max() >= scores_nc.shape[1]):
    raise ValueError(f"labels must index the {scores_nc.shape[1]} score columns, "
                     f"got classes {present.tolist()}")
  if present.size < 2:
    return float("nan")
  return float(np.mean([binary_auc(labels == c, scores_nc[:, c]) for c in present]))


def recall_at_k(similarity_qc: np.ndarray, positive_qc: np.ndarray,
                ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
  """Fraction of queries (rows) with a positive candidate among their top ``k``.

  Ties are broken pessimistically: the best positive ranks behind every negative scoring at
  least as high, so it counts at ``k`` only if fewer than ``k`` negatives do. Queries without any
  positive are left out (their recall is undefined); nan when no query has one.
  """
  similarity_qc = np.asarray(similarity_qc, np.float64)
  positive_qc = np.asarray(positive_qc, bool)
  has_positive_q = positive_qc.any(axis=1)
  best_positive_q = np.where(positive_qc, similarity_qc, -np.inf).max(axis=1)
  negatives_ahead_q = np.sum(~positive_qc & (similarity_qc >= best_positive_q[:, None]), axis=1)
  negatives_ahead_q = negatives_ahead_q[has_positive_q]
  if not negatives_ahead_q.size:
    return {k: float("nan") for k in ks}
  return {k: float(np.mean(negatives_ahead_q < k)) for k in ks}


def retrieval_metrics(similarity_sc: np.ndarray, positive_sc: np.ndarray,
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
  """Slide-to-text and text-to-slide recall@k of an ``s x c`` similarity (slides x texts).

  Keys: ``slide_to_text_r@k``, ``text_to_slide_r@k`` and ``chance_r@k`` (expected recall@k of a
  random ranking with one positive per query: ``min(1, k / candidates)``, counting the texts as
  candidates; the usual square case, one report per slide, makes both directions the same).
  """
  similarity_sc = np.asarray(similarity_sc)
  positive_sc = np.asarray(positive_sc, bool)
  num_texts = similarity_sc.shape[1]
  slide_to_text = recall_at_k(similarity_sc, positive_sc, ks)
  text_to_slide = recall_at_k(similarity_sc.T, positive_sc.T, ks)
  out = {}
  for k in ks:
    out[f"slide_to_text_r@{k}"] = slide_to_text[k]
    out[f"text_to_slide_r@{k}"] = text_to_slide[k]
    out[f"chance_r@{k}"] = min(1.0, k / num_texts) if num_texts else float("nan")
  return out
