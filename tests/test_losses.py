"""Losses: the region sigmoid loss against hand-computed values, and the shard_map versions
against the global formulas on 8 fake CPU devices."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pathflip_jax import losses, sharding

# XLA:CPU compile time dominates these tests; its backend optimisations buy nothing at this size.
FAST = {"xla_backend_optimization_level": 0}


def dot_attend(params, text_bte, regions_bme, region_valid_bm):
  """Parameter-free attention: text-dependent, simple enough to repeat by hand.

  Masks with -inf, so a slide without valid regions would give NaN if the loss attended over
  nothing.
  """
  del params
  scores_btm = jnp.einsum("bte,bme->btm", text_bte, regions_bme)
  scores_btm = jnp.where(region_valid_bm[:, None, :], scores_btm, -jnp.inf)
  return jnp.einsum("btm,bme->bte", jax.nn.softmax(scores_btm, axis=-1), regions_bme)


def projected_attend(params, text_bte, regions_bme, region_valid_bm):
  """Single-head softmax attention with learned q/k/v projections."""
  q_bth = text_bte @ params["wq"]
  k_bmh = regions_bme @ params["wk"]
  v_bme = regions_bme @ params["wv"]
  scores_btm = jnp.einsum("bth,bmh->btm", q_bth, k_bmh) / math.sqrt(q_bth.shape[-1])
  scores_btm = jnp.where(region_valid_bm[:, None, :], scores_btm, -1e9)
  return jnp.einsum("btm,bme->bte", jax.nn.softmax(scores_btm, axis=-1), v_bme)


def hand_region_loss(regions, region_valid, sub, sub_valid, pick, scale, bias):
  """The region loss with explicit loops over slides and texts (dot_attend)."""
  def attend(t, b):
    ws = [math.exp(float(np.dot(t, r))) if v else 0.0 for r, v in zip(regions[b], region_valid[b])]
    return sum(w * r for w, r in zip(ws, regions[b])) / sum(ws)

  def cos(x, y):
    return float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y)))

  num_slides = len(regions)
  total, pos_logits, neg_logits = 0.0, [], []
  for b in range(num_slides):
    if not any(region_valid[b]):
      continue
    texts = [(sub[b][k], 1.0) for k in range(len(sub[b])) if sub_valid[b][k]]
    texts += [(sub[c][pick[c]], -1.0) for c in range(num_slides)
              if c != b and sub_valid[c][pick[c]]]
    for t, label in texts:
      logit = scale * cos(t, attend(t, b)) + bias
      (pos_logits if label > 0 else neg_logits).append(logit)
      total += math.log1p(math.exp(-label * logit))  # -log sigmoid(label * logit)
  return total / num_slides, {
      "region_positive_accuracy": np.mean([x > 0 for x in pos_logits]),
      "region_negative_accuracy": np.mean([x < 0 for x in neg_logits]),
      "region_positive_logit": np.mean(pos_logits),
      "region_negative_logit": np.mean(neg_logits),
  }


def small_case():
  rng = np.random.default_rng(0)
  b, m, k, e = 4, 3, 2, 3
  return dict(
      regions=rng.normal(size=(b, m, e)).astype(np.float32),
      region_valid=np.array([[1, 1, 1], [1, 0, 1], [0, 0, 0], [1, 1, 0]], bool),
      sub=rng.normal(size=(b, k, e)).astype(np.float32),
      sub_valid=np.array([[1, 1], [1, 0], [1, 1], [1, 1]], bool),
      pick=np.array([1, 0, 1, 0]),
      scale=3.0, bias=-0.5)


def dot_region_loss(regions, region_valid, sub, sub_valid, pick, scale, bias):
  return losses.region_sigmoid_loss(dot_attend, None, regions, region_valid, sub, sub_valid,
                                    pick, scale, bias)


def run_region(case, fn=jax.jit(dot_region_loss, compiler_options=FAST)):
  return fn(case["regions"], case["region_valid"], case["sub"], case["sub_valid"],
            case["pick"], np.float32(case["scale"]), np.float32(case["bias"]))


def test_region_sigmoid_loss_matches_hand_computation():
  case = small_case()
  loss, metrics = run_region(case)
  want_loss, want_metrics = hand_region_loss(**case)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  assert set(metrics) == set(want_metrics)
  for name, want in want_metrics.items():
    np.testing.assert_allclose(metrics[name], want, rtol=1e-5, err_msg=name)


def test_region_sigmoid_loss_uses_only_picked_negatives_and_masks():
  case = small_case()
  base, _ = run_region(case)

  def changed(name, index, value):
    new = {k: np.copy(v) if isinstance(v, np.ndarray) else v for k, v in case.items()}
    new[name][index] = value
    return float(run_region(new)[0])

  other = np.float32([5.0, -1.0, 2.0])
  # Slide 2 has no valid region: its own subcaptions are no positives, so only its pick (1)
  # reaches the loss, as a negative of the other slides.
  assert changed("sub", (2, 0), other) == pytest.approx(float(base), rel=1e-6)
  assert changed("sub", (2, 1), other) != pytest.approx(float(base), rel=1e-3)
  # Slide 2's regions are never attended in the loss.
  assert changed("regions", 2, 7.0) == pytest.approx(float(base), rel=1e-6)
  # An invalid subcaption is neither a positive of its slide nor a negative (slide 1 picks it).
  assert changed("sub", (1, 1), other) == pytest.approx(float(base), rel=1e-6)
  # An invalid region does not take part in the attention.
  assert changed("regions", (1, 1), other) == pytest.approx(float(base), rel=1e-6)
  assert changed("regions", (1, 0), other) != pytest.approx(float(base), rel=1e-3)
  # Every pair counted by hand: dropping slide 2's pick validity removes its negatives.
  assert changed("sub_valid", (2, 1), False) != pytest.approx(float(base), rel=1e-3)

  grads = jax.jit(jax.grad(lambda r, s: run_region({**case, "regions": r, "sub": s},
                                                   dot_region_loss)[0], argnums=(0, 1)),
                  compiler_options=FAST)(case["regions"], case["sub"])
  assert all(np.isfinite(g).all() for g in grads)  # the region-less slide does not poison them
  np.testing.assert_array_equal(grads[0][2], 0.0)
  np.testing.assert_array_equal(grads[1][2, 0], 0.0)


# --- shard_map versions against the global formulas -------------------------------------------

B, K, M, E, H = 16, 3, 5, 8, 4


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_batch():
  rng = np.random.default_rng(1)
  region_valid = rng.random((B, M)) < 0.7
  region_valid[3] = False                    # a slide without tissue regions
  sub_valid = rng.random((B, K)) < 0.8
  sub_valid[:, 0] = True
  sub_valid[9] = False                       # a slide without subcaptions
  pick = np.array([rng.choice(np.flatnonzero(v)) if v.any() else 0 for v in sub_valid])
  return dict(
      image=_unit(rng.normal(size=(B, E))).astype(np.float32),
      text=_unit(rng.normal(size=(B, E))).astype(np.float32),
      text_ids=np.array([0, 1, 2, 2, 3, 4, 5, 5, 5, 6, 7, 8, 9, 10, 10, 11], np.int32),
      regions=rng.normal(size=(B, M, E)).astype(np.float32),
      region_valid=region_valid,
      sub=rng.normal(size=(B, K, E)).astype(np.float32),
      sub_valid=sub_valid,
      pick=pick.astype(np.int32),
      params={"wq": rng.normal(size=(E, H)).astype(np.float32),
              "wk": rng.normal(size=(E, H)).astype(np.float32),
              "wv": rng.normal(size=(E, E)).astype(np.float32)},
  )


@pytest.fixture(scope="module")
def batch():
  return make_batch()


def all_losses(mesh, with_grads):
  """One jitted function for every loss (one compilation per mesh).

  Returns ``((loss, metrics), grads)`` per loss; grads (None without ``with_grads``) wrt the
  embeddings, scale/bias and attend_params. The plain contrastive loss differs from the smoothed
  one only in integer ids, so its gradients are left to the smoothed one.
  """
  def contrastive(image, text, scale, ids, smoothed):
    kw = {"label_smoothing": 0.1, "text_ids_b": ids} if smoothed else {}
    if mesh is None:
      return losses.contrastive_loss(image, text, scale, **kw)
    return losses.gathered_contrastive_loss(image, text, scale, mesh, **kw)

  def region(params, regions, region_valid, sub, sub_valid, pick, scale, bias):
    return losses.region_sigmoid_loss(projected_attend, params, regions, region_valid, sub,
                                      sub_valid, pick, scale, bias, mesh=mesh)

  def maybe_grad(f, argnums):
    if with_grads:
      return jax.value_and_grad(f, argnums=argnums, has_aux=True)
    return lambda *args: (f(*args), None)

  def fn(c_args, r_args):
    return {
        "plain": (contrastive(*c_args, False), None),
        "smoothed": maybe_grad(contrastive, (0, 1, 2))(*c_args, True),
        "region": maybe_grad(region, (0, 1, 3, 6, 7))(*r_args),
    }

  return jax.jit(fn, compiler_options=FAST)


def run_all(batch, mesh=None, with_grads=True):
  """All losses on ``batch``, laid out by ``sharding.batch_sharding`` when given a mesh."""
  put = (lambda x: placed(mesh, x)) if mesh is not None else jnp.asarray
  c_args = (put(batch["image"]), put(batch["text"]), jnp.float32(10.0), put(batch["text_ids"]))
  r_args = (jax.tree.map(jnp.asarray, batch["params"]), put(batch["regions"]),
            put(batch["region_valid"]), put(batch["sub"]), put(batch["sub_valid"]),
            put(batch["pick"]), jnp.float32(1 / 0.07), jnp.float32(-2.0))
  return all_losses(mesh, with_grads)(c_args, r_args)


def placed(mesh, x):
  return jax.device_put(x, sharding.batch_sharding(mesh, np.ndim(x)))


def assert_same(got, want):
  (got_loss, got_metrics), got_grads = got
  (want_loss, want_metrics), want_grads = want
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  assert set(got_metrics) == set(want_metrics)
  for name in want_metrics:
    np.testing.assert_allclose(got_metrics[name], want_metrics[name], rtol=1e-5, err_msg=name)
  if got_grads is None:
    return
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
    assert np.abs(np.asarray(w)).max() > 0
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def references(batch):
  return run_all(batch)


@pytest.mark.parametrize("axes", [dict(data=8), dict(data=4, fsdp=2)], ids=["data8", "data4_fsdp2"])
def test_sharded_losses_match_global(batch, references, axes):
  got = run_all(batch, sharding.make_mesh(**axes))
  for name in ("plain", "smoothed", "region"):
    assert_same(got[name], references[name])


@pytest.mark.parametrize("axes", [dict(data=2, model=4), dict(data=1, devices="first")],
                         ids=["data2_model4", "one_device"])
def test_sharded_loss_values_on_other_meshes(batch, references, axes):
  """A model axis stays automatic inside the shard_map; a 1-device mesh needs no collectives."""
  if axes.get("devices") == "first":
    axes = {**axes, "devices": jax.devices()[:1]}
  got = run_all(batch, sharding.make_mesh(**axes), with_grads=False)
  for name in ("plain", "smoothed", "region"):
    assert_same(got[name], references[name])
