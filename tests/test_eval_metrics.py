"""Evaluation metrics against scikit-learn, and recall@k on hand-made rankings."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from flax import nnx
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


# --------------------------------------------------------------------------- intervals


def _within(result, key):
  """The interval of a result key is there and holds its value."""
  low, high = result[key + "/ci_low"], result[key + "/ci_high"]
  return low - 1e-12 <= result[key] <= high + 1e-12


@pytest.mark.parametrize("seed", range(4))
def test_froc_of_slide_sets_matches_the_detection_list(seed):
  from pathflip_jax.evaluators import localization
  rng = np.random.default_rng(seed)
  hits, false_positives, detections = [], [], []
  for s in range(6):
    # Scores on a coarse grid: ties between hits and false positives, within and across slides.
    lesions = int(rng.integers(0, 3))
    hit = rng.integers(0, 6, size=lesions) / 5.0
    fp = rng.integers(0, 6, size=int(rng.integers(0, 12))) / 5.0
    hits.append(hit)
    false_positives.append(fp)
    for l, score in enumerate(hit):
      # The lesion's best hit, a weaker repeat hit (ignored) and an ignored detection.
      detections += [(float(score), f"s{s}", l + 1), (float(score) - 0.3, f"s{s}", l + 1),
                     (float(rng.random()), f"s{s}", -1)]
    detections += [(float(v), f"s{s}", 0) for v in fp]
  froc = localization.Froc(hits, false_positives)
  num_lesions = sum(len(h) for h in hits)
  want = localization.froc_score(detections, num_lesions, 6)
  assert froc(np.arange(6)) == pytest.approx(want, abs=1e-12)
  # A multiset of slides is the same as a detection list with the repeated slides copied.
  idx = np.array([0, 0, 3, 5, 5, 5])
  copied = [(score, f"{slide}#{k}", lesion) for k, s in enumerate(idx)
            for score, slide, lesion in detections if slide == f"s{s}"]
  lesions = sum(len(hits[s]) for s in idx)
  want = localization.froc_score(copied, lesions, len(idx)) if lesions else float("nan")
  assert froc(idx) == pytest.approx(want, abs=1e-12, nan_ok=True)


def test_true_ranks_agree_with_recall_at_k():
  from pathflip_jax.evaluators import slide_retrieval
  rng = np.random.default_rng(0)
  similarity = np.round(rng.normal(size=(30, 30)), 1)   # ties
  ranks = slide_retrieval.true_ranks(similarity)
  recall = metrics.recall_at_k(similarity, np.eye(30, dtype=bool), ks=(1, 5))
  assert recall[1] == pytest.approx(np.mean(ranks <= 1))
  assert recall[5] == pytest.approx(np.mean(ranks <= 5))
  assert slide_retrieval.true_ranks(np.ones((3, 3))).tolist() == [3, 3, 3]


def test_classification_metrics_on_resamples():
  from pathflip_jax.evaluators import common, stats
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 3, size=40)
  scores = rng.normal(size=(40, 3)) + 2.0 * np.eye(3)[labels]
  metric = common.classification_metrics(labels, scores, "m/")
  everything = metric(np.arange(40))
  assert everything["m/balanced_accuracy"] == metrics.balanced_accuracy(labels,
                                                                        scores.argmax(1))
  assert everything["m/macro_auc"] == metrics.macro_auc(labels, scores)
  result = {}
  stats.add_intervals(result, metric, 40)
  for key in everything:
    assert _within(result, key), key
    assert result[key + "/ci_high"] - result[key + "/ci_low"] > 0.01


class _PatchModel(nnx.Module):
  """Patch "embeddings" that carry the class in pixel [0, 0, 0], and features = the pixels."""

  def encode_images(self, images):
    import jax
    import jax.numpy as jnp
    return jax.nn.one_hot(images[:, 0, 0, 0].astype(jnp.int32), 3)

  def encode_texts(self, tokens):
    import jax
    return jax.nn.one_hot(tokens[:, 1] - 10, 3)

  def image_features(self, images):
    import jax.numpy as jnp
    return images.reshape(images.shape[0], -1).astype(jnp.float32)


def _patch_task(tmp_path, rng):
  """A patch_clip-like task: 12 slides of 10 patches per split, 3 classes; a patch's class is in
  pixel [0, 0, 0], its colour says nothing."""
  import types

  from pathflip_jax.tasks import patch_clip
  splits, images = {}, {}
  for split in ("train", "val"):
    labels = rng.integers(0, 3, size=120).astype(np.int32)
    pixels = rng.integers(0, 255, size=(120, 4, 4, 3)).astype(np.uint8)
    pixels[:, 0, 0, 0] = labels
    slide_ids = np.repeat([f"{split}-{k}" for k in range(12)], 10)
    splits[split] = patch_clip.Split(indices=np.arange(120), text_ids=np.zeros(120, np.int32),
                                     labels=labels, slide_ids=slide_ids)
    images[split] = (pixels, labels)
  names = ["stroma", "tumour", "fat"]
  tokenizer = types.SimpleNamespace(
      encode_batch=lambda texts, n: np.array(
          [[2, 10 + names.index(t.split()[-1]), 1] + [0] * (n - 3) for t in texts], np.int32))
  return types.SimpleNamespace(class_names=names, tokenizer=tokenizer, splits=splits,
                               config=types.SimpleNamespace(text_len=6), workdir=str(tmp_path),
                               images=lambda split: images[split])


def test_patch_evaluators_resample_slides_and_write_rows(tmp_path):
  import ml_collections

  from pathflip_jax import sharding
  from pathflip_jax.evaluators import linear_probe, patch_zero_shot, stats
  task = _patch_task(tmp_path, np.random.default_rng(2))
  mesh = sharding.make_mesh()
  zero_shot = patch_zero_shot.Evaluator(ml_collections.ConfigDict(
      {"split": "val", "batch_size": 16, "prompts": {"fat": ["x fat"]}}), task, mesh)
  result = zero_shot.run(_PatchModel())
  assert result["accuracy"] == 1.0 and result["num_slides"] == 12
  for key in ("accuracy", "balanced_accuracy", "majority_class_accuracy"):
    assert _within(result, key), key
  # The majority class is the training split's, scored on val.
  train_labels = task.splits["train"].labels
  val_labels = task.splits["val"].labels
  majority = np.bincount(train_labels).argmax()
  assert result["majority_class_accuracy"] == pytest.approx(np.mean(val_labels == majority))
  rows = stats.read_slide_rows(str(tmp_path / "eval"), "patch_zero_shot", "val")
  assert len(rows) == 12 and rows[0]["slide_id"] == "val-0"
  assert rows[0]["labels"] == val_labels[:10].tolist() == rows[0]["predicted"]

  probe = linear_probe.Evaluator(ml_collections.ConfigDict(
      {"split": "val", "batch_size": 16, "l2_grid": (1e-3,), "folds": 2}), task, mesh)
  result = probe.run(_PatchModel())
  # The class is in one feature: the probe finds it, the colour means cannot.
  assert result["accuracy"] >= 0.9 and result["colour_mean_accuracy"] < 0.6
  assert result["minus_colour_mean/accuracy/ci_low"] > 0.2
  for key in ("accuracy", "balanced_accuracy", "colour_mean_accuracy",
              "colour_mean_balanced_accuracy", "minus_colour_mean/balanced_accuracy"):
    assert _within(result, key), key
  assert result["num_slides"] == 12 and result["num_eval"] == 120
  assert len(stats.read_slide_rows(str(tmp_path / "eval"), "patch_linear_probe", "val")) == 12
