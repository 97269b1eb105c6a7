"""Hugging Face Llama / Qwen3 import: logits and greedy decoding match transformers, the
tokenizer.json BPE tokenizer and its chat template match transformers' AutoTokenizer."""

import json
import os
import pickle

import numpy as np
import pytest

from pathflip_jax.convert import hf_checkpoint, hf_tokenizer, llama, safetensors_io
from pathflip_jax.models import decoder, sampling
from tests.test_gemma_import import _rel_err, _transformers, logits

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
tokenizers = pytest.importorskip("tokenizers")

VOCAB, PROMPT, NEW = 300, 10, 32
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             max_position_embeddings=256, rms_norm_eps=1e-5)
# Llama 3's scaling with a short original context, so that within 42 positions some frequencies
# are kept (wavelength < 8), some blended (8..64) and the rest divided by the factor.
_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10_000.0, "factor": 4.0,
                "low_freq_factor": 1.0, "high_freq_factor": 8.0,
                "original_max_position_embeddings": 64}
HF_CONFIGS = {
    "llama_llama3_rope_tied": ("llama", dict(tie_word_embeddings=True,
                                             rope_parameters=_LLAMA3_ROPE)),
    "llama_untied": ("llama", dict(tie_word_embeddings=False,
                                   rope_parameters={"rope_type": "default",
                                                    "rope_theta": 500.0})),
    "qwen3_tied": ("qwen3", dict(tie_word_embeddings=True)),
    "qwen3_untied": ("qwen3", dict(tie_word_embeddings=False)),
}
# A ChatML template in the style of SmolLM2's and Qwen3's: a default system turn, loop
# variables, raise_exception, a namespace and whitespace that trim_blocks/lstrip_blocks decide.
CHAT_TEMPLATE = """{%- set ns = namespace(turns=0) %}
{%- for message in messages %}
  {%- if message['role'] not in ['system', 'user', 'assistant'] %}
    {{- raise_exception('unknown role ' + message['role']) }}
  {%- endif %}
  {%- if loop.first and message['role'] != 'system' %}
<|im_start|>system
You are a pathology assistant.<|im_end|>
  {% endif %}
{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>' }}
  {% set ns.turns = ns.turns + 1 %}
{% endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- endif %}"""
MESSAGES = [{"role": "user", "content": "Describe the slide: nests of atypical cells.  "},
            {"role": "assistant", "content": "Invasive carcinoma with a desmoplastic stroma."},
            {"role": "user", "content": "Is there necrosis? {\"grade\": 3}"}]
CORPUS = ["The slide shows nests of atypical cells in a desmoplastic stroma.",
          "Necrosis is present; the tumour grade is 3 of 3.",
          "Describe the slide. Is there invasive carcinoma?"] * 20


def _write_tokenizer(path) -> None:
  """A byte-level BPE tokenizer.json (VOCAB ids, ChatML specials) and tokenizer_config.json."""
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=VOCAB, special_tokens=SPECIALS,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(CORPUS, trainer)
  assert tok.get_vocab_size() == VOCAB
  tok.save(str(path / "tokenizer.json"))
  with open(path / "tokenizer_config.json", "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None,
               "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
               "unk_token": {"__type": "AddedToken", "content": "<|endoftext|>",
                             "special": True},
               "chat_template": CHAT_TEMPLATE}, f)


def _hf_model(name: str):
  tf = _transformers()
  model_type, extra = HF_CONFIGS[name]
  config_cls, model_cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
                           "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM)}[model_type]
  torch.manual_seed(0)
  model = model_cls(config_cls(**_TINY, **extra, attn_implementation="eager")).eval()
  # Random norms and linears everywhere: a swapped norm, a wrong (1 + w) or a mis-split head
  # shows in the logits.
  with torch.no_grad():
    for _, p in model.named_parameters():
      p.normal_(1.0 if p.ndim == 1 else 0.0, 0.3 if p.ndim == 1 else p.shape[-1] ** -0.5)
  model.generation_config.eos_token_id = None  # generate exactly NEW tokens, as ours does
  model.generation_config.pad_token_id = 0
  return model


@pytest.fixture(scope="module", params=sorted(HF_CONFIGS))
def imported(request, tmp_path_factory):
  """(name, HF model, checkpoint dir, our model, our config, report)."""
  hf = _hf_model(request.param)
  path = tmp_path_factory.mktemp(request.param)
  hf.save_pretrained(path, safe_serialization=True)
  _write_tokenizer(path)
  model, config, report = llama.load_llama(path)
  return request.param, hf, path, model, config, report


TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, 16))


def test_config_and_family_switches(imported):
  name, hf, _, model, config, report = imported
  family = HF_CONFIGS[name][0]
  assert report.model_type == family
  assert not config.norm_plus_one and not config.embed_scale
  assert config.mlp_activation == "silu" and config.qk_norm == (family == "qwen3")
  tied = hf.config.tie_word_embeddings
  assert config.tie_embeddings == tied and (model.lm_head is None) == tied
  if name.startswith("llama_llama3"):
    assert (config.rope_type, config.rope_scale_factor, config.rope_original_max_len) == \
        ("llama3", 4.0, 64)
  assert decoder.count_params(model) == decoder.expected_params(config) == \
      sum(p.numel() for p in hf.parameters())


