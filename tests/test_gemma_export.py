"""Hugging Face Gemma export: round trips through load_gemma and transformers, errors by field."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pathflip_jax import tokenizer as tokenizer_lib
from pathflip_jax.convert import gemma, mapping, safetensors_io
from pathflip_jax.models import decoder

MODEL_TYPES = ("gemma", "gemma2", "gemma3_text")


def _params(model) -> dict:
  return {path: np.asarray(v.get_value()) for path, v in
          nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _assert_same_params(a, b) -> None:
  pa, pb = _params(a), _params(b)
  assert pa.keys() == pb.keys()
  for path in pa:
    assert pa[path].dtype == pb[path].dtype, path
    np.testing.assert_array_equal(pa[path], pb[path], err_msg=str(path))


def _random_decoder(config: decoder.DecoderConfig, seed: int = 0) -> decoder.Decoder:
  # Filling an abstract model skips the eager random init (tens of seconds of per-op compiles on
  # a slow CPU); random norms too, so a swapped norm shows.
  abstract = nnx.eval_shape(lambda: decoder.Decoder(config, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  values = {path: rng.normal(0.0, 0.3, v.shape).astype(np.float32)
            for path, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
  return mapping.fill(abstract, values, "test")


def _abstract(config: decoder.DecoderConfig) -> decoder.Decoder:
  return nnx.eval_shape(lambda: decoder.Decoder(config, rngs=nnx.Rngs(0)))


# ------------------------------------------------------------------ against transformers


@pytest.fixture(scope="module", params=MODEL_TYPES)
def exported(request, tmp_path_factory):
  """(model type, HF model, HF's own checkpoint dir, our import of it, its config, export dir)."""
  # The import test's small random models; importing it skips where transformers is absent.
  from tests import test_gemma_import  # noqa: PLC0415
  hf = test_gemma_import._hf_model(request.param)
  source = tmp_path_factory.mktemp(f"{request.param}_hf")
  hf.save_pretrained(source, safe_serialization=True)
  model, config, _ = gemma.load_gemma(source)
  out = tmp_path_factory.mktemp(f"{request.param}_export")
  files = gemma.save_gemma(model, out, model_type=request.param)
  assert files == [str(out / "model.safetensors"), str(out / "config.json")]
  return request.param, hf, source, model, config, out


def test_export_reimports_bit_identical(exported):
  model_type, _, source, model, config, out = exported
  again, again_config, report = gemma.load_gemma(out)
  assert report.model_type == model_type and again_config == config
  _assert_same_params(model, again)
  # Stronger: the tensors are transformers' own, key for key and bit for bit.
  theirs = safetensors_io.load_file(str(source / "model.safetensors"))
  ours = safetensors_io.load_file(str(out / "model.safetensors"))
  assert ours.keys() == theirs.keys()
  for key in ours:
    assert ours[key].dtype == np.float32
    np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


def test_transformers_loads_export(exported, tmp_path):
  model_type, hf, _, model, _, out = exported
  import torch  # noqa: PLC0415  (present: the fixture imported transformers)
  import transformers  # noqa: PLC0415
  loaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
  assert type(loaded) is type(hf)
  for field in ("layer_types", "sliding_window", "query_pre_attn_scalar", "rope_parameters",
                "attn_logit_softcapping", "final_logit_softcapping", "head_dim",
                "num_key_value_heads"):
    assert getattr(loaded.config, field, None) == getattr(hf.config, field, None), field
  tokens = torch.as_tensor(np.random.default_rng(0).integers(0, hf.config.vocab_size, (2, 12)))
  with torch.no_grad():
    ref, got = hf(tokens).logits.numpy(), loaded(tokens).logits.numpy()
  err = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
  assert err <= 1e-5, err

  # bfloat16: transformers reads the raw BF16 words as torch's own rounding of the weights.
  gemma.save_gemma(model, tmp_path, model_type=model_type, dtype="bfloat16")
  loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
  theirs = {k: v.to(torch.bfloat16).float() for k, v in hf.state_dict().items()}
  for key, value in loaded.state_dict().items():
    assert value.dtype == torch.bfloat16, key
    assert torch.equal(value.float(), theirs[key]), key


# ------------------------------------------------------------------ our own decoder


@pytest.fixture(scope="module")
def tiny():
  """A random tiny decoder (every switch on; vocabulary large enough for a real tokenizer) and a
  jitted logits function of its parameters (one compile for every model of the same shape)."""
  model = _random_decoder(decoder.get_config("tiny", vocab_size=320))
  graphdef, _ = nnx.split(model)
  forward = jax.jit(lambda state, tokens, positions: nnx.merge(graphdef, state)(tokens,
                                                                                 positions)[0])
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 320, (2, 10)))
  positions = jnp.broadcast_to(jnp.arange(10), (2, 10))
  return model, lambda m: np.asarray(forward(nnx.split(m)[1], tokens, positions))


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> str:
  corpus = [f"slide {i}: tumour cells, {i % 7} mitoses per field; stroma {i * 3}%." for i in
            range(50)]
  return tokenizer_lib.train(corpus, str(tmp_path_factory.mktemp("tok") / "tok"), vocab_size=300)


