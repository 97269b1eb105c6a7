"""Schedules, masks, frozen parameters, clipping and accumulation of pathflip_jax.optim."""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from pathflip_jax import optim


def cfg(**fields) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(fields)


# Each eager op compiles separately (~0.1 s each on a slow XLA:CPU), so test data is built in
# NumPy and every optimizer step is one jitted function at the lowest backend optimisation level.
FAST = {"xla_backend_optimization_level": 0}


def tiny_params() -> dict:
  return jax.tree.map(jnp.asarray, {
      "stem": {"kernel": np.full((2, 2), 0.5, np.float32)},
      "w": np.arange(6, dtype=np.float32).reshape(3, 2) - 2.0,
      "b": np.array([1.0, -1.0], np.float32),
      "pos_embed": np.ones((2, 2), np.float32),
  })


def grads_like(params, scale: float = 1.0):
  """Distinct, non-zero gradients per leaf, in the structure of ``params``."""
  leaves, treedef = jax.tree.flatten(params)
  return jax.tree.unflatten(treedef, [
      jnp.asarray(scale * (np.arange(x.size, dtype=np.float32).reshape(x.shape) + i + 1) / 10)
      for i, x in enumerate(leaves)])


def run(*cases):
  """Runs ``(tx, params, [grads, ...])`` cases in one jitted function (one compilation).

  Each case initialises ``tx`` and takes one step per gradient. Returns, per case, the final
  params, the list of updates and the final optimizer state, as NumPy (so the checks that
  follow do not compile eager ops).
  """
  txs = [tx for tx, _, _ in cases]

  def run_all(inputs):
    results = []
    for tx, (params, grads) in zip(txs, inputs):
      state = tx.init(params)
      updates = []
      for g in grads:
        u, state = tx.update(g, state, params)
        params = optax.apply_updates(params, u)
        updates.append(u)
      results.append((params, updates, state))
    return results

  inputs = [(params, list(grads)) for _, params, grads in cases]
  return jax.device_get(jax.jit(run_all, compiler_options=FAST)(inputs))


def step(tx, params, grads):
  """One step from a fresh state: new params, updates, state."""
  [(new, [updates], state)] = run((tx, params, [grads]))
  return new, updates, state


def global_norm(tree) -> float:
  return float(np.sqrt(sum(np.sum(np.square(np.asarray(x))) for x in jax.tree.leaves(tree))))


# --- paths and masks ----------------------------------------------------------------------------


def test_param_path_key_types():
  Pair = collections.namedtuple("Pair", "left right")
  tree = {"blocks": [{"attn": Pair(np.zeros(1), np.zeros(1))}], "t": (np.zeros(1),)}
  assert sorted(jax.tree.leaves(optim.param_paths(tree))) == [
      "blocks/0/attn/left", "blocks/0/attn/right", "t/0"]


def test_masks_on_dict():
  params = tiny_params()
  assert optim.decay_mask(params, exclude_patterns=optim.NO_DECAY) == {
      "stem": {"kernel": True}, "w": True, "b": False, "pos_embed": False}
  assert optim.trainable_mask(params, ["^stem/"]) == {
      "stem": {"kernel": False}, "w": True, "b": True, "pos_embed": True}
  with pytest.raises(ValueError, match=r"optim\.frozen.*stme"):
    optim.trainable_mask(params, ["stme"])


# --- schedules ----------------------------------------------------------------------------------


def test_schedule_values():
  steps = np.array([0, 5, 10, 60, 110, 200])
  expected = {
      "cosine": [0.0, 0.5, 1.0, 0.55, 0.1, 0.1],
      "linear": [0.0, 0.5, 1.0, 0.55, 0.1, 0.1],
      "constant": [0.0, 0.5, 1.0, 1.0, 1.0, 1.0],
      "rsqrt": [0.0, 0.5, 1.0, (10 / 60) ** 0.5, (10 / 110) ** 0.5, (10 / 200) ** 0.5],
  }
  schedules = {kind: optim.make_schedule(cfg(schedule=kind, lr=1.0, warmup_steps=10, end_lr=0.1),
                                         total_steps=110) for kind in expected}
  # No warmup (and the defaults: cosine down to 0): the peak at step 0, lr / 2 halfway.
  schedules["cosine, no warmup"] = optim.make_schedule(cfg(lr=2.0), total_steps=120)
  expected["cosine, no warmup"] = [2.0, 1 + np.cos(np.pi * 5 / 120), 1 + np.cos(np.pi * 10 / 120),
                                   1.0, 1 + np.cos(np.pi * 110 / 120), 0.0]
  schedules["rsqrt, no warmup"] = optim.make_schedule(cfg(schedule="rsqrt", lr=1.0), 100)
  expected["rsqrt, no warmup"] = [1.0, 5 ** -0.5, 10 ** -0.5, 60 ** -0.5, 110 ** -0.5,
                                  200 ** -0.5]
  # One compilation for all of them (eager ops each compile separately).
  got = jax.device_get(jax.jit(lambda s: {k: f(s) for k, f in schedules.items()},
                               compiler_options=FAST)(steps))
  for kind, values in expected.items():
    np.testing.assert_allclose(got[kind], values, rtol=1e-5, atol=1e-6, err_msg=kind)


