"""LoRA adapters of the decoder: init, targets, dropout, merging, PEFT export/import, optimizer."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from pathflip_jax import optim
from pathflip_jax.convert import gemma, gemma_lora, safetensors_io
from pathflip_jax.models import decoder, lora as lora_lib

TINY = decoder.get_config("tiny")
ALL = lora_lib.LoraConfig(rank=2, alpha=3.0, dropout=0.25, targets=lora_lib.LORA_TARGETS)
# Slow XLA:CPU: compile each jitted function at the lowest backend optimisation level.
FAST = {"xla_backend_optimization_level": 0}
T = 7


def tokens() -> jax.Array:
  return jnp.asarray(np.random.default_rng(1).integers(0, TINY.vocab_size, (2, T)))


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST)
def _logits(graphdef, state, tokens_bt, rng):
  """Logits without and with a dropout key: one compilation per model structure."""
  model = nnx.merge(graphdef, state)
  positions_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
  return model(tokens_bt, positions_bt)[0], model(tokens_bt, positions_bt, dropout_rng=rng)[0]


def logits(model, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """(logits without dropout key, logits with ``jax.random.key(seed)``)."""
  plain, with_key = _logits(*nnx.split(model), tokens(), jax.random.key(seed))
  return np.asarray(plain), np.asarray(with_key)


@functools.cache
def base() -> decoder.Decoder:
  return decoder.Decoder(TINY, rngs=nnx.Rngs(0))


@functools.cache
def fresh() -> decoder.Decoder:
  """Same seed as ``base``, every projection adapted."""
  return decoder.Decoder(TINY, rngs=nnx.Rngs(0), lora=ALL)


@functools.cache
def trained() -> decoder.Decoder:
  """``fresh`` with random non-zero ``b`` (as after some training)."""
  model = nnx.clone(fresh())
  rng = np.random.default_rng(0)
  for adapter in lora_lib.lora_adapters(model).values():
    adapter.b.set_value(jnp.asarray(rng.normal(0, 0.3, adapter.b.shape), jnp.float32))
  return model


@functools.cache
def merged() -> decoder.Decoder:
  return lora_lib.merge_lora(trained())


def param_dict(model) -> dict[str, np.ndarray]:
  state = nnx.state(model, nnx.Param)
  return {"/".join(map(str, path)): np.asarray(v.get_value())
          for path, v in nnx.to_flat_state(state)}


# --- structure --------------------------------------------------------------------------------


def test_fresh_adapters_leave_logits_unchanged():
  want, base_with_key = logits(base())
  np.testing.assert_array_equal(base_with_key, want)  # no adapters: a dropout key is ignored
  got, with_key = logits(fresh())
  np.testing.assert_allclose(got, want, atol=1e-6)
  # Dropout acts on the adapters' inputs only: with b = 0 a dropout key changes nothing.
  np.testing.assert_array_equal(with_key, got)
  params = param_dict(fresh())
  for name, value in params.items():
    if name.endswith("_lora/b"):
      assert not value.any(), name
    elif name.endswith("_lora/a"):  # PEFT's init: uniform in +-1/sqrt(fan_in)
      fan_in = value[..., 0].size
      assert 0 < np.abs(value).max() <= fan_in ** -0.5, name
  # Adding adapters leaves the base parameters' initialisation as it is.
  for name, value in param_dict(base()).items():
    np.testing.assert_array_equal(params[name], value, err_msg=name)


def test_only_targeted_projections_get_adapters():
  lora = lora_lib.LoraConfig(rank=3, alpha=1.0, targets=("q_proj", "up_proj"))
  model = nnx.eval_shape(lambda: decoder.Decoder(TINY, rngs=nnx.Rngs(0), lora=lora))
  adapters = {name: v for name, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
              if "lora" in "/".join(map(str, name))}
  assert sorted("/".join(map(str, name)) for name in adapters) == [
      f"layers/{i}/{module}/{target}_lora/{p}" for i in range(TINY.depth)
      for module, target in (("attention", "q_proj"), ("mlp", "up_proj")) for p in "ab"]
  assert model.layers[0].mlp.gate_proj_lora is None
  assert model.layers[1].attention.v_proj_lora is None


def test_adapter_shapes_and_logical_axes():
  model = nnx.eval_shape(lambda: decoder.Decoder(TINY, rngs=nnx.Rngs(0), lora=ALL))
  d, h, k, c, f, r = (TINY.width, TINY.num_heads, TINY.num_kv_heads, TINY.head_dim,
                      TINY.mlp_width, ALL.rank)
  expected = {  # target: (a shape, a axes, b shape, b axes), the axes those of the kernel
      "q_proj": ((d, r), ("embed", None), (r, h, c), (None, "heads", "kv")),
      "k_proj": ((d, r), ("embed", None), (r, k, c), (None, None, "kv")),
      "v_proj": ((d, r), ("embed", None), (r, k, c), (None, None, "kv")),
      "o_proj": ((h, c, r), ("heads", "kv", None), (r, d), (None, "embed")),
      "gate_proj": ((d, r), ("embed", None), (r, f), (None, "mlp")),
      "up_proj": ((d, r), ("embed", None), (r, f), (None, "mlp")),
      "down_proj": ((f, r), ("mlp", None), (r, d), (None, "embed")),
  }
  adapters = lora_lib.lora_adapters(model)
  assert list(adapters) == [(i, t) for i in range(TINY.depth) for t in lora_lib.LORA_TARGETS]
  for (_, target), adapter in adapters.items():
    a_shape, a_axes, b_shape, b_axes = expected[target]
    assert (adapter.a.shape, adapter.b.shape) == (a_shape, b_shape), target
    assert adapter.a.get_metadata()["out_sharding"] == a_axes, target
    assert adapter.b.get_metadata()["out_sharding"] == b_axes, target
  per_layer = sum(np.prod(a) + np.prod(b) for a, _, b, _ in expected.values())
  assert decoder.count_params(model) == decoder.expected_params(TINY) + TINY.depth * per_layer


@pytest.mark.parametrize("fields,match", [
    (dict(rank=0), "rank"),
    (dict(rank=2.0), "rank"),
    (dict(alpha=0.0), "alpha"),
    (dict(dropout=1.0), "dropout"),
    (dict(dropout=-0.1), "dropout"),
    # The message lists the known names.
    (dict(targets=("q_proj", "qkv")), r"from q_proj, k_proj, .*, down_proj; unknown: \['qkv'\]"),
    (dict(targets=()), "targets"),
    (dict(targets=("q_proj", "q_proj")), "distinct"),
    (dict(targets="q_proj"), "sequence"),
])
def test_bad_lora_config(fields, match):
  with pytest.raises(ValueError, match=match):
    lora_lib.LoraConfig(**{**dict(rank=2, alpha=4.0), **fields})


def test_lora_config_defaults_and_scale():
  lora = lora_lib.LoraConfig(rank=4, alpha=8, targets=["q_proj", "down_proj"])
  assert lora.targets == ("q_proj", "down_proj") and lora.scale == 2.0
  assert lora_lib.LoraConfig(rank=1, alpha=1.0).targets == ("q_proj", "v_proj")  # PEFT's default


# --- forward, dropout, merging ----------------------------------------------------------------


@functools.cache
def trained_logits() -> tuple[np.ndarray, np.ndarray]:
  return logits(trained())


def test_dropout_only_with_a_key():
  plain, key1 = trained_logits()
  plain_again, key1_again = logits(trained())
  np.testing.assert_array_equal(plain_again, plain)  # no key: deterministic
  np.testing.assert_array_equal(key1_again, key1)  # a key gives one mask
  assert np.abs(key1 - plain).max() > 1e-3  # dropout on the adapters' inputs changes logits
  _, key2 = logits(trained(), seed=2)
  assert np.abs(key2 - key1).max() > 1e-3


def test_merged_model_matches_adapted_model():
  plain = trained_logits()[0]
  base_logits, _ = logits(base())
  merged_logits, _ = logits(merged())
  assert np.abs(plain - base_logits).max() > 1e-2  # the adapters matter
  np.testing.assert_allclose(merged_logits, plain, atol=2e-5, rtol=1e-5)
  # The merged model has exactly the base model's parameters (no adapters) ...
  merged_params, base_params = param_dict(merged()), param_dict(base())
  assert sorted(merged_params) == sorted(base_params)
  assert merged().lora is None and not lora_lib.lora_adapters(merged())
  # ... and the original keeps its adapters.
  assert len(lora_lib.lora_adapters(trained())) == TINY.depth * len(lora_lib.LORA_TARGETS)
  with pytest.raises(ValueError, match="no LoRA adapters"):
    lora_lib.merge_lora(base())


# --- PEFT export / import ---------------------------------------------------------------------


def _hf_key(i: int, target: str, factor: str) -> str:
  module = "self_attn" if target in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
  return f"base_model.model.model.layers.{i}.{module}.{target}.lora_{factor}.weight"


def _peft_shapes(target: str) -> tuple[tuple[int, int], tuple[int, int]]:
  """(lora_A, lora_B) shapes of torch Linear layers: A [r, in], B [out, r]."""
  d, h, k, c, f, r = (TINY.width, TINY.num_heads, TINY.num_kv_heads, TINY.head_dim,
                      TINY.mlp_width, ALL.rank)
  in_out = {"q_proj": (d, h * c), "k_proj": (d, k * c), "v_proj": (d, k * c),
            "o_proj": (h * c, d), "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}
  n_in, n_out = in_out[target]
  return (r, n_in), (n_out, r)


def _hf_weight(model: decoder.Decoder, i: int, target: str) -> np.ndarray:
  """The Hugging Face [out, in] weight of a projection, from the model's kernel."""
  attention, mlp = model.layers[i].attention, model.layers[i].mlp
  d = TINY.width
  if target in ("q_proj", "k_proj", "v_proj"):
    return np.asarray(getattr(attention, f"{target[0]}_kernel")[...]).reshape(d, -1).T
  if target == "o_proj":
    return np.asarray(attention.o_kernel[...]).reshape(-1, d).T
  if target == "down_proj":
    return np.asarray(mlp.down[...]).T
  return np.asarray(mlp.gate_up[...])[:, 0 if target == "gate_proj" else 1].T


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  path = tmp_path_factory.mktemp("adapter")
  gemma_lora.save_lora_adapters(trained(), path, base_model_name_or_path="google/gemma-3-1b-pt")
  return path