def test_tiny_decoder_round_trip_as_gemma3(tiny, spm_model, tmp_path):
  model, logits = tiny
  files = gemma.save_gemma(model, tmp_path, model_type="gemma3_text", tokenizer_path=spm_model,
                           extra_config={"transformers_version": "5.0.0"})
  assert files[-1] == str(tmp_path / "tokenizer.model")
  with open(tmp_path / "config.json") as f:
    hf_config = json.load(f)
  tok = tokenizer_lib.Tokenizer(spm_model)
  assert (hf_config["pad_token_id"], hf_config["eos_token_id"], hf_config["bos_token_id"]) == \
      (tok.pad_id, tok.eos_id, tok.bos_id)
  assert hf_config["transformers_version"] == "5.0.0"
  again, config, report = gemma.load_gemma(tmp_path)
  assert config == model.config
  assert report.tokenizer is not None and report.tokenizer.sha256 == tok.sha256
  _assert_same_params(model, again)
  np.testing.assert_array_equal(logits(again), logits(model))


def test_bfloat16_export(tiny, tmp_path):
  model, logits = tiny
  gemma.save_gemma(model, tmp_path, model_type="gemma3_text", dtype=jnp.bfloat16)
  header, metadata, _ = safetensors_io.read_header(str(tmp_path / "model.safetensors"))
  assert {entry["dtype"] for entry in header.values()} == {"BF16"}
  assert metadata == {"format": "pt"}
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["dtype"] == "bfloat16"
  again, config, _ = gemma.load_gemma(tmp_path)
  assert config == model.config
  ours, back = _params(model), _params(again)
  for path, value in ours.items():
    rounded = value.astype(jnp.bfloat16).astype(np.float32)  # round to nearest even
    np.testing.assert_array_equal(back[path], rounded, err_msg=str(path))
    assert np.max(np.abs(back[path] - value)) <= 2 ** -8 * np.max(np.abs(value))
  ref = logits(model)
  assert np.max(np.abs(logits(again) - ref)) <= 0.05 * np.max(np.abs(ref))


def test_sharded_export_and_stale_shards(tiny, tmp_path):
  model, logits = tiny
  files = gemma.save_gemma(model, tmp_path, model_type="gemma3_text",
                           max_shard_bytes=40_000)
  shards = [f for f in files if f.endswith(".safetensors")]
  assert len(shards) > 2 and os.path.basename(shards[0]) == \
      f"model-00001-of-{len(shards):05d}.safetensors"
  for shard in shards:  # a tensor over the limit gets a shard of its own
    tensors = safetensors_io.load_file(shard)
    assert len(tensors) == 1 or sum(t.nbytes for t in tensors.values()) <= 40_000
  with open(tmp_path / "model.safetensors.index.json") as f:
    index = json.load(f)
  assert sorted(set(index["weight_map"].values())) == [os.path.basename(s) for s in shards]
  assert index["metadata"]["total_size"] == 4 * decoder.count_params(model)
  again, config, report = gemma.load_gemma(tmp_path)
  assert len(report.weight_files) == len(shards) and config == model.config
  _assert_same_params(model, again)
  # Saving unsharded into the same directory removes the shards and the index.
  gemma.save_gemma(model, tmp_path, model_type="gemma3_text")
  assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
  np.testing.assert_array_equal(logits(gemma.load_gemma(tmp_path)[0]), logits(model))


