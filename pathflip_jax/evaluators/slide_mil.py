"""A supervised reference for zero-shot diagnosis: attention-MIL on the frozen patch features.

``type="slide_mil"`` (stage "align"). A gated-attention multiple-instance classifier (Ilse et al.
2018: each patch embedded by a linear layer and ReLU, attention weights from
``w . (tanh(V h) * sigmoid(U h))`` softmaxed over the slide's patches, the weighted mean of the
embeddings classified linearly) is trained on the diagnosis labels of ``train_split``'s slides
(features standardised with that split's statistics) with Adam, full batch, a class-weighted
cross-entropy (so that its argmax aims at balanced accuracy), for ``steps`` steps from
``seed``, and scored on ``split``. It never sees the trained PathFLIP model: what zero-shot
diagnosis from text prompts would have to beat with labels and no text. Computed once per
evaluator (at its first run) and reused.

Metrics (each with its 95% bootstrap interval over the split's slides, ``/ci_low``,
``/ci_high``): balanced accuracy, macro one-vs-rest AUC, weighted F1, accuracy; beside them
``chance_balanced_accuracy``, ``num_slides`` and ``num_train``. Per slide (label, class
scores) the rows go to ``<workdir>/eval/<name>_<split>_slides.jsonl`` for
``pathflip_jax.compare``.

Config: ``split`` ("test"), ``train_split`` ("train"), ``hidden`` (64), ``attention`` (32),
``steps`` (300), ``lr`` (1e-3), ``weight_decay`` (1e-4), ``max_patches`` (2048: patches per
training slide, a fixed random subset beyond that), ``seed`` (0).
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from pathflip_jax.evaluators import common, stats


class GatedAttentionMIL(nnx.Module):
  """Gated attention pooling over a slide's patches, then a linear classifier."""

  def __init__(self, in_dim: int, hidden: int, attention: int, num_classes: int,
               rngs: nnx.Rngs):
    self.embed = nnx.Linear(in_dim, hidden, rngs=rngs)
    self.attention_v = nnx.Linear(hidden, attention, rngs=rngs)
    self.attention_u = nnx.Linear(hidden, attention, rngs=rngs)
    self.attention_w = nnx.Linear(attention, 1, rngs=rngs)
    self.classifier = nnx.Linear(hidden, num_classes, rngs=rngs)

  def attention(self, h_bnh: jax.Array, valid_bn: jax.Array) -> jax.Array:
    """Attention weights [b, n] over each slide's valid patches."""
    gate = jnp.tanh(self.attention_v(h_bnh)) * jax.nn.sigmoid(self.attention_u(h_bnh))
    logits = self.attention_w(gate)[..., 0]
    return jax.nn.softmax(jnp.where(valid_bn, logits, -jnp.inf), axis=-1)

  def __call__(self, x_bnd: jax.Array, valid_bn: jax.Array) -> jax.Array:
    h_bnh = jax.nn.relu(self.embed(x_bnd))
    pooled_bh = jnp.einsum("bn,bnh->bh", self.attention(h_bnh, valid_bn), h_bnh)
    return self.classifier(pooled_bh)