def test_export_is_in_peft_layout(exported):
  config = json.loads((exported / "adapter_config.json").read_text())
  assert {k: config[k] for k in ("peft_type", "r", "lora_alpha", "lora_dropout", "target_modules",
                                 "bias", "task_type", "base_model_name_or_path")} == {
      "peft_type": "LORA", "r": 2, "lora_alpha": 3.0, "lora_dropout": 0.25,
      "target_modules": list(lora_lib.LORA_TARGETS), "bias": "none", "task_type": "CAUSAL_LM",
      "base_model_name_or_path": "google/gemma-3-1b-pt"}
  tensors = safetensors_io.load_file(str(exported / "adapter_model.safetensors"))
  expected = {}
  for i in range(TINY.depth):
    for target in lora_lib.LORA_TARGETS:
      a_shape, b_shape = _peft_shapes(target)
      expected[_hf_key(i, target, "A")] = a_shape
      expected[_hf_key(i, target, "B")] = b_shape
  assert {k: v.shape for k, v in tensors.items()} == expected
  assert all(v.dtype == np.float32 for v in tensors.values())
  assert gemma_lora.read_lora_config(exported) == ALL


def test_export_applied_to_hf_weights_gives_merged_kernels(exported):
  """W_hf + scale * B @ A, all in Hugging Face's layout, is the merged model's weight; and the
  Gemma importer maps it to the merged kernel (so PEFT's merge_and_unload agrees)."""
  tensors = safetensors_io.load_file(str(exported / "adapter_model.safetensors"))
  entries = gemma._mapping(TINY, "gemma3_text")
  for i in range(TINY.depth):
    for target in lora_lib.LORA_TARGETS:
      lora_a, lora_b = tensors[_hf_key(i, target, "A")], tensors[_hf_key(i, target, "B")]
      want = _hf_weight(merged(), i, target)
      np.testing.assert_allclose(_hf_weight(base(), i, target) + ALL.scale * lora_b @ lora_a,
                                 want, atol=1e-6, err_msg=f"{i} {target}")
      # _hf_weight is the inverse of the importer's transform.
      module = "self_attn" if target in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
      entry = entries[f"layers.{i}.{module}.{target}.weight"]
      *where, last = entry.path
      half = last if isinstance(last, int) else None  # gate/up: index on gate_up's axis 1
      node = nnx.state(merged())
      for part in (where if half is not None else entry.path):
        node = node[part]
      kernel = np.asarray(node.get_value())
      kernel = kernel if half is None else kernel[:, half]
      np.testing.assert_array_equal(entry.transform(want), kernel, err_msg=f"{i} {target}")


