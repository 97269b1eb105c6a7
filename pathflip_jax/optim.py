"""Optax optimizers and learning-rate schedules built from the ``optim`` block of a config.

The trainer keeps parameters as a pytree (an ``nnx.State`` from ``nnx.split(model, nnx.Param,
...)``, or a plain nested dict) and applies the returned transformation functionally. Every mask
and label here is a *callable* over the tree, built from parameter paths such as
``"blocks/0/attn/qkv_kernel"``, so the same optimizer works for either kind of tree and for the
partial trees that ``optax.multi_transform`` hands its inner transformations.

Config fields (``config.optim``; every one has a default, so ``ConfigDict()`` is a valid config):

  optimizer       "adamw" | "adam" | "sgd" | "lion"                           ("adamw")
  lr              peak learning rate, > 0                                     (1e-3)
  schedule        "cosine" | "linear" | "constant" | "rsqrt"                  ("cosine")
  warmup_steps    linear warmup from 0 to ``lr``, >= 0; cut to total_steps    (0)
  end_lr          final learning rate of "cosine" and "linear"                (0.0)
  b1, b2, eps     Adam/Lion moments; b2 defaults to 0.999 (Adam), 0.99 (Lion) (0.9, -, 1e-8)
  momentum        SGD momentum, 0 = plain SGD                                 (0.0)
  nesterov        Nesterov momentum for SGD                                   (False)
  weight_decay    decoupled decay on :func:`decay_mask` params, times the lr  (0.0)
  no_decay        regexes of params never decayed (besides all ndim < 2)      (:data:`NO_DECAY`)
  frozen          regexes of params that are never updated                    (())
  trainable       regexes; when given, params matching none are frozen        (())
  grad_clip_norm  clip the global norm of the trainable grads, 0 = off        (0.0)
  grad_accum_steps  micro-steps per optimizer step (``optax.MultiSteps``)     (1)

Patterns are Python regexes matched with ``re.search`` against the path string. A parameter is
trained iff it matches some ``trainable`` pattern (when any are given) and no ``frozen`` pattern;
a ``frozen`` or ``trainable`` pattern that matches no parameter is an error (a typo would
otherwise silently train, or freeze, the wrong parameters). Unknown fields and unknown values
raise ``ValueError`` naming ``optim.<field>``.

Gradient accumulation: with ``grad_accum_steps = k`` the trainer calls ``tx.update`` once per
micro-batch; every k-th call applies the mean gradient and the others return zero updates.
``total_steps`` and the schedule count *optimizer* steps (``opt_state.gradient_step``), not
micro-steps.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

NO_DECAY = ("pos_embed", "cls_token", "reg_token", "logit_scale", "logit_bias")

OPTIMIZERS = ("adamw", "adam", "sgd", "lion")
SCHEDULES = ("cosine", "linear", "constant", "rsqrt")
FIELDS = ("optimizer", "lr", "schedule", "warmup_steps", "end_lr", "b1", "b2", "eps", "momentum",
          "nesterov", "weight_decay", "no_decay", "frozen", "trainable", "grad_clip_norm",
          "grad_accum_steps")

_TRAIN, _FROZEN = "train", "frozen"


# ---------------------------------------------------------------------------------------------
# Parameter paths and masks.


def _key_name(key: Any) -> str:
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def param_path(path: tuple) -> str:
  """A jax key path as ``"blocks/0/attn/qkv_kernel"``.

  An ``nnx.Variable`` flattens to its array under a trailing ``GetAttrKey("value")``; that step
  is dropped so a path names the parameter, not the wrapper (a dataclass field called ``value``
  at the very end of a path is dropped too).
  """
  keys = list(path)
  if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
    keys.pop()
  return "/".join(_key_name(k) for k in keys)


def param_paths(tree: Any) -> Any:
  """``tree`` with every leaf replaced by its path string."""
  return jax.tree_util.tree_map_with_path(lambda path, _: param_path(path), tree)


def _compile(patterns: Sequence[str], field: str) -> list[re.Pattern]:
  if isinstance(patterns, str):
    # A bare string would otherwise be iterated character by character.
    raise ValueError(f"optim.{field} must be a sequence of regexes, got the string {patterns!r}")
  try:
    return [re.compile(p) for p in patterns]
  except re.error as e:
    raise ValueError(f"optim.{field}: invalid regex: {e}") from e


def trainable_mask(tree: Any, frozen_patterns: Sequence[str] = (),
                   trainable_patterns: Sequence[str] = ()) -> Any:
  """True for leaves that train: paths matching no frozen and some trainable pattern.

  Empty ``trainable_patterns`` stand for every path (only ``frozen_patterns`` then count).
  Raises ``ValueError`` naming ``optim.frozen`` / ``optim.trainable`` if a pattern matches no
  leaf: a typo would otherwise silently train the whole model (or freeze it).
  """
  frozen = _compile(frozen_patterns, "frozen")
  trainable = _compile(trainable_patterns, "trainable")
  paths = [param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
  for field, regexes in (("frozen", frozen), ("trainable", trainable)):
    unused = [r.pattern for r in regexes if not any(r.search(p) for p in paths)]
    if unused:
      raise ValueError(f"optim.{field} patterns {unused} match no parameter "
                       f"(parameters: {_abbreviate(paths)})")

  def trains(path: str) -> bool:
    return (not trainable or any(r.search(path) for r in trainable)) \
        and not any(r.search(path) for r in frozen)

  return jax.tree_util.tree_map_with_path(lambda path, _: trains(param_path(path)), tree)


def decay_mask(tree: Any, *, exclude_patterns: Sequence[str] = NO_DECAY) -> Any:
  """True for leaves that get weight decay: ndim >= 2 and no ``exclude_patterns`` match.

  Biases and norm scales (1-D) are never decayed; embeddings that are matrices but should not
  shrink (position embeddings, class tokens, CLIP's logit scale) are excluded by pattern.
  Unlike ``frozen``, a pattern matching nothing is fine: the defaults name parts that not every
  model has.
  """
  regexes = _compile(exclude_patterns, "no_decay")
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.ndim(x) >= 2 and not any(r.search(param_path(path)) for r in regexes),
      tree)


def _abbreviate(items: Sequence[str], limit: int = 8) -> str:
  shown = ", ".join(items[:limit])
  return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


# ---------------------------------------------------------------------------------------------
# Config access.


def _patterns(config: ml_collections.ConfigDict, name: str,
              default: Sequence[str]) -> tuple[str, ...]:
  patterns = config.get(name, default)
  _compile(patterns, name)
  return tuple(patterns)


def trainable_mask_from_config(tree: Any, config: ml_collections.ConfigDict) -> Any | None:
  """``trainable_mask`` of ``tree`` under the ``frozen`` and ``trainable`` of ``config``.

  ``config`` is the ``optim`` block. Returns None when neither field is set (every parameter
  trains), so a trainer can skip masking altogether.
  """
  _check_fields(config)
  frozen = _patterns(config, "frozen", ())
  trainable = _patterns(config, "trainable", ())
  if not frozen and not trainable:
    return None
  return trainable_mask(tree, frozen, trainable)


def _check_fields(config: ml_collections.ConfigDict) -> None:
  unknown = sorted(set(config.keys()) - set(FIELDS))
  if unknown:
    raise ValueError(f"unknown optimizer fields {['optim.' + k for k in unknown]}; "
                     f"known: {', '.join(FIELDS)}")


def _choice(config: ml_collections.ConfigDict, name: str, default: str,
            choices: Sequence[str]) -> str:
  value = config.get(name, default)
  if value not in choices:
    raise ValueError(f"optim.{name}={value!r} is not one of {', '.join(choices)}")
  return value


def _number(config: ml_collections.ConfigDict, name: str, default: float,
            valid: Callable[[float], bool], requirement: str) -> float:
  """``config.<name>`` as a float; ``requirement`` says what ``valid`` checks (for the error)."""
  value = config.get(name, default)
  if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) \
      or not math.isfinite(value) or not valid(value):
    raise ValueError(f"optim.{name}={value!r}: must be a number {requirement}")
  return float(value)


def _int(config: ml_collections.ConfigDict, name: str, default: int, *, low: int,
         high: int | None = None) -> int:
  value = config.get(name, default)
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"optim.{name} must be an integer, got {value!r}")
  if value < low or (high is not None and value > high):
    raise ValueError(f"optim.{name}={value} is outside [{low}, {'inf' if high is None else high}]")
  return int(value)


# ---------------------------------------------------------------------------------------------
# Schedule and optimizer.


def make_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Learning rate as a function of the optimizer step.

  All schedules warm up linearly from 0 (step 0) to ``lr`` (step ``warmup_steps``), then:
  "cosine" and "linear" decay to ``end_lr`` at ``total_steps`` (and stay there), "constant"
  stays at ``lr``, and "rsqrt" is ``lr * sqrt(warmup_steps / step)`` (with ``warmup_steps=0``
  the timescale is 1 step, i.e. ``lr / sqrt(step)`` from step 1).
  """
  _check_fields(config)
  if isinstance(total_steps, bool) or not isinstance(total_steps, (int, np.integer)) \
      or total_steps < 1:
    raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
  kind = _choice(config, "schedule", "cosine", SCHEDULES)
  lr = _number(config, "lr", 1e-3, lambda v: v > 0, "> 0")
  # A warmup longer than the run is cut to the run, so a short run of a long run's config
  # (--config.total_steps=5) trains without editing the schedule.
  warmup = min(_int(config, "warmup_steps", 0, low=0), total_steps)
  end_lr = _number(config, "end_lr", 0.0, lambda v: 0 <= v <= lr,
                   f"in [0, optim.lr={lr}]")
  decay_steps = max(total_steps - warmup, 1)  # warmup == total: decay is never reached

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    if kind == "rsqrt":
      timescale = max(warmup, 1)
      after = lr * jnp.sqrt(timescale / jnp.maximum(step, timescale))
    elif kind == "constant":
      after = jnp.full_like(step, lr)
    else:
      progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
      if kind == "cosine":
        after = end_lr + (lr - end_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
      else:
        after = lr + (end_lr - lr) * progress
    if warmup == 0:
      return after
    return jnp.where(step < warmup, lr * step / warmup, after)

  return schedule


def _base_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule,
                    weight_decay: float, mask: Callable[[Any], Any]
                    ) -> optax.GradientTransformation:
  name = _choice(config, "optimizer", "adamw", OPTIMIZERS)
  unit = lambda v: 0 <= v < 1  # noqa: E731
  b1 = _number(config, "b1", 0.9, unit, "in [0, 1)")
  b2 = _number(config, "b2", 0.99 if name == "lion" else 0.999, unit, "in [0, 1)")
  eps = _number(config, "eps", 1e-8, lambda v: v > 0, "> 0")
  momentum = _number(config, "momentum", 0.0, unit, "in [0, 1)")
  nesterov = bool(config.get("nesterov", False))
  if name == "adam":
    if weight_decay:
      # Adam's coupled L2 and AdamW's decoupled decay differ; make the choice explicit.
      raise ValueError("optim.weight_decay must be 0 with optim.optimizer='adam'; "
                       "use 'adamw' for decoupled weight decay")
    return optax.adam(schedule, b1=b1, b2=b2, eps=eps)
  if name == "adamw":
    return optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask)
  if name == "lion":
    return optax.lion(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=mask)
  # SGD: decay after the momentum trace, so it is decoupled from momentum like AdamW's.
  return optax.chain(
      optax.trace(decay=momentum, nesterov=nesterov) if momentum else optax.identity(),
      optax.add_decayed_weights(weight_decay, mask) if weight_decay else optax.identity(),
      optax.scale_by_learning_rate(schedule))


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """``(tx, schedule)`` for ``total_steps`` optimizer steps; see the module docstring.

  Frozen parameters (``optim.frozen``, or outside ``optim.trainable``) get zero updates and no
  optimizer state (``optax.multi_transform``); their gradients do not count towards the clipping
  norm. The patterns are checked against the tree when ``tx.init`` (and ``tx.update``) is
  called, not here, since only then is the tree known. ``schedule`` takes the optimizer step:
  with accumulation that is ``opt_state.gradient_step``, otherwise the step count of the trainer.
  """
  _check_fields(config)
  schedule = make_schedule(config, total_steps)
  weight_decay = _number(config, "weight_decay", 0.0, lambda v: v >= 0, ">= 0")
  clip = _number(config, "grad_clip_norm", 0.0, lambda v: v >= 0, ">= 0")
  accum = _int(config, "grad_accum_steps", 1, low=1)
  # Read (and compile) the patterns now, so bad regexes fail here rather than at tx.init.
  no_decay = _patterns(config, "no_decay", NO_DECAY)
  frozen = _patterns(config, "frozen", ())
  trainable = _patterns(config, "trainable", ())

  tx = _base_optimizer(config, schedule, weight_decay,
                       lambda params: decay_mask(params, exclude_patterns=no_decay))
  if clip:
    tx = optax.chain(optax.clip_by_global_norm(clip), tx)
  if frozen or trainable:
    # Clipping sits inside the trainable branch, so frozen gradients are left out of its norm.
    labels = lambda params: jax.tree.map(  # noqa: E731
        lambda trains: _TRAIN if trains else _FROZEN,
        trainable_mask(params, frozen, trainable))
    tx = optax.multi_transform({_TRAIN: tx, _FROZEN: optax.set_to_zero()}, labels)
  if accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accum).gradient_transformation()
  return tx, schedule


