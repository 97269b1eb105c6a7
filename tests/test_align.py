"""Stage "align" end to end on synthetic feature shards: 8-device training, evaluators,
ablations, captions from a decompose_captions file, and input errors."""

import json
import os

import numpy as np
import pytest

from configs import pathflip_demo
from pathflip_jax import config_args, train
from pathflip_jax.data import feature_shards
from pathflip_jax.tasks import align

CLASSES = ["benign", "carcinoma", "carcinoma with necrosis", "lymph node metastasis"]
WORDS = {"benign": "Benign glands are seen.", "carcinoma": "Sheets of tumour cells are seen.",
         "carcinoma with necrosis": "Tumour with necrosis is seen.",
         "lymph node metastasis": "Tumour cells in a lymph node are seen."}


def write_features(directory, slides_per_class=(3, 1, 1), dim=12, seed=0):
  """A feature directory whose patch features carry their slide's class (cluster centres)."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(len(CLASSES), dim)) * 2
  writer = feature_shards.FeatureWriter(str(directory), {"encoder": "synthetic",
                                                         "feature_dim": dim}, slides_per_shard=5)
  rows = []
  for split, per_class in zip(("train", "val", "test"), slides_per_class):
    for c, name in enumerate(CLASSES):
      for k in range(per_class):
        slide_id = f"{split}-{c}-{k}"
        n = int(rng.integers(12, 40))
        coords = np.stack([np.arange(n) % 6, np.arange(n) // 6], 1).astype(np.int64) * 256
        features = (centres[c] + rng.normal(size=(n, dim))).astype(np.float16)
        caption = (f"{WORDS[name]} Stroma is seen on the left. Diagnosis: {name}.")
        row = {"slide_id": slide_id, "split": split, "diagnosis": name, "caption": caption}
        writer.add({"slide_id": slide_id, "features": features, "coords": coords,
                    "patch_size_level0": 256, "mpp": 0.5, "encoder": "synthetic",
                    "weights_hash": "", "source": "extract_features"}, row)
        rows.append(row)
  writer.close(rows)
  return rows


@pytest.fixture(scope="module")
def features_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("features")
  write_features(directory)
  return str(directory)


def _config(features_dir, extra=""):
  return config_args.load_config(
      f"configs/pathflip_demo.py:size=test,features_dir={features_dir},total_steps=4,"
      f"batch_size=8,log_steps=4,workers=0{extra}")


@pytest.mark.slow
def test_align_trains_on_8_devices_and_evaluates(features_dir, tmp_path):
  config = _config(features_dir)
  results = train.train_and_evaluate(config, str(tmp_path))
  for key in ("zero_shot/balanced_accuracy", "zero_shot/weighted_f1", "zero_shot/macro_auc",
              "zero_shot/region_score_balanced_accuracy", "retrieval/slide_to_text_r@1",
              "retrieval/text_to_slide_r@5", "retrieval/chance_r@1"):
    assert key in results and np.isfinite(results[key]), key
  assert results["zero_shot/num_slides"] == 4 and results["retrieval/chance_r@1"] == 0.25
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  train_row = next(r for r in rows if "train/loss" in r)
  assert train_row["train/slide_loss"] > 0 and train_row["train/region_loss"] > 0
  assert os.path.exists(tmp_path / "tokenizer.model")
  assert os.path.isdir(tmp_path / "checkpoints" / "4")


def test_text_init_starts_the_text_branch_from_a_patch_clip_run(features_dir, tmp_path):
  """config.text_init: the tower's tokenizer is used and its text weights are loaded."""
  import shutil

  from flax import nnx

  from pathflip_jax import checkpointing
  from pathflip_jax.convert import mapping
  from pathflip_jax.models import patch_clip, text_encoder, vit

  scratch = align.AlignTask(_config(features_dir), str(tmp_path / "scratch"))
  run = tmp_path / "patch_clip"
  run.mkdir()
  shutil.copy(tmp_path / "scratch" / "tokenizer.model", run / "tokenizer.model")
  # A patch_clip model with random parameters: filled in from NumPy rather than initialised (an
  # eager random init compiles every op, ~20 s on a slow CPU; only the values matter here).
  clip = nnx.eval_shape(lambda: patch_clip.PatchClip(patch_clip.PatchClipConfig(
      vision=vit.get_config("vit_tiny_test", image_size=16, patch_size=8, width=12, depth=1,
                            num_heads=2, pool="mean", class_token=False),
      text=text_encoder.TextConfig(vocab_size=scratch.tokenizer.num_embeddings, max_len=16,
                                   width=32, depth=1, num_heads=2),
      embed_dim=32), rngs=nnx.Rngs(5)))
  rng = np.random.default_rng(5)
  clip = mapping.fill(clip, {path: rng.normal(0.0, 0.1, v.shape).astype(v.dtype) for path, v in
                             nnx.to_flat_state(nnx.state(clip))}, "test")
  ckpt = checkpointing.Checkpointer(str(run))
  ckpt.save(1, {"params": nnx.state(clip, nnx.Param)})
  ckpt.close()

  task = align.AlignTask(_config(features_dir, f",text_init={run},feature_shortcut=True"),
                         str(tmp_path / "align"))
  assert task.tokenizer.num_embeddings == scratch.tokenizer.num_embeddings
  assert not os.path.exists(tmp_path / "align" / "tokenizer.model")   # the run's, not trained
  params = nnx.state(task.create_model(nnx.Rngs(0)), nnx.Param)
  loaded, origin = task.initial_params(params)
  assert "text branch initialised from config.text_init" in origin
  np.testing.assert_array_equal(np.asarray(loaded["qformer"]["token_embed"][...]),
                                np.asarray(clip.text.token_embed[...]))
  np.testing.assert_array_equal(np.asarray(loaded["text_proj"]["kernel"][...]),
                                np.asarray(clip.text_proj.kernel[...]))
  np.testing.assert_array_equal(np.asarray(loaded["qformer"]["query_tokens"][...]),
                                np.asarray(params["qformer"]["query_tokens"][...]))
  # The feature shortcut starts as the tower's image projection (the features' 12-d ViT).
  assert "model.feature_shortcut from its image projection" in origin
  np.testing.assert_array_equal(np.asarray(loaded["feature_shortcut"]["kernel"][...]),
                                np.asarray(clip.image_proj.kernel[...]))
  assert scratch.initial_params(params) is None                  # unset: from scratch

  # A finished text_init run loads (instruct stage, evaluation) with the text_init run's
  # tokenizer: no new tokenizer is trained into its workdir.
  from pathflip_jax.tasks import instruct
  ckpt = checkpointing.Checkpointer(str(tmp_path / "align"))
  ckpt.save(1, {"params": params})
  ckpt.close()
  train.save_config(_config(features_dir, f",text_init={run}"), str(tmp_path / "align"))
  reloaded, model = instruct.load_align_run(str(tmp_path / "align"))
  assert reloaded.tokenizer.encode_batch(["Stroma is seen."], 12).tolist() == \
      task.tokenizer.encode_batch(["Stroma is seen."], 12).tolist()
  assert not os.path.exists(tmp_path / "align" / "tokenizer.model")
  np.testing.assert_array_equal(np.asarray(model.text_proj.kernel[...]),
                                np.asarray(params["text_proj"]["kernel"][...]))


