"""Shared pieces of evaluators: their common settings, batched and sharded application of a model
method, slide embeddings of a split, class prompts, per-slide rows for comparisons across runs,
and the patch encoder's own text alignment (the ``reference`` baseline)."""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from pathflip_jax import input_pipeline, sharding, storage
from pathflip_jax.evaluators import metrics, stats


class EvaluatorBase:
  """What every evaluator keeps of its config: the config, the task, ``every`` (run every so
  many steps; 0: every ``log_steps``) and ``split`` (``default_split`` when the config has none).
  Subclasses are the ``Evaluator`` of their module and add their own fields."""

  default_split = "test"

  def __init__(self, config: ml_collections.ConfigDict, task: Any, mesh: Mesh):
    self.config, self.task, self.mesh = config, task, mesh
    self.every = config.get("every", 0)
    self.split = config.get("split", self.default_split)
    # evaluators.build names each evaluator after its config entry; this default (its type)
    # serves evaluators built directly (tests, notebooks).
    from pathflip_jax import evaluators  # pylint: disable=import-outside-toplevel
    module = type(self).__module__
    self.name = config.get("type", None) or next(
        (kind for kind, path in evaluators.TYPES.items() if path == module),
        module.rsplit(".", 1)[-1])

  def write_rows(self, rows: Sequence[dict[str, Any]], split: str | None = None) -> str | None:
    """Writes per-slide rows to ``<task.workdir>/eval/<name>_<split>_slides.jsonl`` for paired
    comparisons across runs (``pathflip_jax.compare``); nothing when the task has no workdir."""
    workdir = getattr(self.task, "workdir", None)
    if not workdir:
      return None
    return stats.write_slide_rows(storage.join(workdir, "eval"), self.name,
                                  split or self.split, rows)


class BatchedApply:
  """``method(model, inputs)`` over an array of inputs, batch by batch, split over the mesh.

  One compiled shape: the last batch is padded. The jitted function is kept between calls, so
  an evaluator that runs every few hundred steps compiles once.
  """

  def __init__(self, method: Callable[[nnx.Module, jax.Array], jax.Array], mesh: Mesh,
               batch_size: int):
    shards = sharding.batch_shards(mesh)
    self.batch_size = -(-batch_size // shards) * shards
    self.mesh = mesh

    # Replicated outputs: every process gets the whole batch's results (several processes
    # evaluate the same split).
    @functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))
    def apply(graphdef, state, inputs):
      return method(nnx.merge(graphdef, state), inputs)

    self._apply = apply

  def __call__(self, model: nnx.Module, inputs: np.ndarray) -> np.ndarray:
    graphdef, state = nnx.split(model)
    outputs = []
    for start in range(0, len(inputs), self.batch_size):
      chunk = inputs[start:start + self.batch_size]
      valid = len(chunk)
      if valid < self.batch_size:
        pad = np.repeat(chunk[-1:], self.batch_size - valid, axis=0)
        chunk = np.concatenate([chunk, pad])
      batch = input_pipeline.full_batch_to_global({"x": chunk}, self.mesh)["x"]
      outputs.append(np.asarray(jax.device_get(self._apply(graphdef, state, batch)))[:valid])
    return np.concatenate(outputs) if outputs else np.zeros((0,), np.float32)


def class_prompts(config, class_names) -> tuple[list[str], np.ndarray]:
  """The prompt texts of ``config.prompts`` (class name -> phrases; default: the class name)
  and the class index of each, in class order."""
  prompts = dict(config.get("prompts", None) or {})
  unknown = set(prompts) - set(class_names)
  if unknown:
    raise ValueError(f"config.evals.*.prompts names unknown classes {sorted(unknown)}; "
                     f"classes: {class_names}")
  per_class = [list(prompts.get(name) or [name]) for name in class_names]
  texts = [p for phrases in per_class for p in phrases]
  prompt_class = np.array([i for i, phrases in enumerate(per_class) for _ in phrases])
  return texts, prompt_class


def class_embeddings(prompt_emb: np.ndarray, prompt_class: np.ndarray,
                     num_classes: int) -> np.ndarray:
  """Each class's normalised mean prompt embedding (prompt ensembling): [classes, e]."""
  class_emb = np.stack([prompt_emb[prompt_class == c].mean(0) for c in range(num_classes)])
  return class_emb / np.linalg.norm(class_emb, axis=1, keepdims=True)


