"""BERT-family import into the Q-Former: hidden states match transformers' BertModel layer by
layer, the WordPiece tokenizer gives transformers' ids, and bad checkpoints are clear errors."""

import json
import os
import pickle
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pathflip_jax import tokenizer as tokenizer_lib
from pathflip_jax.convert import bert, safetensors_io
from pathflip_jax.models import qformer

# Skips collection only where transformers is absent; requirements-test.txt installs it.
pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

# A WordPiece vocabulary with cased and accented entries, so lower-casing and accent stripping
# change the ids.
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "The", "cell", "##s", "tumour",
         "Tumour", "is", "are", ".", ",", ";", "(", ")", "-", "cafe", "café", "caf", "##é", "##e",
         "necrosis", "of", "in", "stroma", "gland", "##ular", "a", "b", "##c", "no", "seen",
         "grade", "2", "3", "%", "hé", "he", "##mat", "##oxylin", "naïve", "naive",
         "über"]
SENTENCES = ["The cells of the tumour are seen.", "Necrosis (grade 3) in stroma; café, CAFE",
             "Glandular cells: naïve HÉmatoxylin über-grade 2%", "a", "Tumour-cells, no necrosis."]
WIDTH, LAYERS, HEADS, HIDDEN, POSITIONS = 64, 2, 4, 128, 32


def _transformers():
  # Where the offline torchvision wheel (a CUDA build) cannot load its ops next to CPU torch,
  # transformers' import of it dies; import_timm loads torchvision leniently first.
  from benchmarks.patch_encoder import import_timm  # noqa: PLC0415
  import_timm()
  import transformers  # noqa: PLC0415
  return transformers


def save_tiny_bert(directory, seed: int = 0):
  """A random tiny BertModel and its WordPiece tokenizer saved as a Hugging Face checkpoint;
  returns the torch model (eval mode)."""
  tf = _transformers()
  os.makedirs(directory, exist_ok=True)
  vocab_file = os.path.join(directory, "vocab.txt")
  with open(vocab_file, "w", encoding="utf-8") as f:
    f.write("\n".join(VOCAB) + "\n")
  config = tf.BertConfig(vocab_size=len(VOCAB), hidden_size=WIDTH, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, intermediate_size=HIDDEN,
                         max_position_embeddings=POSITIONS, attn_implementation="eager")
  torch.manual_seed(seed)
  model = tf.BertModel(config).eval()
  with torch.no_grad():
    # HF starts norms at 1/0 and biases at 0: random values everywhere make a swapped norm or
    # a dropped bias visible.
    for parameter in model.parameters():
      parameter.add_(torch.randn_like(parameter) * 0.1)
  model.save_pretrained(directory)
  tf.BertTokenizerFast(vocab=vocab_file, do_lower_case=True).save_pretrained(directory)
  return model


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("bert"))
  return directory, save_tiny_bert(directory)


def _imported(directory):
  checkpoint = bert.load_bert(directory)
  config = qformer.QFormerConfig(feature_dim=12, num_queries=4, **checkpoint.qformer_fields)
  model = qformer.QFormer(config, rngs=nnx.Rngs(0))
  left = bert.assign(model, checkpoint.params)
  return checkpoint, model, left


def _relative(ours, reference) -> float:
  reference = np.asarray(reference, np.float32)
  return float(np.abs(np.asarray(ours, np.float32) - reference).max() / np.abs(reference).max())