def test_feature_shortcut_needs_the_feature_encoders_image_projection(features_dir, tmp_path):
  """A text_init run whose image projection does not map these features is a clear error."""
  from pathflip_jax import checkpointing

  task = align.AlignTask(_config(features_dir, ",feature_shortcut=True"), str(tmp_path / "a"))
  run = tmp_path / "patch_clip"
  ckpt = checkpointing.Checkpointer(str(run))
  ckpt.save(1, {"params": {"image_proj": {"kernel": np.zeros((16, 32), np.float32),
                                          "bias": np.zeros((32,), np.float32)}}})
  ckpt.close()
  with pytest.raises(ValueError, match=r"config.text_init=.*image_proj/kernel.*\(16, 32\).*"
                                       r"\(12, 32\).*model.feature_shortcut=False"):
    task._shortcut_params(checkpointing.load_params(str(run)), str(run))


@pytest.mark.slow
def test_feature_shortcut_trains_sharded(features_dir, tmp_path):
  """The opt-in shortcut (no text_init here: it starts at random; regions only, with named
  negatives, within-slide negatives and local region attention) trains on 8 devices, its tokens
  move away from the shortcut alone, and the value/output projections from identity."""
  from pathflip_jax import checkpointing

  config = _config(features_dir, ",feature_shortcut=True,slide_shortcut=False,"
                                 "named_negatives=True,within_negatives=0.5,total_steps=2,"
                                 "log_steps=2,eval_split=,local_attention=True")
  assert config.loss.within_slide_weight == 0.5 and config.model.local_region_attention
  with pytest.raises(ValueError, match="within_negatives=0.5 needs named_negatives=True"):
    _config(features_dir, ",within_negatives=0.5")
  unchecked = _config(features_dir, ",named_negatives=True,within_negatives=0.5")
  with unchecked.unlocked():
    unchecked.data.negative_lexicon = {}  # a config written by hand, past the demo's own check
  with pytest.raises(ValueError, match="within_slide_weight=0.5: expected 0, or > 0 with a"):
    align.AlignTask(unchecked, str(tmp_path / "unchecked"))
  lexicon = dict(align.example_config(config).negative_lexicon)
  assert set(lexicon) == set(pathflip_demo.NEGATIVE_LEXICON) and "carcinoma" in lexicon["tumour"]
  assert align.example_config(_config(features_dir)).negative_lexicon == ()
  train.train_and_evaluate(config, str(tmp_path))
  params = checkpointing.load_params(str(tmp_path))
  assert np.abs(params["vision_proj/kernel"]).max() > 0          # started at zero
  v_kernel = params["region_attention/attention/v_kernel"]
  identity = np.eye(v_kernel.shape[0]).reshape(v_kernel.shape)
  assert 0 < np.abs(v_kernel - identity).max() < 0.1             # started at the identity
  assert params["feature_shortcut/kernel"].shape == (12, 32)