@pytest.mark.parametrize("fields, key", [
    (dict(schedule="cosin"), "optim.schedule"),
    (dict(lr=0.0), "optim.lr"),
    (dict(warmup_steps=-1), "optim.warmup_steps"),
    (dict(end_lr=-1.0), "optim.end_lr"),
    (dict(lerning_rate=1.0), "optim.lerning_rate"),
])
def test_schedule_errors(fields, key):
  with pytest.raises(ValueError, match=key.replace(".", r"\.")):
    optim.make_schedule(cfg(**fields), total_steps=10)


def test_warmup_longer_than_the_run_is_cut_to_it():
  """A 5-step run of a config with 50 warmup steps warms up over its 5 steps."""
  schedule = optim.make_schedule(cfg(lr=1.0, warmup_steps=50), total_steps=5)
  got = jax.device_get(jax.jit(lambda s: schedule(s), compiler_options=FAST)(np.arange(6)))
  np.testing.assert_allclose(got, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0], atol=1e-6)


# --- optimizer ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fields, key", [
    (dict(optimizer="adamax"), "optim.optimizer"),
    (dict(weight_decay=-0.1), "optim.weight_decay"),
    (dict(optimizer="adam", weight_decay=0.1), "optim.weight_decay"),
    (dict(grad_accum_steps=0), "optim.grad_accum_steps"),
    (dict(frozen="stem"), "optim.frozen"),
    (dict(no_decay=["("]), "optim.no_decay"),
    (dict(lr_multipliers={"w": 2.0}), "optim.lr_multipliers"),
])
def test_optimizer_errors(fields, key):
  with pytest.raises(ValueError, match=key.replace(".", r"\.")):
    optim.make_optimizer(cfg(**fields), total_steps=10)


def test_unmatched_frozen_pattern_raises_at_init():
  tx, _ = optim.make_optimizer(cfg(frozen=("^stem/", "^ecnoder/")), total_steps=10)
  with pytest.raises(ValueError, match=r"optim\.frozen.*ecnoder"):
    tx.init(tiny_params())


def test_frozen_leaf_unchanged_and_stateless():
  params = tiny_params()
  tx, _ = optim.make_optimizer(cfg(lr=0.1, weight_decay=0.1, frozen=("^stem/",)), total_steps=10)
  new, _, state = step(tx, params, grads_like(params))
  np.testing.assert_array_equal(new["stem"]["kernel"], params["stem"]["kernel"])
  for name in ("w", "b", "pos_embed"):
    assert not np.allclose(new[name], params[name]), name
  state_paths = jax.tree.leaves(optim.param_paths(state))
  assert any(p.endswith("/mu/w") for p in state_paths)
  assert any(p.endswith("/nu/w") for p in state_paths)
  assert not any("stem" in p for p in state_paths)


def test_weight_decay_only_on_decay_mask():
  params, grads = tiny_params(), grads_like(tiny_params())
  lr, wd = 0.1, 0.5
  [(_, [with_wd], _), (_, [without], _)] = run(
      (optim.make_optimizer(cfg(lr=lr, schedule="constant", weight_decay=wd), 10)[0],
       params, [grads]),
      (optim.make_optimizer(cfg(lr=lr, schedule="constant"), 10)[0], params, [grads]))
  # Decoupled: the decayed update differs by exactly -lr * wd * param.
  for decayed in (lambda t: t["w"], lambda t: t["stem"]["kernel"]):
    np.testing.assert_allclose(decayed(with_wd) - decayed(without),
                               -lr * wd * np.asarray(decayed(params)), atol=1e-6)
  for name in ("b", "pos_embed"):  # 1-D bias; 2-D excluded by name
    np.testing.assert_array_equal(with_wd[name], without[name])