def test_text_branch_matches_bert_hidden_states_layer_by_layer(tiny_bert):
  directory, hf_model = tiny_bert
  checkpoint, model, left = _imported(directory)
  assert checkpoint.qformer_fields == dict(
      width=WIDTH, depth=LAYERS, num_heads=HEADS, mlp_ratio=HIDDEN / WIDTH,
      vocab_size=len(VOCAB), max_text_len=POSITIONS, norm_eps=1e-12, norm_position="post",
      pad_id=0)
  # What the import sets and what it leaves: cross-attention, queries and feature projection.
  expected = ({"feature_norm/bias", "feature_norm/scale", "feature_proj/bias",
               "feature_proj/kernel", "query_tokens", "layers/*/cross_norm/bias",
               "layers/*/cross_norm/scale"}
              | {f"layers/*/cross_attention/{w}_{p}" for w in "qkvo" for p in ("bias", "kernel")})
  assert set(bert.summary(left).split(", ")) == expected
  assert "layers/0/cross_attention/q_kernel" in left
  assert "layers/1/query_mlp/fc2/kernel" in checkpoint.params
  assert {"pooler.dense.weight", "pooler.dense.bias"} <= set(checkpoint.unused)

  tokens = tokenizer_lib.load(directory).encode_batch(SENTENCES, 24)
  assert (tokens == 0).any(axis=1).all()          # every row is padded
  with torch.no_grad():
    reference = hf_model(input_ids=torch.tensor(tokens, dtype=torch.long),
                         attention_mask=torch.tensor(tokens != 0, dtype=torch.long),
                         output_hidden_states=True)

  @nnx.jit  # one compilation instead of one per eager op
  def run(model, tokens):
    return model.text_states(tokens), model.encode_text(tokens)

  states, cls = run(model, jnp.asarray(tokens))
  assert len(states) == len(reference.hidden_states) == LAYERS + 1
  errors = [_relative(ours, ref.numpy()) for ours, ref in zip(states, reference.hidden_states)]
  print("max relative difference per layer (embeddings, layer 1, ...):", errors)
  assert max(errors) < 1e-4, errors
  np.testing.assert_array_equal(np.asarray(states[-1]).shape, reference.last_hidden_state.shape)
  # The text embedding (the last layer's first row only) is BERT's [CLS] output.
  assert _relative(cls, reference.last_hidden_state[:, 0].numpy()) < 1e-4


def test_masked_lm_checkpoint_with_old_norm_names_imports_the_same(tiny_bert, tmp_path):
  """``bert.``-prefixed keys (BertForMaskedLM / BertForPreTraining) and LayerNorm gamma/beta."""
  directory, _ = tiny_bert
  tensors = safetensors_io.load_file(os.path.join(directory, "model.safetensors"))
  renamed = {"bert." + k.replace("LayerNorm.weight", "LayerNorm.gamma")
             .replace("LayerNorm.bias", "LayerNorm.beta"): v for k, v in tensors.items()}
  renamed["cls.predictions.bias"] = np.zeros(len(VOCAB), np.float32)
  safetensors_io.save_file(renamed, str(tmp_path / "model.safetensors"))
  shutil.copy(os.path.join(directory, "config.json"), tmp_path / "config.json")
  plain, prefixed = bert.load_bert(directory), bert.load_bert(str(tmp_path))
  assert sorted(prefixed.params) == sorted(plain.params)
  for name, value in plain.params.items():
    np.testing.assert_array_equal(prefixed.params[name], value, err_msg=name)
  assert "cls.predictions.bias" in prefixed.unused