@pytest.mark.slow
def test_ablations_run_from_the_same_config(features_dir, tmp_path):
  config = _config(features_dir, ",region_attention=False,region_loss=False,total_steps=2,"
                                 "log_steps=2")
  results = train.train_and_evaluate(config, str(tmp_path / "a"))
  assert np.isfinite(results["zero_shot/balanced_accuracy"])
  rows = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
  train_row = next(r for r in rows if "train/loss" in r)
  assert "train/region_loss" not in train_row
  np.testing.assert_allclose(train_row["train/loss"], train_row["train/slide_loss"], rtol=1e-6)
  task = align.AlignTask(config, str(tmp_path / "a"))
  assert task.model_config.region_attention is False


def test_loss_weights_scale_the_logged_losses(features_dir, tmp_path):
  """config args slide_weight and region_weight: train/loss is their weighted sum."""
  config = _config(features_dir, ",slide_weight=2,region_weight=3,total_steps=2,log_steps=2,"
                                 "eval_split=")
  assert (config.loss.slide_weight, config.loss.region_weight) == (2.0, 3.0)
  assert _config(features_dir).loss.region_weight == 1.0
  train.train_and_evaluate(config, str(tmp_path / "w"))
  rows = [json.loads(line) for line in open(tmp_path / "w" / "metrics.jsonl")]
  row = next(r for r in rows if "train/loss" in r)
  assert row["train/region_loss"] > 0 and row["train/slide_loss"] > 0
  np.testing.assert_allclose(row["train/loss"],
                             2 * row["train/slide_loss"] + 3 * row["train/region_loss"],
                             rtol=1e-5)


@pytest.mark.parametrize("max_sentences", [1, 3])
def test_max_sentences_bounds_the_training_subcaptions(features_dir, tmp_path, max_sentences):
  """config arg max_sentences: every sampled subcaption is 1..max_sentences caption sentences,
  and the longest ones are drawn (the test captions have three sentences)."""
  config = _config(features_dir, f",max_sentences={max_sentences}")
  task = align.AlignTask(config, str(tmp_path / "w"))
  sample, source = task.train_transform(), task.train_source()
  rng = np.random.default_rng(0)
  counts = set()
  for i in range(4):
    example = sample.random_map(source[i], rng)
    for tokens in example["subcaptions"]:
      counts.add(task.tokenizer.decode(tokens).count(". ") + 1)
  assert counts == set(range(1, max_sentences + 1))


def test_max_sentences_must_be_positive():
  with pytest.raises(ValueError, match="max_sentences=0"):
    pathflip_demo.get_config("max_sentences=0")


