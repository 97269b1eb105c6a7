"""Hugging Face Gemma import: logits and greedy decoding match transformers, strict key checks."""

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pathflip_jax.convert import gemma, safetensors_io
from pathflip_jax.models import decoder, sampling

# Skips collection only where transformers is absent; requirements-test.txt installs it.
pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

VOCAB, PROMPT, NEW = 128, 10, 8
_TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4,
             head_dim=16, max_position_embeddings=256)
# Windows shorter than the sequences, so local layers see fewer keys than global ones; query
# scalars other than head_dim, and soft-caps small enough to bend the tiny model's logits.
HF_CONFIGS = {
    "gemma": dict(num_hidden_layers=2, num_key_value_heads=1, rope_theta=500.0),
    "gemma2": dict(num_hidden_layers=4, num_key_value_heads=2, sliding_window=5,
                   query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
                   final_logit_softcapping=3.0),
    "gemma3_text": dict(num_hidden_layers=4, num_key_value_heads=2, sliding_window=5,
                        query_pre_attn_scalar=24,
                        layer_types=["sliding_attention"] * 3 + ["full_attention"],
                        rope_parameters={
                            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                            "full_attention": {"rope_type": "linear", "rope_theta": 10_000.0,
                                               "factor": 4.0}}),
}


def _transformers():
  # Where the offline torchvision wheel (a CUDA build) cannot load its ops next to CPU torch,
  # transformers' import of it dies; import_timm loads torchvision leniently first.
  from benchmarks.patch_encoder import import_timm  # noqa: PLC0415
  import_timm()
  import transformers  # noqa: PLC0415
  return transformers


def _hf_model(model_type: str):
  tf = _transformers()
  config_cls, model_cls = {
      "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM),
      "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM),
      "gemma3_text": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM),
  }[model_type]
  torch.manual_seed(0)
  config = config_cls(**_TINY, **HF_CONFIGS[model_type], attn_implementation="eager")
  model = model_cls(config).eval()
  # HF initialises norms to 0 and linears small; random values everywhere make a swapped norm
  # or a mis-split head show in the logits.
  with torch.no_grad():
    for _, p in model.named_parameters():
      p.normal_(0.0, 0.3 if p.ndim == 1 else p.shape[-1] ** -0.5)
  model.generation_config.eos_token_id = None  # generate exactly NEW tokens, as ours does
  model.generation_config.pad_token_id = 0
  return model


@pytest.fixture(scope="module", params=sorted(HF_CONFIGS))
def imported(request, tmp_path_factory):
  """(model type, HF model, checkpoint dir, our model, our config)."""
  hf = _hf_model(request.param)
  path = tmp_path_factory.mktemp(request.param)
  hf.save_pretrained(path, safe_serialization=True)
  model, config, report = gemma.load_gemma(path)
  assert report.model_type == request.param
  assert [os.path.basename(f) for f in report.weight_files] == ["model.safetensors"]
  assert report.tokenizer is None
  return request.param, hf, path, model, config


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, tokens_bt):
  positions_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
  return nnx.merge(graphdef, state)(tokens_bt, positions_bt)[0]


def logits(model, tokens) -> np.ndarray:
  """Logits of a full pass: one compilation per model structure (eager ops each compile)."""
  return np.asarray(_logits(*nnx.split(model), jnp.asarray(tokens)))


TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, 16))


def _rel_err(ours, ref) -> float:
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def test_config_mapping(imported):
  model_type, _, _, _, config = imported
  if model_type == "gemma":
    assert config.attention_pattern == (decoder.GLOBAL,) and not config.post_norms
    assert config.rope_base == 500.0 and config.query_scale is None
  elif model_type == "gemma2":
    assert config.attention_pattern == (decoder.LOCAL, decoder.GLOBAL)
    assert (config.attn_logit_softcap, config.final_logit_softcap) == (5.0, 3.0)
    assert config.sliding_window == 5 and config.post_norms and not config.qk_norm
  else:
    assert config.attention_pattern == (decoder.LOCAL,) * 3 + (decoder.GLOBAL,)
    assert (config.rope_base, config.rope_local_base, config.rope_scale_factor) == \
        (10_000.0, 100.0, 4.0)
    assert config.qk_norm and config.post_norms and config.final_logit_softcap is None
  if model_type != "gemma":
    assert config.query_scale == pytest.approx(24 ** -0.5)


def test_logits_match_transformers(imported):
  _, hf, _, model, _ = imported
  with torch.no_grad():
    ref = hf(torch.as_tensor(TOKENS)).logits.numpy()
  err = _rel_err(logits(model, TOKENS), ref)
  print(f"max relative logit error: {err:.2e}")
  assert err <= 1e-4, err


