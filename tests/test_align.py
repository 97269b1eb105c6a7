"""Stage "align" end to end on synthetic feature shards: 8-device training, evaluators,
ablations, captions from a decompose_captions file, and input errors."""

import json
import os

import numpy as np
import pytest

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


def _config(features_dir, args="", **overrides):
  """The demo config at size test; ``overrides``: fields, "a.b" as ``a__b``."""
  fields = {"input.worker_count": 0}
  fields.update({key.replace("__", "."): value for key, value in overrides.items()})
  return config_args.load_config(
      f"configs/pathflip_demo.py:size=test,features_dir={features_dir}{args}", fields)


@pytest.mark.slow
def test_align_trains_on_8_devices_and_evaluates(features_dir, tmp_path):
  config = _config(features_dir)
  results = train.train_and_evaluate(config, str(tmp_path))
  for key in ("zero_shot/balanced_accuracy", "zero_shot/weighted_f1", "zero_shot/macro_auc",
              "zero_shot/region_score_balanced_accuracy", "retrieval/slide_to_text_r@1",
              "retrieval/text_to_slide_r@5", "retrieval/chance_r@1"):
    assert key in results and np.isfinite(results[key]), key
  assert results["zero_shot/num_slides"] == 4 and results["retrieval/chance_r@1"] == 0.25
  for key in ("zero_shot/balanced_accuracy", "retrieval/slide_to_text_r@1"):
    assert _within(results, key), key
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  train_row = next(r for r in rows if "train/loss" in r)
  assert train_row["train/slide_loss"] > 0 and train_row["train/region_loss"] > 0
  assert os.path.exists(tmp_path / "tokenizer.model")
  assert os.path.isdir(tmp_path / "checkpoints" / "4")


@pytest.mark.slow
def test_ablations_run_from_the_same_config(features_dir, tmp_path):
  config = _config(features_dir, region_attention=False, region_loss=False, total_steps=2,
                   log_steps=2)
  results = train.train_and_evaluate(config, str(tmp_path / "a"))
  assert np.isfinite(results["zero_shot/balanced_accuracy"])
  rows = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
  train_row = next(r for r in rows if "train/loss" in r)
  assert "train/region_loss" not in train_row
  np.testing.assert_allclose(train_row["train/loss"], train_row["train/slide_loss"], rtol=1e-6)
  task = align.AlignTask(config, str(tmp_path / "a"))
  assert task.model_config.region_attention is False


def test_loss_weights_scale_the_logged_losses(features_dir, tmp_path):
  """config.loss.slide_weight and region_weight: train/loss is their weighted sum."""
  config = _config(features_dir, ",eval_split=", loss__slide_weight=2.0, loss__region_weight=3.0,
                   total_steps=2, log_steps=2)
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
  """config.data.max_sentences: every sampled subcaption is 1..max_sentences caption sentences,
  and the longest ones are drawn (the test captions have three sentences)."""
  config = _config(features_dir, data__max_sentences=max_sentences)
  task = align.AlignTask(config, str(tmp_path / "w"))
  sample, source = task.train_transform(), task.train_source()
  rng = np.random.default_rng(0)
  counts = set()
  for i in range(4):
    example = sample.random_map(source[i], rng)
    for tokens in example["subcaptions"]:
      counts.add(task.tokenizer.decode(tokens).count(". ") + 1)
  assert counts == set(range(1, max_sentences + 1))


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
  for key in ("accuracy", "balanced_accuracy", "auc", "few_shot/k1/auc",
              "few_shot/k4/balanced_accuracy", "zero_shot_auc", "mean_patch_feature/auc",
              "majority_class_accuracy", "minus_mean_patch_feature/auc"):
    assert _within(result, key), key
  assert result["minus_mean_patch_feature/auc"] == pytest.approx(result["auc"] - 1.0)
  assert "num_eval/ci_low" not in result and "l2/ci_low" not in result
  with pytest.raises(ValueError, match="label_key='dx'.*0 distinct values"):
    slide_linear_probe.Evaluator(ml_collections.ConfigDict({**config, "label_key": "dx"}),
                                 task, mesh)
  with pytest.raises(ValueError, match="prompts for each of its values"):
    slide_linear_probe.Evaluator(ml_collections.ConfigDict(
        {**config, "label_key": "diagnosis"}), task, mesh)


def _within(result, key):
  """The 95% interval of a result key is there and holds its value."""
  return result[key + "/ci_low"] - 1e-9 <= result[key] <= result[key + "/ci_high"] + 1e-9


class _CentroidReference:
  """Stands in for a patch_clip run (common.PatchClipReference): patches embed as their
  features, classes as the cluster centres write_features drew (seed 0), so the reference
  knows each slide's class."""

  def __init__(self, workdir, key=""):
    del workdir, key
    self.centres = np.random.default_rng(0).normal(size=(len(CLASSES), 12)) * 2

  def class_embeddings(self, texts, prompt_class, num_classes):
    del texts, prompt_class
    centres = self.centres[:num_classes]
    return centres / np.linalg.norm(centres, axis=1, keepdims=True)

  def patch_embeddings(self, features, slide_id):
    del slide_id
    features = np.asarray(features, np.float32)
    return features / np.linalg.norm(features, axis=1, keepdims=True)

  def slide_embedding(self, features, slide_id):
    mean = self.patch_embeddings(features, slide_id).mean(0)
    return mean / np.linalg.norm(mean)