def test_sentences_come_from_a_decompose_captions_file(features_dir, tmp_path):
  path = tmp_path / "sentences.jsonl"
  with open(path, "w") as f:
    f.write(json.dumps({"slide_id": "train-0-0", "caption": "x",
                        "sentences": ["Glands in the upper left.", "Benign."]}) + "\n")
  config = _config(features_dir, f",captions={path}")
  task = align.AlignTask(config, str(tmp_path))
  texts = {t.slide_id: t for t in task.splits["train"].texts}
  assert texts["train-0-0"].sentences == ("Glands in the upper left.", "Benign.")
  # Slides missing from the file fall back to the rule split of their caption.
  assert texts["train-1-0"].sentences == (WORDS["carcinoma"], "Stroma is seen on the left.",
                                          "Diagnosis: carcinoma.")
  assert len(task.splits["test"]) == 4 and task.splits["test"].texts[1].label == 1


def test_unknown_label_and_missing_features_dir_are_clear_errors(tmp_path):
  directory = tmp_path / "features"
  write_features(directory, slides_per_class=(1, 0, 0))
  config = _config(str(directory))
  with config.unlocked():
    config.class_names = ["benign", "carcinoma"]
  with pytest.raises(ValueError, match=r"diagnosis='carcinoma with necrosis' is not in "
                                       r"config.class_names"):
    align.AlignTask(config, str(tmp_path))
  config = _config(str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="nowhere"):
    align.AlignTask(config, str(tmp_path))
  config = _config(str(directory), ",eval_split=val")
  with pytest.raises(ValueError, match="config.evals.*split='val'.*no slides"):
    train.train_and_evaluate(config, str(tmp_path / "w"))


def test_slide_linear_probe_evaluator(tmp_path):
  """Probes on frozen slide embeddings: the mean-patch-feature baseline finds a label the
  features carry; few-shot and zero-shot readings are reported; bad configs name the key."""
  import ml_collections
  from flax import nnx

  from pathflip_jax import sharding
  from pathflip_jax.evaluators import slide_linear_probe

  rng = np.random.default_rng(3)
  centres = rng.normal(size=(2, 12)) * 3
  writer = feature_shards.FeatureWriter(str(tmp_path / "f"), {"encoder": "synthetic",
                                                              "feature_dim": 12})
  rows = []
  for split, count in (("train", 16), ("test", 8)):
    for k in range(count):
      marker = k % 2
      slide_id = f"{split}-{k}"
      n = int(rng.integers(8, 20))
      coords = np.stack([np.arange(n) % 4, np.arange(n) // 4], 1).astype(np.int64) * 256
      features = (centres[marker] + rng.normal(size=(n, 12))).astype(np.float16)
      row = {"slide_id": slide_id, "split": split, "diagnosis": CLASSES[marker],
             "caption": WORDS[CLASSES[marker]], "marker": marker, "patient_id": f"p{k // 2}"}
      writer.add({"slide_id": slide_id, "features": features, "coords": coords,
                  "patch_size_level0": 256, "mpp": 0.5, "encoder": "synthetic",
                  "weights_hash": "", "source": "extract_features"}, row)
      rows.append(row)
  writer.close(rows)
  task = align.AlignTask(_config(str(tmp_path / "f")), str(tmp_path / "w"))
  model = task.create_model(nnx.Rngs(0))
  mesh = sharding.make_mesh()
  config = dict(label_key="marker", split="test", shots=(1, 4, 20), draws=3,
                prompts={"1": ["sheets of tumour cells"], "0": ["benign glands"]})
  result = slide_linear_probe.Evaluator(ml_collections.ConfigDict(config), task, mesh).run(model)
  assert result["num_train"] == 16 and result["num_eval"] == 8
  assert result["mean_patch_feature/auc"] == 1.0                 # the features carry the label
  assert result["mean_patch_feature/balanced_accuracy"] == 1.0
  for key in ("accuracy", "balanced_accuracy", "auc", "few_shot/k1/auc",
              "few_shot/k4/balanced_accuracy", "zero_shot_auc"):
    assert 0.0 <= result[key] <= 1.0, key
  assert "few_shot/k20/auc" not in result                      # fewer than 20 slides per class
  assert result["majority_class_accuracy"] == 0.5 and result["chance_auc"] == 0.5
  with pytest.raises(ValueError, match="label_key='dx'.*0 distinct values"):
    slide_linear_probe.Evaluator(ml_collections.ConfigDict({**config, "label_key": "dx"}),
                                 task, mesh)
  with pytest.raises(ValueError, match="prompts for each of its values"):
    slide_linear_probe.Evaluator(ml_collections.ConfigDict(
        {**config, "label_key": "diagnosis"}), task, mesh)