def check_split(task, config, split: str, key: str) -> None:
  """Fails at start-up, not at the end of a run, when an evaluator's split has no data."""
  splits = getattr(task, "splits", None)
  if splits is None:
    return
  if split not in splits or not len(splits[split].indices):
    raise ValueError(f"config.evals.*.{key}={split!r}: that split has no patches to evaluate "
                     f"(splits with patches: {sorted(k for k, v in splits.items() if len(v.indices))})")


class SlideEmbeddings:
  """Slide embeddings, region embeddings and caption embeddings of a split (stage "align").

  Runs ``model.encode_slides`` over ``task.eval_batches(split)`` (split over the mesh's batch
  axes) and returns arrays in the split's slide order.
  """

  def __init__(self, task, mesh: Mesh, batch_size: int):
    shards = sharding.batch_shards(mesh)
    self.task, self.mesh = task, mesh
    self.batch_size = -(-batch_size // shards) * shards

    @functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))
    def encode(graphdef, state, batch):
      model = nnx.merge(graphdef, state)
      out = model.encode_slides(batch)
      return {"slide": out["slide"], "regions": out["regions"],
              "region_valid": out["region_valid"], "caption": model.encode_texts(batch["caption"])}

    self._encode = encode
    self._texts = BatchedApply(lambda m, t: m.encode_texts(t), mesh, self.batch_size)

  def __call__(self, model: nnx.Module, split: str) -> dict[str, np.ndarray]:
    graphdef, state = nnx.split(model)
    batches, count = self.task.eval_batches(split, self.batch_size)
    parts: dict[str, list[np.ndarray]] = {}
    index = []
    for batch in batches:
      keep = batch["slide_index"] >= 0
      inputs = input_pipeline.full_batch_to_global(
          {k: v for k, v in batch.items() if k not in ("label", "slide_index")}, self.mesh)
      out = jax.device_get(self._encode(graphdef, state, inputs))
      for key, value in out.items():
        parts.setdefault(key, []).append(np.asarray(value)[keep])
      parts.setdefault("label", []).append(batch["label"][keep])
      index.append(batch["slide_index"][keep])
    order = np.argsort(np.concatenate(index))
    result = {k: np.concatenate(v)[order] for k, v in parts.items()}
    assert len(order) == count
    return result

  def texts(self, model: nnx.Module, tokens: np.ndarray) -> np.ndarray:
    """Unit-norm embeddings of token rows (padded to the mesh's batch split)."""
    return self._texts(model, tokens)


def classification_metrics(labels: np.ndarray, scores_nc: np.ndarray, prefix: str = ""
                           ) -> Callable[[np.ndarray], dict[str, float]]:
  """The dict metric (slide indices -> values) of class scores [n, classes] against labels:
  balanced accuracy, weighted F1, macro one-vs-rest AUC and accuracy, keys ``prefix + name``,
  each recomputed on the slides given (for :func:`stats.add_intervals`)."""
  labels, scores_nc = np.asarray(labels), np.asarray(scores_nc)
  predicted = scores_nc.argmax(1) if len(scores_nc) else np.zeros((0,), np.int64)

  def metric(idx: np.ndarray) -> dict[str, float]:
    y, p = labels[idx], predicted[idx]
    return {prefix + "balanced_accuracy": metrics.balanced_accuracy(y, p),
            prefix + "weighted_f1": metrics.weighted_f1(y, p),
            prefix + "macro_auc": metrics.macro_auc(y, scores_nc[idx]),
            prefix + "accuracy": float(np.mean(p == y))}

  return metric


def majority_class(task, split: str = "train") -> int | None:
  """The most frequent label of an align task's (training) split: the majority-class
  baseline is chosen there, never on the split it is scored on. None without labels."""
  labels = np.array([t.label for t in task.splits[split].texts], np.int64)
  labels = labels[labels >= 0]
  return int(np.bincount(labels).argmax()) if len(labels) else None


def slide_ids(task, split: str) -> list[str]:
  """The slide ids of an align task's split, in the split's order (that of SlideEmbeddings)."""
  return [t.slide_id for t in task.splits[split].texts]


def patch_groups(task, split: str, count: int) -> tuple[np.ndarray, bool]:
  """The resampling unit of each of a patch-level split's ``count`` patches: its slide when
  the task knows it (``task.splits[split].slide_ids``), else the patch itself; and whether
  they are slides."""
  splits = getattr(task, "splits", None)
  ids = getattr(splits.get(split), "slide_ids", None) if isinstance(splits, dict) else None
  if ids is not None and len(ids) == count:
    return np.asarray(ids), True
  return np.arange(count), False