def test_logits_match_transformers(imported):
  name, hf, _, model, _, _ = imported
  with torch.no_grad():
    ref = hf(torch.as_tensor(TOKENS)).logits.numpy()
  err = _rel_err(logits(model, TOKENS), ref)
  print(f"{name}: max relative logit error {err:.2e}")
  assert err <= 1e-4, err


def test_greedy_generation_matches_transformers(imported):
  name, hf, _, model, _, _ = imported
  prompt = np.random.default_rng(1).integers(0, VOCAB, (2, PROMPT))
  with torch.no_grad():
    ref = hf.generate(torch.as_tensor(prompt), attention_mask=torch.ones(prompt.shape,
                                                                         dtype=torch.long),
                      max_new_tokens=NEW, do_sample=False).numpy()[:, PROMPT:]
  ids, lengths = sampling.generate(model, prompt, np.full((2,), PROMPT), max_new_tokens=NEW)
  np.testing.assert_array_equal(np.asarray(lengths), [NEW, NEW])
  np.testing.assert_array_equal(np.asarray(ids), ref)


@pytest.mark.parametrize("imported", ["qwen3_tied"], indirect=True)
def test_tokenizer_and_chat_template_match_transformers(imported):
  _, _, path, _, _, report = imported
  ours = report.tokenizer
  theirs = _transformers().AutoTokenizer.from_pretrained(path)
  for add_generation_prompt in (False, True):
    text = ours.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt)
    assert text == theirs.apply_chat_template(MESSAGES, tokenize=False,
                                              add_generation_prompt=add_generation_prompt)
    assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"]
  assert text.startswith("<|im_start|>system\nYou are a pathology assistant.<|im_end|>\n")
  assert text.endswith("{\"grade\": 3}<|im_end|>\n<|im_start|>assistant\n")
  assert ours.encode("<|im_start|>user")[0] == theirs.convert_tokens_to_ids("<|im_start|>")
  assert (ours.eos_id, ours.pad_id, ours.unk_id, ours.bos_id) == (
      theirs.eos_token_id, theirs.pad_token_id, theirs.unk_token_id, None)
  with pytest.raises(Exception, match="unknown role tool"):
    ours.apply_chat_template([{"role": "tool", "content": "x"}])

  # The project's tokenizer interface: <image> one id past the vocabulary, batches padded,
  # decode stops at EOS, and the wrapper survives pickling (grain workers).
  ids = ours.encode("<image> Describe the slide.", add_eos=True)
  assert ids[0] == ours.image_id == VOCAB and ours.num_embeddings == VOCAB + 1
  assert ours.decode(ids + [5, 6]) == "<image> Describe the slide."
  batch = ours.encode_batch(["Describe the slide.", "Necrosis"], 12, add_bos=False)
  assert batch.shape == (2, 12) and batch[1, -1] == ours.pad_id
  again = pickle.loads(pickle.dumps(ours))
  assert again.encode(CORPUS[0]) == ours.encode(CORPUS[0]) and again.sha256 == ours.sha256


def _copy(src, dst, names=("config.json", "model.safetensors")) -> None:
  for name in names:
    with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
      g.write(f.read())


@pytest.mark.parametrize("imported", ["llama_untied"], indirect=True)
def test_errors_name_file_and_field(imported, tmp_path):
  _, _, path, _, _, _ = imported
  _copy(path, tmp_path)
  config_file = str(tmp_path / "config.json")
  with open(config_file) as f:
    original = json.load(f)
  cases = [({"hidden_size": None}, "hidden_size"), ({"model_type": "mistral"}, "'mistral'"),
           ({"hidden_act": "gelu"}, "hidden_act"), ({"attention_bias": True}, "attention_bias"),
           ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "rope_type 'yarn'"),
           ({"rope_parameters": {"rope_type": "llama3", "factor": 2.0}},
            "rope_parameters.low_freq_factor")]
  for change, field in cases:
    with open(config_file, "w") as f:
      json.dump({**original, **change}, f)
    with pytest.raises(ValueError, match=field) as info:
      llama.load_llama(tmp_path)
    assert config_file in str(info.value)
  with open(config_file, "w") as f:
    json.dump(original, f)
  # An untied checkpoint without its lm_head is an error, not a silently tied model.
  weights = str(tmp_path / "model.safetensors")
  tensors = safetensors_io.load_file(weights)
  del tensors["lm_head.weight"]
  safetensors_io.save_file(tensors, weights)
  with pytest.raises(hf_checkpoint.ConversionError, match="missing key lm_head.weight"):
    llama.load_llama(tmp_path)


def test_chat_template_list_and_jinja_file(tmp_path):
  _write_tokenizer(tmp_path)
  config_file = tmp_path / "tokenizer_config.json"
  config = json.loads(config_file.read_text())
  config["chat_template"] = [{"name": "tool_use", "template": "tools"},
                             {"name": "default", "template": "{{ messages[0]['content'] }}!"}]
  config_file.write_text(json.dumps(config))
  tok = hf_tokenizer.load_hf_tokenizer(tmp_path, {"eos_token_id": [4, 5]})
  assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi!"
  assert tok.stop_ids == (tok.eos_id, 4, 5)
  (tmp_path / "chat_template.jinja").write_text("{{ bos_token is defined }}")
  assert hf_tokenizer.load_hf_tokenizer(tmp_path).apply_chat_template([]) == "False"