def test_export_load_round_trip(exported):
  model = gemma_lora.load_lora_adapters(nnx.clone(fresh()), exported)
  got, want = param_dict(model), param_dict(trained())
  assert sorted(got) == sorted(want)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_load_errors(exported, tmp_path):
  abstract = lambda lora: nnx.eval_shape(  # noqa: E731
      lambda: decoder.Decoder(TINY, rngs=nnx.Rngs(0), lora=lora))
  with pytest.raises(ValueError, match=r"adapter_config\.json: rank 2 differs.* 4"):
    gemma_lora.load_lora_adapters(abstract(lora_lib.LoraConfig(rank=4, alpha=3.0,
                                                              targets=ALL.targets)), exported)
  with pytest.raises(ValueError, match="target_modules"):
    gemma_lora.load_lora_adapters(abstract(lora_lib.LoraConfig(rank=2, alpha=3.0)), exported)
  with pytest.raises(ValueError, match="no LoRA adapters"):
    gemma_lora.load_lora_adapters(abstract(None), exported)

  # A missing and an unexpected tensor: both named, with the file.
  (tmp_path / "adapter_config.json").write_text((exported / "adapter_config.json").read_text())
  tensors = safetensors_io.load_file(str(exported / "adapter_model.safetensors"))
  missing = _hf_key(1, "o_proj", "B")
  tensors["base_model.model.model.layers.9.mlp.up_proj.lora_A.weight"] = tensors.pop(missing)
  safetensors_io.save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
  with pytest.raises(gemma_lora.ConversionError,
                     match=rf"(?s)missing key {missing}.*adapter_model\.safetensors.*"
                           r"unexpected key .*layers\.9\.mlp\.up_proj"):
    gemma_lora.load_lora_adapters(abstract(ALL), tmp_path)

  config = json.loads((exported / "adapter_config.json").read_text())
  (tmp_path / "adapter_config.json").write_text(json.dumps(dict(config, use_dora=True)))
  with pytest.raises(ValueError, match="use_dora"):
    gemma_lora.read_lora_config(tmp_path)