def test_sgd_decoupled_decay_and_momentum():
  params, grads = tiny_params(), grads_like(tiny_params())
  zeros = jax.tree.map(lambda x: np.zeros(x.shape, np.float32), params)
  sgd = dict(optimizer="sgd", lr=0.1, schedule="constant", momentum=0.9)
  [(_, [decay], _), (_, [first, second], _)] = run(
      (optim.make_optimizer(cfg(weight_decay=0.5, **sgd), 10)[0], params, [zeros]),
      (optim.make_optimizer(cfg(**sgd), 10)[0], params, [grads, grads]))
  np.testing.assert_allclose(decay["w"], -0.1 * 0.5 * np.asarray(params["w"]), atol=1e-7)
  np.testing.assert_array_equal(decay["b"], 0.0)
  # Momentum: the second of two equal gradients moves (1 + 0.9) times as far.
  np.testing.assert_allclose(second["w"], 1.9 * first["w"], rtol=1e-6)


def test_grad_clip_caps_global_norm_of_trainable_grads():
  params = tiny_params()
  sgd = dict(optimizer="sgd", lr=1.0, schedule="constant", grad_clip_norm=0.5)
  huge = grads_like(params, scale=1e4)
  # A frozen leaf's huge gradient neither counts towards the norm nor moves anything.
  small = grads_like(params, scale=0.01)
  small["stem"]["kernel"] = np.full((2, 2), 1e6, np.float32)
  assert global_norm({k: v for k, v in small.items() if k != "stem"}) < 0.5
  [(_, [clipped], _), (_, [frozen], _)] = run(
      (optim.make_optimizer(cfg(**sgd), 10)[0], params, [huge]),
      (optim.make_optimizer(cfg(frozen=("^stem/",), **sgd), 10)[0], params, [small]))
  np.testing.assert_allclose(global_norm(clipped), 0.5, rtol=1e-5)
  np.testing.assert_array_equal(frozen["stem"]["kernel"], 0.0)
  np.testing.assert_allclose(frozen["w"], -np.asarray(small["w"]), rtol=1e-6)


def test_grad_accumulation_equals_mean_gradient_step():
  params = tiny_params()
  g1, g2 = grads_like(params), grads_like(params, scale=-3.0)
  mean = jax.tree.map(lambda a, b: (np.asarray(a) + np.asarray(b)) / 2, g1, g2)
  base = dict(lr=0.1, weight_decay=0.1, grad_clip_norm=1.0, frozen=("^stem/",))
  [(after_two, [first, _], state), (expected, _, _)] = run(
      (optim.make_optimizer(cfg(grad_accum_steps=2, **base), 10)[0], params, [g1, g2]),
      (optim.make_optimizer(cfg(**base), 10)[0], params, [mean]))
  assert global_norm(first) == 0.0  # the first micro-step only accumulates
  assert int(state.gradient_step) == 1  # the schedule's step: optimizer, not micro, steps
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               after_two, expected)
  np.testing.assert_array_equal(after_two["stem"]["kernel"], params["stem"]["kernel"])


def test_adam_and_lion_respect_frozen():
  params, grads = tiny_params(), grads_like(tiny_params())
  results = run(*[
      (optim.make_optimizer(cfg(optimizer=name, lr=0.01, schedule="constant",
                                frozen=("^stem/",)), 10)[0], params, [grads])
      for name in ("adam", "lion")])
  for new, [updates], _ in results:
    np.testing.assert_array_equal(new["stem"]["kernel"], params["stem"]["kernel"])
    # Both normalise the first step: every trainable entry moves by ~lr.
    np.testing.assert_allclose(np.abs(updates["w"]), 0.01, rtol=1e-3)


# --- nnx ----------------------------------------------------------------------------------------


class TinyNet(nnx.Module):
  """Two ``nnx.Linear`` in an ``nnx.List`` and a 2-D position embedding."""

  def __init__(self, rngs: nnx.Rngs):
    # NumPy init: random (or even jnp) initialisation compiles for seconds on a slow XLA:CPU.
    linear = lambda i, o: nnx.Linear(  # noqa: E731
        i, o, kernel_init=lambda _, shape, dtype: np.full(shape, 0.5, dtype),
        bias_init=lambda _, shape, dtype: np.zeros(shape, dtype), rngs=rngs)
    self.layers = nnx.List([linear(3, 2), linear(2, 2)])
    self.pos_embed = nnx.Param(np.ones((2, 2), np.float32))