def test_published_configs_round_trip():
  for name, model_type in (("gemma_2b", "gemma"), ("gemma2_2b", "gemma2"),
                           ("gemma3_1b", "gemma3_text"), ("gemma3_4b", "gemma3_text")):
    config = decoder.get_config(name)
    assert gemma.gemma_config(gemma.gemma_hf_config(config, model_type)) == config, name
  # Settings with no effect come back in one form.
  config = decoder.get_config("gemma2_2b", attention_pattern=(decoder.LOCAL, decoder.GLOBAL) * 2,
                              query_scale=256 ** -0.5)
  assert gemma.gemma_config(gemma.gemma_hf_config(config, "gemma2")) == \
      decoder.get_config("gemma2_2b")
  config = decoder.get_config("gemma_2b", sliding_window=64, rope_local_base=5.0)
  assert gemma.gemma_config(gemma.gemma_hf_config(config, "gemma")) == \
      decoder.get_config("gemma_2b")


@pytest.mark.parametrize("model_type, overrides, kwargs, fields", [
    ("gemma", {}, {}, ["qk_norm", "post_norms", "attn_logit_softcap", "final_logit_softcap",
                       "attention_pattern"]),
    ("gemma2", {"qk_norm": False}, {}, ["rope_local_base"]),
    ("gemma2", {"qk_norm": False, "rope_local_base": None, "rope_scale_factor": 2.0}, {},
     ["rope_scale_factor"]),
    ("gemma2", {"qk_norm": False, "post_norms": False, "rope_local_base": None}, {},
     ["post_norms"]),
    ("gemma3_text", {"qk_norm": False}, {}, ["qk_norm"]),
    ("gemma3_text", {"query_scale": 0.3}, {}, ["query_scale"]),
    ("gemma", {"qk_norm": False, "post_norms": False, "attn_logit_softcap": None,
               "final_logit_softcap": None, "attention_pattern": (decoder.GLOBAL,),
               "query_scale": 24 ** -0.5}, {}, ["query_scale"]),
    ("llama", {}, {}, ["model_type 'llama'"]),
    ("gemma3_text", {}, {"dtype": "float16"}, ["dtype 'float16'"]),
    ("gemma3_text", {}, {"extra_config": {"hidden_size": 48}}, ["width: 32 -> 48"]),
    ("gemma3_text", {}, {"extra_config": {"hidden_activation": "relu"}},
     ["hidden_activation"]),
])
def test_inexpressible_config_names_the_field(model_type, overrides, kwargs, fields, tmp_path):
  model = _abstract(decoder.get_config("tiny", **overrides))
  out = tmp_path / "out"
  with pytest.raises(ValueError) as info:
    gemma.save_gemma(model, out, model_type=model_type, **kwargs)
  for field in fields:
    assert field in str(info.value)
  assert not out.exists()  # checked before anything is written


def test_unmapped_parameter_and_large_tokenizer_raise(spm_model, tmp_path):
  model = _abstract(decoder.get_config("tiny", vocab_size=320))
  model.extra = nnx.Param(jnp.zeros((3,)))  # as an unmerged LoRA adapter would be
  with pytest.raises(gemma.ConversionError, match="extra"):
    gemma.save_gemma(model, tmp_path / "a", model_type="gemma3_text")
  with pytest.raises(ValueError, match="vocab_size is 64"):
    gemma.save_gemma(_abstract(decoder.get_config("tiny")), tmp_path / "b",
                     model_type="gemma3_text", tokenizer_path=spm_model)
  assert not os.listdir(tmp_path)
