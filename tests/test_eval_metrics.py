"""Evaluation metrics against scikit-learn, and recall@k on hand-made rankings."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from pathflip_jax.evaluators import metrics


@pytest.mark.parametrize("seed", range(8))
def test_classification_metrics_match_sklearn(seed):
  rng = np.random.default_rng(seed)
  n, num_classes = int(rng.integers(5, 60)), int(rng.integers(2, 6))
  labels = rng.integers(0, num_classes, size=n)
  # Predictions may include a class absent from the labels and miss present ones.
  predicted = np.where(rng.random(n) < 0.5, labels, rng.integers(0, num_classes + 1, size=n))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # sklearn warns about predicted classes absent from labels
    want_bacc = skm.balanced_accuracy_score(labels, predicted)
  assert metrics.balanced_accuracy(labels, predicted) == pytest.approx(want_bacc, abs=1e-12)
  want_f1 = skm.f1_score(labels, predicted, average="weighted", zero_division=0)
  assert metrics.weighted_f1(labels, predicted) == pytest.approx(want_f1, abs=1e-12)


def test_weighted_f1_edge_cases():
  # A class never predicted (F1 0) and a class predicted but absent (no weight).
  labels, predicted = np.array([0, 0, 1, 1, 2]), np.array([0, 3, 0, 1, 3])
  want = skm.f1_score(labels, predicted, average="weighted", zero_division=0)
  assert metrics.weighted_f1(labels, predicted) == pytest.approx(want, abs=1e-12)
  assert metrics.weighted_f1(labels, labels) == 1.0


@pytest.mark.parametrize("seed", range(8))
def test_binary_auc_matches_sklearn_with_ties(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(4, 80))
  labels = rng.integers(0, 2, size=n)
  labels[:2] = [0, 1]
  # Few distinct scores: many ties, within and across the classes.
  scores = rng.integers(0, 4, size=n).astype(np.float32) if seed % 2 else rng.normal(size=n)
  assert metrics.binary_auc(labels, scores) == pytest.approx(
      skm.roc_auc_score(labels, scores), abs=1e-12)
  assert metrics.binary_auc(labels.astype(bool), scores) == pytest.approx(
      skm.roc_auc_score(labels, scores), abs=1e-12)


def test_binary_auc_hand_cases():
  assert metrics.binary_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
  assert metrics.binary_auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
  assert metrics.binary_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
  assert math.isnan(metrics.binary_auc([1, 1, 1], [0.1, 0.2, 0.3]))


@pytest.mark.parametrize("seed", range(6))
def test_macro_auc_matches_sklearn_ovr(seed):
  rng = np.random.default_rng(seed)
  n, num_classes = int(rng.integers(20, 80)), int(rng.integers(3, 6))
  labels = rng.integers(0, num_classes, size=n)
  labels[:num_classes] = np.arange(num_classes)
  logits = rng.normal(size=(n, num_classes)) + 1.5 * np.eye(num_classes)[labels]
  if seed % 2:
    logits = np.round(logits)  # ties
  probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  want = skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro")
  assert metrics.macro_auc(labels, probs) == pytest.approx(want, abs=1e-12)

  # With classes missing from the labels: the mean over the present ones.
  present = np.arange(num_classes - 1)
  keep = np.isin(labels, present)
  want = np.mean([skm.roc_auc_score(labels[keep] == c, probs[keep, c]) for c in present])
  assert metrics.macro_auc(labels[keep], probs[keep]) == pytest.approx(want, abs=1e-12)


def test_macro_auc_needs_two_classes_and_valid_labels():
  assert math.isnan(metrics.macro_auc(np.array([1, 1]), np.zeros((2, 3))))
  with pytest.raises(ValueError, match="score columns"):
    metrics.macro_auc(np.array([0, 3]), np.zeros((2, 3)))


def test_balanced_accuracy_hand_case():
  # Class 0: 2/3 right, class 1: 1/1 right; plain accuracy would be 3/4.
  assert metrics.balanced_accuracy(np.array([0, 0, 0, 1]), np.array([0, 0, 1, 1])) == \
      pytest.approx((2 / 3 + 1) / 2)


def test_recall_at_k_hand_cases():
  similarity = np.array([
      [0.9, 0.8, 0.7, 0.1],   # positive first
      [0.9, 0.8, 0.7, 0.1],   # positive third
      [0.5, 0.5, 0.5, 0.5],   # all tied: pessimistic, the positive comes last
      [0.9, 0.8, 0.8, 0.1],   # positive tied with one negative for second place
  ])
  positive = np.zeros((4, 4), bool)
  positive[0, 0] = positive[1, 2] = positive[2, 1] = positive[3, 2] = True
  got = metrics.recall_at_k(similarity, positive, ks=(1, 2, 3, 4))
  assert got == {1: 0.25, 2: 0.25, 3: 0.75, 4: 1.0}


def test_recall_at_k_several_positives_and_empty_queries():
  similarity = np.array([[0.1, 0.9, 0.5], [0.3, 0.2, 0.1], [0.3, 0.2, 0.1]])
  positive = np.array([[True, False, True], [False, False, False], [False, True, True]])
  # Query 0: best positive (0.5) behind one negative -> rank 2; query 1 has no positive (left
  # out); query 2: best positive 0.2 behind one negative -> rank 2.
  assert metrics.recall_at_k(similarity, positive, ks=(1, 2)) == {1: 0.0, 2: 1.0}
  none = metrics.recall_at_k(similarity, np.zeros((3, 3), bool))
  assert all(math.isnan(v) for v in none.values())


def test_retrieval_metrics_directions_and_chance():
  similarity = np.array([[0.9, 0.1, 0.2], [0.8, 0.7, 0.0], [0.3, 0.75, 0.5]])
  positive = np.eye(3, dtype=bool)
  got = metrics.retrieval_metrics(similarity, positive, ks=(1, 2, 5))
  # Slide-to-text (rows): ranks 1, 2, 2. Text-to-slide (columns): ranks 1, 2, 1.
  assert got["slide_to_text_r@1"] == pytest.approx(1 / 3)
  assert got["slide_to_text_r@2"] == 1.0
  assert got["text_to_slide_r@1"] == pytest.approx(2 / 3)
  assert got["text_to_slide_r@2"] == 1.0
  assert got["chance_r@1"] == pytest.approx(1 / 3)
  assert got["chance_r@2"] == pytest.approx(2 / 3)
  assert got["chance_r@5"] == 1.0
  assert set(got) == {f"{d}_r@{k}" for d in ("slide_to_text", "text_to_slide", "chance")
                      for k in (1, 2, 5)}


def test_random_similarity_recall_is_near_chance():
  rng = np.random.default_rng(0)
  n = 400
  got = metrics.retrieval_metrics(rng.normal(size=(n, n)), np.eye(n, dtype=bool), ks=(10, 40))
  for k in (10, 40):
    for direction in ("slide_to_text", "text_to_slide"):
      assert got[f"{direction}_r@{k}"] == pytest.approx(got[f"chance_r@{k}"], abs=0.05)