def pad_bags(bags: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """Slides of different patch counts -> (features [b, n_max, d], valid [b, n_max])."""
  longest = max(len(b) for b in bags)
  dim = bags[0].shape[1]
  x = np.zeros((len(bags), longest, dim), np.float32)
  valid = np.zeros((len(bags), longest), bool)
  for i, bag in enumerate(bags):
    x[i, :len(bag)], valid[i, :len(bag)] = bag, True
  return x, valid


def train_mil(bags: Sequence[np.ndarray], labels: np.ndarray, num_classes: int, *,
              hidden: int = 64, attention: int = 32, steps: int = 300, lr: float = 1e-3,
              weight_decay: float = 1e-4, seed: int = 0) -> GatedAttentionMIL:
  """A gated-attention MIL classifier fitted full-batch to (standardised) bags and labels with
  a class-weighted cross-entropy (classes weighted by inverse frequency)."""
  x, valid = pad_bags(bags)
  labels = np.asarray(labels, np.int32)
  counts = np.bincount(labels, minlength=num_classes).astype(np.float32)
  class_weight = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
  sample_weight = jnp.asarray(class_weight[labels] / class_weight[labels].sum())
  model = GatedAttentionMIL(x.shape[2], hidden, attention, num_classes, nnx.Rngs(seed))
  graphdef, params = nnx.split(model, nnx.Param)
  tx = optax.adamw(lr, weight_decay=weight_decay)
  x, valid, y = jnp.asarray(x), jnp.asarray(valid), jnp.asarray(labels)

  def loss_fn(p):
    logits = nnx.merge(graphdef, p)(x, valid)
    return jnp.sum(sample_weight * optax.softmax_cross_entropy_with_integer_labels(logits, y))

  def step(_, carry):
    p, state = carry
    updates, state = tx.update(jax.grad(loss_fn)(p), state, p)
    return optax.apply_updates(p, updates), state

  # Every step in one compiled loop: the steps are tiny, dispatching each would dominate.
  fit = jax.jit(lambda p, state: jax.lax.fori_loop(0, steps, step, (p, state)))
  params, _ = fit(params, tx.init(params))
  return nnx.merge(graphdef, params)


def predict_mil(model: GatedAttentionMIL, bags: Sequence[np.ndarray],
                batch_size: int = 64) -> np.ndarray:
  """Class logits [slides, classes] (slides batched with padding to the batch's longest)."""
  graphdef, params = nnx.split(model)
  apply = jax.jit(lambda p, x, valid: nnx.merge(graphdef, p)(x, valid))
  out = []
  for start in range(0, len(bags), batch_size):
    x, valid = pad_bags(bags[start:start + batch_size])
    out.append(np.asarray(apply(params, jnp.asarray(x), jnp.asarray(valid)), np.float64))
  return np.concatenate(out) if out else np.zeros((0, 0))


class Evaluator(common.EvaluatorBase):

  def __init__(self, config: ml_collections.ConfigDict, task: Any, mesh: Mesh):
    super().__init__(config, task, mesh)
    self.train_split = config.get("train_split", "train")
    if self.train_split == self.split:
      raise ValueError(f"config.evals.*.train_split={self.train_split!r} is the split scored")
    for key, split in (("split", self.split), ("train_split", self.train_split)):
      common.check_slide_split(task, split, key)
    self.options = {}
    for key, default in (("hidden", 64), ("attention", 32), ("steps", 300)):
      value = int(config.get(key, default))
      if value < 1:
        raise ValueError(f"config.evals.*.{key}={value}: expected >= 1")
      self.options[key] = value
    for key, default in (("lr", 1e-3), ("weight_decay", 1e-4)):
      value = float(config.get(key, default))
      if value < 0 or (key == "lr" and value == 0):
        raise ValueError(f"config.evals.*.{key}={value}: expected a positive number")
      self.options[key] = value
    self.options["seed"] = int(config.get("seed", 0))
    self.max_patches = int(config.get("max_patches", 2048))
    if self.max_patches < 1:
      raise ValueError(f"config.evals.*.max_patches={self.max_patches}: expected >= 1")
    # The reference does not depend on the trained model: computed at the first run only.
    self._result: tuple[dict[str, float], list[dict[str, Any]]] | None = None

  def _bags(self, split: str, subsample: bool) -> tuple[list[np.ndarray], np.ndarray, list[str]]:
    """(patch features per labelled slide, labels, slide ids) of a split."""
    source = self.task.source(split)
    rng = np.random.default_rng(self.options["seed"])
    bags, labels, ids = [], [], []
    for i, text in enumerate(self.task.splits[split].texts):
      if text.label < 0:
        continue
      features = np.asarray(source[i]["features"], np.float32)
      if subsample and len(features) > self.max_patches:
        features = features[np.sort(rng.choice(len(features), self.max_patches, replace=False))]
      bags.append(features)
      labels.append(text.label)
      ids.append(text.slide_id)
    return bags, np.array(labels, np.int64), ids

  def compute(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """(metrics, per-slide rows) of the MIL classifier on the split (computed once)."""
    if self._result is not None:
      return self._result
    train_bags, train_y, _ = self._bags(self.train_split, subsample=True)
    test_bags, test_y, test_ids = self._bags(self.split, subsample=False)
    if not len(train_y) or not len(test_y):
      raise ValueError(f"config.evals.*: slide_mil needs labelled slides in train_split="
                       f"{self.train_split!r} ({len(train_y)}) and split={self.split!r} "
                       f"({len(test_y)})")
    patches = np.concatenate(train_bags)
    mean, std = patches.mean(0), patches.std(0) + 1e-6
    num_classes = len(self.task.class_names)
    model = train_mil([(b - mean) / std for b in train_bags], train_y, num_classes,
                      **self.options)
    logits = predict_mil(model, [(b - mean) / std for b in test_bags])
    result: dict[str, float] = {}
    stats.add_intervals(result, common.classification_metrics(test_y, logits), len(test_y))
    result.update(chance_balanced_accuracy=1.0 / len(np.unique(test_y)),
                  num_slides=float(len(test_y)), num_train=float(len(train_y)))
    rows = [{"slide_id": sid, "label": int(test_y[i]), "scores": [float(v) for v in logits[i]]}
            for i, sid in enumerate(test_ids)]
    print(f"[{self.name}] attention-MIL on {len(train_y)} {self.train_split} slides: balanced "
          f"accuracy {result['balanced_accuracy']:.3f} on {len(test_y)} {self.split} slides",
          file=sys.stderr)
    self._result = (result, rows)
    return self._result

  def run(self, model: nnx.Module) -> dict[str, float]:
    del model  # the reference does not use the trained model
    result, rows = self.compute()
    self.write_rows(rows)
    return dict(result)