def patch_majority(task: Any, labels: np.ndarray, num_classes: int) -> int:
  """The most frequent patch label of the task's training split (the evaluated split's when
  the task has no training labels to hand)."""
  splits = getattr(task, "splits", None)
  train = getattr(splits.get("train"), "labels", None) if isinstance(splits, dict) else None
  source = np.asarray(train if train is not None and len(train) else labels)
  return int(np.bincount(source, minlength=num_classes).argmax())


def patch_intervals(task: Any, split: str, labels: np.ndarray, metric) -> dict[str, float]:
  """The metrics of a patch-level evaluator (``metric``: patch indices -> dict) with intervals
  over slides (patches grouped by slide) or, when the slides are unknown, over patches."""
  groups, by_slide = patch_groups(task, split, len(labels))
  items, count = stats.group_members(groups)
  result: dict[str, float] = {}
  stats.add_intervals(result, lambda idx: metric(items(idx)), count)
  if by_slide:
    result["num_slides"] = float(count)
  return result


def write_patch_rows(evaluator: EvaluatorBase, labels: np.ndarray,
                     columns: dict[str, np.ndarray]) -> None:
  """Per slide: its patches' labels and ``columns`` (per-patch values), when the slides and the
  workdir are known."""
  groups, by_slide = patch_groups(evaluator.task, evaluator.split, len(labels))
  if not by_slide or not getattr(evaluator.task, "workdir", None):
    return
  rows = []
  for slide_id in np.unique(groups):
    members = np.nonzero(groups == slide_id)[0]
    rows.append({"slide_id": str(slide_id), "labels": labels[members].tolist(),
                 **{k: np.asarray(v)[members].tolist() for k, v in columns.items()}})
  evaluator.write_rows(rows)


class PatchClipReference:
  """The patch encoder's own text alignment: the patch_clip run (``config.evals.*.reference``)
  whose image tower extracted the features scores patches by the cosine of its projected
  patch feature with a text embedding from its own text tower (the role CONCH plays).

  Loaded once; it does not train, so what is computed from it can be cached by the caller.
  """

  def __init__(self, workdir: str, key: str = "config.evals.*.reference"):
    from pathflip_jax import predict  # pylint: disable=import-outside-toplevel
    self.workdir, self.key = workdir, key
    self.model, self.tokenizer, self.text_len = predict.load_patch_clip(workdir)
    self.feature_dim = int(self.model.image_proj.kernel.shape[0])

  def class_embeddings(self, texts: Sequence[str], prompt_class: np.ndarray,
                       num_classes: int) -> np.ndarray:
    """Normalised mean prompt embedding per class, from the run's text tower: [classes, e]."""
    tokens = self.tokenizer.encode_batch(list(texts), self.text_len)
    prompt_emb = np.asarray(self.model.encode_texts(tokens), np.float32)
    return class_embeddings(prompt_emb, prompt_class, num_classes)

  def patch_embeddings(self, features: np.ndarray, slide_id: str) -> np.ndarray:
    """Unit-norm projected patch features [n, e] of one slide."""
    features = np.asarray(features, np.float32)
    if features.shape[1] != self.feature_dim:
      raise ValueError(f"{self.key}={self.workdir}: its image projection takes "
                       f"{self.feature_dim}-d features, slide {slide_id} has "
                       f"{features.shape[1]}-d ones (not this run's patch encoder)")
    patches = np.asarray(self.model.image_proj(features), np.float32)
    return patches / np.maximum(np.linalg.norm(patches, axis=1, keepdims=True), 1e-12)

  def slide_embedding(self, features: np.ndarray, slide_id: str) -> np.ndarray:
    """The mean of a slide's unit-norm patch embeddings, normalised (MI-Zero's mean pooling:
    its cosine with a class is the slide's mean patch cosine, rescaled)."""
    mean = self.patch_embeddings(features, slide_id).mean(0)
    return mean / max(float(np.linalg.norm(mean)), 1e-12)


def check_slide_split(task, split: str, key: str) -> None:
  """Fails at start-up when an evaluator's split has no slides."""
  splits = task.splits
  if split not in splits or not len(splits[split]):
    raise ValueError(f"config.evals.*.{key}={split!r}: that split has no slides to evaluate "
                     f"(splits with slides: {sorted(k for k, v in splits.items() if len(v))})")