def test_wordpiece_ids_match_transformers(tiny_bert, tmp_path):
  tf = _transformers()
  directory, _ = tiny_bert
  # Cased: a vocab.txt alone with do_lower_case=False (accents kept too).
  cased = tmp_path / "cased"
  cased.mkdir()
  shutil.copy(os.path.join(directory, "vocab.txt"), cased / "vocab.txt")
  (cased / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
  # A cased tokenizer.json whose tokenizer_config.json does not say: transformers lower-cases
  # (BertTokenizer's default), whatever the saved normaliser.
  unsaid = tmp_path / "unsaid"
  tf.BertTokenizerFast(vocab=os.path.join(directory, "vocab.txt"),
                       do_lower_case=False).save_pretrained(unsaid)
  settings = json.loads((unsaid / "tokenizer_config.json").read_text())
  del settings["do_lower_case"]
  (unsaid / "tokenizer_config.json").write_text(json.dumps(settings))
  texts = SENTENCES + ["a [SEP] b [MASK]."]          # special tokens in a text stay whole
  for path in (directory, str(cased), str(unsaid)):
    ours, theirs = tokenizer_lib.load(path), tf.BertTokenizerFast.from_pretrained(path)
    for text in texts:
      assert ours.encode(text, add_bos=True, add_eos=True) == theirs(text)["input_ids"], text
    # Padding and truncation (keeping [SEP] last) as transformers pads and truncates.
    batch = theirs(texts, padding="max_length", truncation=True, max_length=9)["input_ids"]
    np.testing.assert_array_equal(ours.encode_batch(texts, 9), np.array(batch))
    assert ours.decode(ours.encode_batch(texts[:1], 16)[0]) == theirs.decode(
        theirs(texts[0])["input_ids"], skip_special_tokens=True)
    again = pickle.loads(pickle.dumps(ours))       # grain workers receive it pickled
    np.testing.assert_array_equal(again.encode_batch(texts, 12), ours.encode_batch(texts, 12))
  assert tokenizer_lib.load(str(unsaid)).encode("The") == tokenizer_lib.load(directory).encode(
      "The")
  lower, upper = tokenizer_lib.load(directory), tokenizer_lib.load(str(cased))
  assert lower.encode("The") != upper.encode("The")     # the case setting is honoured
  assert (lower.bos_id, lower.eos_id, lower.pad_id, lower.unk_id) == (2, 3, 0, 1)
  assert lower.num_embeddings == len(VOCAB)


def test_checkpoint_not_matching_its_config_or_the_run_is_a_clear_error(tiny_bert, tmp_path):
  directory, _ = tiny_bert
  shutil.copy(os.path.join(directory, "model.safetensors"), tmp_path / "model.safetensors")
  with open(os.path.join(directory, "config.json")) as f:
    config = json.load(f)
  (tmp_path / "config.json").write_text(json.dumps(dict(config, intermediate_size=96)))
  with pytest.raises(bert.ConversionError,
                     match=r"shape mismatch for encoder\.layer\.0\.intermediate\.dense\.weight: "
                           r"checkpoint \(128, 64\), config\.json implies \(96, 64\)") as error:
    bert.load_bert(str(tmp_path))
  assert "model.safetensors" in str(error.value)
  (tmp_path / "config.json").write_text(json.dumps(dict(config, hidden_act="gelu_new")))
  with pytest.raises(ValueError, match="config.json: hidden_act='gelu_new'"):
    bert.load_bert(str(tmp_path))

  checkpoint = bert.load_bert(directory)
  run = qformer.QFormerConfig(**dict(checkpoint.qformer_fields, width=32, depth=3))
  with pytest.raises(ValueError, match=r"config\.model\.qformer\.width=32 but the checkpoint "
                                       r"has 64 \(hidden_size\)") as error:
    bert.check_qformer(run, checkpoint)
  assert "config.model.qformer.depth=3" in str(error.value)
  bert.check_qformer(qformer.QFormerConfig(**checkpoint.qformer_fields), checkpoint)
  # A pre-norm Q-Former has no embedding norm to take BERT's.
  pre = qformer.QFormer(qformer.QFormerConfig(**dict(checkpoint.qformer_fields,
                                                     norm_position="pre")), rngs=nnx.Rngs(0))
  with pytest.raises(bert.ConversionError, match="norm_position='post'"):
    bert.assign(pre, checkpoint.params)



def test_post_norm_query_layer_matches_bert_cross_attention_layer():
  """The query branch of a post-norm layer (self-attention, cross-attention into the patches
  in chunks, feed-forward) is BLIP-2's: a BertLayer with cross-attention, run without a causal
  mask; patches of the second set partly masked."""
  tf = _transformers()
  config = tf.BertConfig(hidden_size=WIDTH, num_attention_heads=HEADS, intermediate_size=HIDDEN,
                         is_decoder=True, add_cross_attention=True, attn_implementation="eager")
  torch.manual_seed(1)
  hf_layer = tf.models.bert.modeling_bert.BertLayer(config).eval()
  hf_layer.attention.self.is_causal = False     # the queries see each other both ways
  with torch.no_grad():
    for parameter in hf_layer.parameters():
      parameter.add_(torch.randn_like(parameter) * 0.1)
  weights = {f"encoder.layer.0.{k}": v.numpy() for k, v in hf_layer.state_dict().items()}
  fields = bert.qformer_fields(dict(hidden_size=WIDTH, intermediate_size=HIDDEN,
                                    num_attention_heads=HEADS, num_hidden_layers=1))
  q_config = qformer.QFormerConfig(**dict(fields, kv_chunk=8))
  ours = qformer.Layer(q_config, cross=True, rngs=nnx.Rngs(0), dtype=jnp.float32,
                       param_dtype=jnp.float32)
  config_json = dict(hidden_size=WIDTH, intermediate_size=HIDDEN, num_attention_heads=HEADS,
                     num_hidden_layers=1, vocab_size=1)
  values = {}
  for key, (_, names, transform) in bert._mapping(config_json).items():  # noqa: SLF001
    if key.startswith("encoder.layer.0."):
      for name in names:
        values[name[len("layers/0/"):]] = transform(weights[key])
  h, c = HEADS, WIDTH // HEADS
  prefix = "encoder.layer.0.crossattention."
  for torch_name, name in (("query", "q"), ("key", "k"), ("value", "v")):
    values[f"cross_attention/{name}_kernel"] = weights[
        f"{prefix}self.{torch_name}.weight"].T.reshape(WIDTH, h, c)
    values[f"cross_attention/{name}_bias"] = weights[f"{prefix}self.{torch_name}.bias"].reshape(
        h, c)
  values["cross_attention/o_kernel"] = weights[f"{prefix}output.dense.weight"].T.reshape(
      h, c, WIDTH)
  values["cross_attention/o_bias"] = weights[f"{prefix}output.dense.bias"]
  values["cross_norm/scale"] = weights[f"{prefix}output.LayerNorm.weight"]
  values["cross_norm/bias"] = weights[f"{prefix}output.LayerNorm.bias"]
  assert bert.assign(ours, values) == []          # every parameter of the layer set

  rng = np.random.default_rng(0)
  queries = rng.normal(size=(2, 4, WIDTH)).astype(np.float32)
  patches = rng.normal(size=(2, 20, WIDTH)).astype(np.float32)
  valid = np.arange(20)[None] < np.array([[20], [13]])
  with torch.no_grad():
    reference = hf_layer(torch.tensor(queries), encoder_hidden_states=torch.tensor(patches),
                         encoder_attention_mask=torch.tensor(
                             np.where(valid, 0.0, -1e9)[:, None, None, :], dtype=torch.float32))
  out = nnx.jit(lambda layer, x, p, v: layer.queries(x, p, v, q_config.kv_chunk))(
      ours, jnp.asarray(queries), jnp.asarray(patches), jnp.asarray(valid))
  error = _relative(out, reference.numpy())
  print("post-norm query layer, max relative difference:", error)
  assert error < 1e-4, error

@pytest.mark.slow
def test_align_starts_from_bert_through_the_paper_config(tiny_bert, tmp_path, monkeypatch):
  """configs/pathflip_paper.py:bert=...: post-norm Q-Former of the checkpoint's sizes, its
  WordPiece tokenizer, and the imported weights as the step-0 parameters; a resumed run does
  not import again."""
  from pathflip_jax import checkpointing, config_args, predict, train, wordpiece  # noqa: PLC0415
  from pathflip_jax.tasks import align  # noqa: PLC0415
  from tests.test_align import CLASSES, write_features  # noqa: PLC0415
  directory, _ = tiny_bert
  write_features(tmp_path / "features")
  lr = 1e-3
  overrides = {
      "input.worker_count": 0, "dtype": "float32", "total_steps": 2, "log_steps": 2,
      "evals": {}, "optim.lr": lr, "optim.warmup_steps": 0, "checkpoint.async_save": False,
      "data.caption_len": POSITIONS, "data.subcaption_len": 16, "data.num_subcaptions": 4,
      "data.region_patches": 2, "data.num_regions": 4, "data.eval_num_regions": 4,
      "data.buckets": (64,), "data.max_patches": 64, "model.embed_dim": 32,
      "model.context_depth": 1, "model.context_heads": 2, "model.region_heads": 2,
      "model.qformer.num_queries": 4}
  spec = (f"configs/pathflip_paper.py:features_dir={tmp_path / 'features'},bert={directory},"
          f"per_device_batch=1,class_names={';'.join(CLASSES)}")
  config = config_args.load_config(spec, overrides)
  assert config.bert == directory and config.tokenizer == directory
  assert (config.model.qformer.width, config.model.qformer.depth,
          config.model.qformer.norm_position) == (WIDTH, LAYERS, "post")

  starts, restore_or_init = [], train.restore_or_init

  def spy(*args, **kwargs):   # the parameters the first step starts from
    state, origin = restore_or_init(*args, **kwargs)
    starts.append(({k: np.asarray(v) for k, v in checkpointing.named_leaves(
        state["params"]).items()}, origin))
    return state, origin

  monkeypatch.setattr(train, "restore_or_init", spy)
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  step0, origin = starts[0]
  assert origin.startswith("Q-Former text branch and self-attention initialised from BERT")
  imported = {f"qformer/{k}": v for k, v in bert.load_bert(directory).params.items()}
  for name, value in imported.items():
    np.testing.assert_array_equal(step0[name], value, err_msg=name)
  # Two AdamW steps move each imported weight by a few lr at most; a fresh initialisation
  # (the cross-attention, never imported) is nowhere near the checkpoint.
  trained = checkpointing.load_params(workdir)
  moved = max(float(np.abs(trained[n] - v).max()) for n, v in imported.items())
  assert 0 < moved < 5 * 2 * lr, moved
  assert not np.allclose(step0["qformer/layers/0/cross_attention/q_kernel"],
                         imported["qformer/layers/0/self_attention/q_kernel"], atol=0.05)

  # What evaluate / infer load: the post-norm model and the checkpoint's WordPiece tokenizer.
  task, model = predict.load_align(workdir)
  assert isinstance(task.tokenizer, wordpiece.WordPieceTokenizer)
  np.testing.assert_array_equal(model.qformer.embed_norm.scale[...],
                                trained["qformer/embed_norm/scale"])

  def no_import(self, params):
    raise AssertionError("a resumed run imported BERT again")

  monkeypatch.setattr(align.AlignTask, "initial_params", no_import)
  train.train_and_evaluate(config, workdir)    # finds step 2 of 2: restores, trains no step
  assert starts[1][1].startswith(f"resumed from {workdir}/checkpoints/2")


def test_missing_checkpoint_names_the_setting(tmp_path):
  from pathflip_jax import config_args  # noqa: PLC0415
  with pytest.raises(FileNotFoundError, match=f"config arg bert={tmp_path}/none: no such BERT"):
    config_args.load_config(f"configs/pathflip_paper.py:features_dir=F,bert={tmp_path}/none")
  with pytest.raises(FileNotFoundError, match="config.json not found"):
    bert.load_bert(str(tmp_path))


def test_paper_config_takes_bert_base_sizes_from_its_config_json(tmp_path):
  """bert= with a BERT-base config.json: a post-norm 12 x 768 Q-Former (shapes only) into
  which the import's names fit, leaving exactly the cross-attention, queries and projection."""
  from pathflip_jax import config_args  # noqa: PLC0415
  from pathflip_jax.tasks import align  # noqa: PLC0415
  base = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
              intermediate_size=3072, vocab_size=28996, max_position_embeddings=512,
              layer_norm_eps=1e-12, hidden_act="gelu", type_vocab_size=2, model_type="bert")
  (tmp_path / "config.json").write_text(json.dumps(base))
  config = config_args.load_config(f"configs/pathflip_paper.py:features_dir=F,bert={tmp_path}")
  model_config = align.model_config(config, vocab_size=28996, pad_id=0, feature_dim=512)
  q = model_config.qformer
  assert (q.width, q.depth, q.num_heads, q.mlp_ratio, q.max_text_len, q.norm_eps,
          q.norm_position) == (768, 12, 12, 4.0, 512, 1e-12, "post")
  abstract = nnx.eval_shape(lambda: qformer.QFormer(q, rngs=nnx.Rngs(0)))
  names = {name for _, names, _ in bert._mapping(base).values() for name in names}  # noqa: SLF001
  imported, left = bert.split_names(abstract, dict.fromkeys(names | {"text_embed/pos_embed"}))
  # Embeddings 4; per layer: attention 8 and its norm 2, two feed-forwards of 4 and a norm 2.
  assert len(imported) == 4 + 12 * (10 + 2 * 6)
  assert set(bert.summary(left).split(", ")) == (
      {"feature_norm/bias", "feature_norm/scale", "feature_proj/bias", "feature_proj/kernel",
       "query_tokens", "layers/*/cross_norm/bias", "layers/*/cross_norm/scale"}
      | {f"layers/*/cross_attention/{w}_{p}" for w in "qkvo" for p in ("bias", "kernel")})