def test_slide_evaluators_report_intervals_baselines_and_rows(tmp_path, monkeypatch):
  """Zero-shot and retrieval on a random model: every metric with an interval that holds it,
  the reference and majority baselines with paired differences, per-slide rows in W/eval."""
  import ml_collections
  from flax import nnx

  from pathflip_jax import sharding
  from pathflip_jax.evaluators import common, slide_retrieval, slide_zero_shot, stats

  directory = tmp_path / "features"
  write_features(directory, slides_per_class=(2, 1, 3))
  task = align.AlignTask(_config(str(directory)), str(tmp_path / "w"))
  task.workdir = str(tmp_path / "w")
  model = task.create_model(nnx.Rngs(0))
  mesh = sharding.make_mesh()
  monkeypatch.setattr(common, "PatchClipReference", _CentroidReference)
  zero_shot = slide_zero_shot.Evaluator(ml_collections.ConfigDict(
      dict(type="slide_zero_shot", split="test", reference="patch_clip_run")), task, mesh)
  result = zero_shot.run(model)
  assert result["num_slides"] == 12 and result["chance_balanced_accuracy"] == 0.25
  for key in ("balanced_accuracy", "weighted_f1", "macro_auc", "accuracy",
              "slide_score_balanced_accuracy", "both_score_balanced_accuracy",
              "majority_class_accuracy", "minus_majority/accuracy",
              "minus_chance/balanced_accuracy", "reference/balanced_accuracy",
              "reference/macro_auc", "minus_reference/balanced_accuracy",
              "minus_reference/macro_auc"):
    assert _within(result, key), key
  assert "chance_balanced_accuracy/ci_low" not in result and "num_slides/ci_low" not in result
  # The reference knows the class centres: right on every slide, ahead of an untrained model
  # by more than the slides' variation explains.
  assert result["reference/balanced_accuracy"] == 1.0
  assert result["minus_reference/balanced_accuracy"] == pytest.approx(
      result["balanced_accuracy"] - 1.0)
  assert result["minus_reference/balanced_accuracy/ci_high"] < 0
  # Training classes tie (2 slides each): the majority is the first; a quarter of test slides.
  assert result["majority_class_accuracy"] == 0.25
  rows = stats.read_slide_rows(str(tmp_path / "w" / "eval"), "slide_zero_shot", "test")
  assert [r["slide_id"] for r in rows] == [t.slide_id for t in task.splits["test"].texts]
  labels = np.array([r["label"] for r in rows])
  predicted = np.array([np.argmax(r["scores"]) for r in rows])
  assert result["accuracy"] == pytest.approx(np.mean(labels == predicted))
  assert all(np.argmax(r["reference_scores"]) == r["label"] for r in rows)

  retrieval = slide_retrieval.Evaluator(ml_collections.ConfigDict(
      dict(type="slide_retrieval", split="test")), task, mesh)
  result = retrieval.run(model)
  for direction in ("slide_to_text", "text_to_slide"):
    for k in (1, 5, 10):
      assert _within(result, f"{direction}_r@{k}"), (direction, k)
  assert "chance_r@1/ci_low" not in result
  rows = stats.read_slide_rows(str(tmp_path / "w" / "eval"), "slide_retrieval", "test")
  ranks = np.array([r["slide_to_text_rank"] for r in rows])
  assert result["slide_to_text_r@5"] == pytest.approx(np.mean(ranks <= 5))


def test_attention_mil_reference_beats_chance_on_separable_features(tmp_path):
  """slide_mil: trained once on the training slides' patch features (which carry the class),
  near perfect on the test slides, with intervals; it ignores the model and caches."""
  import ml_collections

  from pathflip_jax.evaluators import slide_mil, stats

  directory = tmp_path / "features"
  write_features(directory, slides_per_class=(4, 1, 5))
  task = align.AlignTask(_config(str(directory)), str(tmp_path / "w"))
  task.workdir = str(tmp_path / "w")
  config = dict(type="slide_mil", split="test", steps=150, hidden=16, attention=8)
  evaluator = slide_mil.Evaluator(ml_collections.ConfigDict(config), task, None)
  evaluator.name = "mil"
  result = evaluator.run(None)
  assert result["num_slides"] == 20 and result["num_train"] == 16
  assert result["chance_balanced_accuracy"] == 0.25
  for key in ("balanced_accuracy", "macro_auc", "accuracy", "weighted_f1"):
    assert _within(result, key), key
  assert result["balanced_accuracy"] >= 0.9 and result["balanced_accuracy/ci_low"] > 0.5
  assert result["macro_auc"] > 0.95
  assert evaluator.run(None) == result          # computed once
  rows = stats.read_slide_rows(str(tmp_path / "w" / "eval"), "mil", "test")
  assert len(rows) == 20 and len(rows[0]["scores"]) == len(CLASSES)
  # Labels the features do not carry: the same classifier is near chance.
  model = slide_mil.train_mil([np.ones((3, 2), np.float32), np.ones((5, 2), np.float32)],
                              np.array([0, 1]), 2, steps=20)
  logits = slide_mil.predict_mil(model, [np.ones((4, 2), np.float32)] * 2)
  np.testing.assert_allclose(logits[0], logits[1])
  with pytest.raises(ValueError, match="train_split='test' is the split scored"):
    slide_mil.Evaluator(ml_collections.ConfigDict({**config, "train_split": "test"}), task, None)
  with pytest.raises(ValueError, match="config.evals.*.steps=0"):
    slide_mil.Evaluator(ml_collections.ConfigDict({**config, "steps": 0}), task, None)