# --- optimizer --------------------------------------------------------------------------------


def test_optimizer_trains_only_adapters():
  _, params, _ = nnx.split(trained(), nnx.Param, ...)
  config = ml_collections.ConfigDict(dict(lr=0.1, weight_decay=0.1, trainable=("lora",)))
  tx, _ = optim.make_optimizer(config, total_steps=10)
  grads = jax.tree.map(lambda x: jnp.ones_like(x), params)

  @functools.partial(jax.jit, compiler_options=FAST)
  def one_step(params, grads):
    updates, _ = tx.update(grads, tx.init(params), params)
    return optax.apply_updates(params, updates)

  before = jax.tree.map(np.asarray, params)
  after = jax.tree.map(np.asarray, one_step(params, grads))
  paths = jax.tree.leaves(optim.param_paths(params))
  assert sum("lora" in p for p in paths) == 2 * TINY.depth * len(lora_lib.LORA_TARGETS)
  for path, old, new in zip(paths, jax.tree.leaves(before), jax.tree.leaves(after)):
    if "lora" in path:
      assert not np.allclose(old, new), path
    else:
      np.testing.assert_array_equal(old, new, err_msg=path)
  # The trainer stops gradients with the same mask.
  mask = optim.trainable_mask_from_config(params, config)
  assert [p for p, m in zip(paths, jax.tree.leaves(mask)) if m] == [p for p in paths
                                                                      if "lora" in p]

  tx, _ = optim.make_optimizer(ml_collections.ConfigDict(dict(trainable=("lroa",))), 10)
  with pytest.raises(ValueError, match=r"optim\.trainable.*lroa"):
    tx.init(params)