# ---------------------------------------------------------------------------------------------
# Logging.


def describe(tree: Any, config: ml_collections.ConfigDict) -> str:
  """A small table of how many arrays/scalars are trained, decayed and frozen, for the log."""
  _check_fields(config)
  frozen = _patterns(config, "frozen", ())
  trainable_patterns = _patterns(config, "trainable", ())
  weight_decay = config.get("weight_decay", 0.0)
  trainable = jax.tree.leaves(trainable_mask(tree, frozen, trainable_patterns))
  decayed = jax.tree.leaves(
      decay_mask(tree, exclude_patterns=_patterns(config, "no_decay", NO_DECAY)))
  sizes = [int(np.size(x)) for x in jax.tree.leaves(tree)]
  groups = {"trainable, decayed": [], "trainable, not decayed": [], "frozen": []}
  for size, train, decay in zip(sizes, trainable, decayed):
    key = "frozen" if not train else ("trainable, decayed" if decay and weight_decay
                                      else "trainable, not decayed")
    groups[key].append(size)
  groups["total"] = sizes
  lines = [f"{'parameters':<24}{'arrays':>8}{'scalars':>16}"]
  lines += [f"{name:<24}{len(s):>8}{sum(s):>16,}" for name, s in groups.items()]
  lines.append(f"optimizer={config.get('optimizer', 'adamw')} weight_decay={weight_decay} "
               f"frozen={list(frozen)}"
               + (f" trainable={list(trainable_patterns)}" if trainable_patterns else ""))
  return "\n".join(lines)