def test_greedy_generation_matches_transformers(imported):
  _, hf, _, model, _ = imported
  prompt = np.random.default_rng(1).integers(0, VOCAB, (2, PROMPT))
  with torch.no_grad():
    ref = hf.generate(torch.as_tensor(prompt), attention_mask=torch.ones(prompt.shape,
                                                                         dtype=torch.long),
                      max_new_tokens=NEW, do_sample=False).numpy()[:, PROMPT:]
  ids, lengths = sampling.generate(model, prompt, np.full((2,), PROMPT), max_new_tokens=NEW)
  np.testing.assert_array_equal(np.asarray(lengths), [NEW, NEW])
  np.testing.assert_array_equal(np.asarray(ids), ref)


def test_sharded_checkpoint_loads_the_same(imported, tmp_path):
  model_type, _, path, model, _ = imported
  tensors = safetensors_io.load_file(os.path.join(path, "model.safetensors"))
  keys = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": keys[::2],
            "model-00002-of-00002.safetensors": keys[1::2]}
  for name, part in shards.items():
    safetensors_io.save_file({k: tensors[k] for k in part}, str(tmp_path / name))
  with open(tmp_path / "model.safetensors.index.json", "w") as f:
    json.dump({"metadata": {}, "weight_map": {k: n for n, part in shards.items() for k in part}},
              f)
  shutil.copy(os.path.join(path, "config.json"), tmp_path / "config.json")
  sharded, _, report = gemma.load_gemma(tmp_path)
  assert len(report.weight_files) == 2
  np.testing.assert_array_equal(logits(sharded, TOKENS), logits(model, TOKENS))


def _copy_checkpoint(src, dst) -> None:
  for name in ("config.json", "model.safetensors"):
    shutil.copy(os.path.join(src, name), os.path.join(dst, name))


@pytest.mark.parametrize("imported", ["gemma2"], indirect=True)
def test_missing_weight_names_file_and_key(imported, tmp_path):
  _, _, path, _, _ = imported
  _copy_checkpoint(path, tmp_path)
  file = str(tmp_path / "model.safetensors")
  tensors = safetensors_io.load_file(file)
  del tensors["model.layers.1.self_attn.k_proj.weight"]
  tensors["model.layers.1.extra.weight"] = np.zeros((3,), np.float32)
  safetensors_io.save_file(tensors, file)
  with pytest.raises(gemma.ConversionError) as info:
    gemma.load_gemma(tmp_path)
  message = str(info.value)
  assert "missing key layers.1.self_attn.k_proj.weight (expected shape (32, 64))" in message
  assert file in message
  assert "unexpected key layers.1.extra.weight" in message


@pytest.mark.parametrize("imported", ["gemma3_text"], indirect=True)
def test_config_errors_name_file_and_field(imported, tmp_path):
  _, _, path, _, _ = imported
  _copy_checkpoint(path, tmp_path)
  config_file = str(tmp_path / "config.json")
  with open(config_file) as f:
    original = json.load(f)
  cases = [({"head_dim": None}, "head_dim"), ({"model_type": "llama"}, "model_type 'llama'"),
           ({"hidden_activation": "relu"}, "hidden_activation"),
           ({"tie_word_embeddings": False}, "tie_word_embeddings"),
           ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "rope_type 'yarn'")]
  for change, field in cases:
    with open(config_file, "w") as f:
      json.dump({**original, **change}, f)
    with pytest.raises(ValueError, match=field) as info:
      gemma.load_gemma(tmp_path)
    assert config_file in str(info.value)


def test_legacy_config_layout():
  # Gemma 3 4B's text config as published (before transformers 5's rope_parameters).
  hf = {"model_type": "gemma3_text", "hidden_size": 2560, "num_hidden_layers": 34,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
        "intermediate_size": 10240, "vocab_size": 262_144, "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "sliding_window": 1024, "sliding_window_pattern": 6, "query_pre_attn_scalar": 256,
        "max_position_embeddings": 131_072, "rms_norm_eps": 1e-6,
        "hidden_activation": "gelu_pytorch_tanh", "final_logit_softcapping": None,
        "attn_logit_softcapping": None}
  assert gemma.gemma_config(hf) == decoder.get_config("gemma3_4b")
  gemma2 = {"model_type": "gemma2", "hidden_size": 2304, "num_hidden_layers": 26,
            "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
            "intermediate_size": 9216, "vocab_size": 256_000, "rope_theta": 10_000.0,
            "sliding_window": 4096, "query_pre_attn_scalar": 256,
            "max_position_embeddings": 8192, "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0, "hidden_act": "gelu_pytorch_tanh"}
  assert gemma.gemma_config(gemma2) == decoder.get_config("gemma2_2b")