def test_nnx_state():
  model = TinyNet(nnx.Rngs(0))
  _, params, _ = nnx.split(model, nnx.Param, ...)
  assert isinstance(params, nnx.State)
  assert sorted(jax.tree.leaves(optim.param_paths(params))) == [
      "layers/0/bias", "layers/0/kernel", "layers/1/bias", "layers/1/kernel", "pos_embed"]
  assert {p: d for p, d in zip(jax.tree.leaves(optim.param_paths(params)),
                               jax.tree.leaves(optim.decay_mask(params)))} == {
      "layers/0/bias": False, "layers/0/kernel": True, "layers/1/bias": False,
      "layers/1/kernel": True, "pos_embed": False}

  config = cfg(lr=0.1, weight_decay=0.1, grad_clip_norm=1.0, frozen=("^layers/0/",))
  tx, _ = optim.make_optimizer(config, total_steps=10)
  before = jax.tree.map(np.array, params)
  grads = grads_like(params)
  assert isinstance(grads, nnx.State)
  new, _, state = step(tx, params, grads)
  nnx.update(model, new)
  np.testing.assert_array_equal(model.layers[0].kernel[...], before["layers"][0]["kernel"][...])
  assert not np.allclose(model.layers[1].kernel[...], before["layers"][1]["kernel"][...])
  state_paths = jax.tree.leaves(optim.param_paths(state))
  assert any(p.endswith("mu/layers/1/kernel") for p in state_paths)
  assert not any("layers/0" in p for p in state_paths)

  table = optim.describe(params, config)
  rows = {line[:24].strip(): line[24:].split() for line in table.splitlines()[1:5]}
  assert rows == {"trainable, decayed": ["1", "4"], "trainable, not decayed": ["2", "6"],
                  "frozen": ["2", "8"], "total": ["5", "18"]}, table


# --- trainable ----------------------------------------------------------------------------------


def test_trainable_mask_combines_trainable_and_frozen():
  params = tiny_params()
  # A parameter trains iff it matches some trainable pattern and no frozen one.
  config = cfg(trainable=("^stem/", "^w$", "^b$"), frozen=("^b$",))
  expected = {"stem": {"kernel": True}, "w": True, "b": False, "pos_embed": False}
  assert optim.trainable_mask(params, config.frozen, config.trainable) == expected
  assert optim.trainable_mask_from_config(params, config) == expected
  assert optim.trainable_mask_from_config(params, cfg(frozen=("^w$",))) == {
      "stem": {"kernel": True}, "w": False, "b": True, "pos_embed": True}
  assert optim.trainable_mask_from_config(params, cfg(lr=0.1)) is None  # nothing frozen
  with pytest.raises(ValueError, match=r"optim\.trainable.*\^wq\$"):
    optim.trainable_mask_from_config(params, cfg(trainable=("^w$", "^wq$")))
  with pytest.raises(ValueError, match=r"optim\.trainble"):
    optim.trainable_mask_from_config(params, cfg(trainble=("^w$",)))


@pytest.mark.parametrize("fields", [dict(trainable="stem"), dict(trainable=["("])])
def test_trainable_errors(fields):
  with pytest.raises(ValueError, match=r"optim\.trainable"):
    optim.make_optimizer(cfg(**fields), total_steps=10)


def test_unmatched_trainable_pattern_raises_at_init():
  tx, _ = optim.make_optimizer(cfg(trainable=("^stem/", "^stme/")), total_steps=10)
  with pytest.raises(ValueError, match=r"optim\.trainable.*stme"):
    tx.init(tiny_params())


def test_only_trainable_leaves_move_and_have_state():
  params = tiny_params()
  config = cfg(lr=0.1, weight_decay=0.1, grad_clip_norm=1.0, trainable=("^stem/", "^w$"),
               frozen=("^w$",))
  new, _, state = step(optim.make_optimizer(config, total_steps=10)[0], params,
                       grads_like(params))
  assert not np.allclose(new["stem"]["kernel"], params["stem"]["kernel"])
  for name in ("w", "b", "pos_embed"):
    np.testing.assert_array_equal(new[name], params[name], err_msg=name)
  state_paths = jax.tree.leaves(optim.param_paths(state))
  assert any(p.endswith("mu/stem/kernel") for p in state_paths)
  assert not any(p.endswith(("/w", "/b", "/pos_embed")) for p in state_paths)

  table = optim.describe(params, config)
  rows = {line[:24].strip(): line[24:].split() for line in table.splitlines()[1:5]}
  assert rows == {"trainable, decayed": ["1", "4"], "trainable, not decayed": ["0", "0"],
                  "frozen": ["3", "12"], "total": ["4", "16"]}, table
  assert table.splitlines()[-1].endswith("frozen=['^w$'] trainable=['^stem/', '^w$']")
