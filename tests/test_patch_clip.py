"""Patch-text pretraining: text encoder, contrastive loss, demo patch labels, evaluators, and the
demo path make_demo_cohort -> tile_slides -> patch_clip -> extract_features."""

import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from pathflip_jax import losses, sharding
from pathflip_jax.data import demo_annotations
from pathflip_jax.evaluators import linear_probe, patch_zero_shot
from pathflip_jax.models import text_encoder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_text_encoder_ignores_padding():
  config = text_encoder.TextConfig(vocab_size=30, max_len=10, width=16, depth=2, num_heads=2,
                                   out_dim=8)
  # Built inside one jit: eager NNX init compiles every op separately (slow on XLA:CPU).
  model = sharding.create_sharded(lambda: text_encoder.TextEncoder(config, rngs=nnx.Rngs(0)),
                                  sharding.make_mesh(devices=jax.devices()[:1]))
  short = jnp.array([[2, 5, 7, 9, 1, 0], [2, 11, 1, 0, 0, 0]], jnp.int32)
  long = jnp.pad(short, ((0, 0), (0, 4)))
  out_short, out_long, other = jax.jit(lambda a, b, c: (model(a), model(b), model(c)))(
      short, long, short.at[0, 2].set(8))
  assert out_short.shape == (2, 8)
  np.testing.assert_allclose(np.asarray(out_short), np.asarray(out_long), rtol=1e-5, atol=1e-6)
  # A different token changes the output: the encoder reads its input.
  assert not np.allclose(np.asarray(other[0]), np.asarray(out_short[0]), atol=1e-4)
  with pytest.raises(ValueError, match="maximum length 10"):
    model(jnp.zeros((1, 11), jnp.int32))


def test_contrastive_loss_counts_shared_texts_as_positives():
  image = jnp.eye(4)
  text = jnp.eye(4)
  loss, metrics = losses.contrastive_loss(image, text, jnp.float32(50.0))
  assert float(loss) < 1e-6 and float(metrics["i2t_accuracy"]) == 1.0
  # Images 0 and 1 share one caption: with ids, predicting either copy is right and the loss is
  # log 2 for those rows (the target is split over two identical logits), not a penalty.
  image = jnp.array([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
  text = image
  _, plain = losses.contrastive_loss(image, text, jnp.float32(50.0))
  shared, m = losses.contrastive_loss(image, text, jnp.float32(50.0), jnp.array([0, 0, 1, 2]))
  np.testing.assert_allclose(float(shared), 0.5 * np.log(2.0), rtol=1e-4)
  # Without ids image 1's top match (the tie goes to text 0) counts as a miss.
  assert float(m["i2t_accuracy"]) == 1.0 and float(plain["i2t_accuracy"]) == 0.75


def _fake_cohort(root):
  """One 8x8-mask-pixel slide: left half stroma (region r1), right half tumour (region r2)."""
  masks = root / "masks"
  masks.mkdir(parents=True)
  label = np.zeros((8, 8), np.uint8)
  label[1:7, 1:4], label[1:7, 4:7] = 1, 2
  regions = np.zeros((8, 8), np.uint8)
  regions[1:7, 1:4], regions[1:7, 4:7] = 1, 2
  Image.fromarray(label).save(masks / "S1.png")
  Image.fromarray(regions).save(masks / "S1_regions.png")
  (masks / "S1.json").write_text(json.dumps({"level0_px_per_mask_px": 16.0,
                                             "region_map": "S1_regions.png"}))
  (root / "captions.jsonl").write_text(json.dumps({"slide_id": "S1", "caption": "x", "sentences": [
      {"text": "Stroma.", "region_id": "r1"}, {"text": "Tumour.", "region_id": "r2"},
      {"text": "Benign.", "region_id": None}]}) + "\n")
  (root / "manifest.jsonl").write_text(json.dumps({"slide_id": "S1", "split": "val"}) + "\n")


def test_demo_annotations_label_patches_by_footprint(tmp_path):
  _fake_cohort(tmp_path)
  notes = demo_annotations.CohortAnnotations(str(tmp_path))
  stroma = notes.label_patch("S1", 16, 16, 48)         # mask pixels 1..3: all stroma
  assert (stroma.tissue, stroma.region_id, stroma.sentence) == (1, "r1", "Stroma.")
  assert stroma.purity == 1.0 and stroma.coverage == 1.0
  mixed = notes.label_patch("S1", 48, 16, 48)          # columns 3..5: 1 stroma, 2 tumour
  assert (mixed.tissue, mixed.sentence) == (2, "Tumour.")
  assert abs(mixed.purity - 2 / 3) < 1e-6
  edge = notes.label_patch("S1", 80, 80, 48)           # mask 5..7: tumour, glass beyond
  assert edge.tissue == 2 and edge.purity == 1.0 and abs(edge.coverage - 4 / 9) < 1e-6
  glass = notes.label_patch("S1", 112, 112, 64)        # no tissue under it at all
  assert glass.tissue == demo_annotations.BACKGROUND and glass.sentence is None
  assert notes.split("S1") == "val"
  (tmp_path / "masks" / "S1_regions.png").unlink()
  with pytest.raises(FileNotFoundError, match="regenerate"):
    demo_annotations.CohortAnnotations(str(tmp_path)).label_patch("S1", 0, 0, 16)


def test_logistic_regression_probe_separates_and_regularises():
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(3, 5)) * 4
  y = np.repeat(np.arange(3), 40)
  x = centres[y] + rng.normal(size=(120, 5))
  groups = np.arange(120) // 10
  metrics = linear_probe.probe(x[::2], y[::2], groups[::2], x[1::2], y[1::2], 3)
  assert metrics["accuracy"] >= 0.95 and metrics["balanced_accuracy"] >= 0.95
  # The fit is at a stationary point of the regularised objective: weights shrink with l2.
  w_small, _ = linear_probe.fit_logistic_regression(x, y, 3, 1e-3)
  w_big, _ = linear_probe.fit_logistic_regression(x, y, 3, 10.0)
  assert np.linalg.norm(w_big) < 0.2 * np.linalg.norm(w_small)
  # Labels unrelated to the features: the probe is near chance.
  shuffled = rng.permutation(y)
  chance = linear_probe.probe(x[::2], shuffled[::2], groups[::2], x[1::2], shuffled[1::2], 3)
  assert chance["accuracy"] < 0.6


class _OneHotModel(nnx.Module):
  """Images carry their class in pixel [0, 0, 0]; texts in their second token."""

  def encode_images(self, images):
    return jax.nn.one_hot(images[:, 0, 0, 0].astype(jnp.int32), 3)

  def encode_texts(self, tokens):
    return jax.nn.one_hot(tokens[:, 1] - 10, 3)


def test_zero_shot_evaluator_uses_prompts():
  labels = np.array([0, 1, 2, 2, 1, 0, 0, 2], np.int32)
  images = np.zeros((8, 4, 4, 3), np.uint8)
  images[:, 0, 0, 0] = labels
  names = ["stroma", "tumour", "fat"]
  tokenizer = types.SimpleNamespace(
      encode_batch=lambda texts, n: np.array([[2, 10 + names.index(t.split()[-1]), 1] + [0] * (n - 3)
                                              for t in texts], np.int32))
  task = types.SimpleNamespace(class_names=names, tokenizer=tokenizer,
                               config=types.SimpleNamespace(text_len=6),
                               images=lambda split: (images, labels))
  config = {"split": "val", "batch_size": 8,
            "prompts": {"stroma": ["fibrous stroma"], "fat": ["mature fat", "adipose fat"]}}
  import ml_collections
  evaluator = patch_zero_shot.Evaluator(ml_collections.ConfigDict(config), task,
                                        sharding.make_mesh())
  metrics = evaluator.run(_OneHotModel())
  assert metrics["accuracy"] == 1.0 and metrics["chance_balanced_accuracy"] == 1 / 3
  # Prompts that name the wrong classes get the wrong answers.
  config["prompts"] = {"stroma": ["x fat"], "fat": ["x stroma"]}
  swapped = patch_zero_shot.Evaluator(ml_collections.ConfigDict(config), task,
                                      sharding.make_mesh()).run(_OneHotModel())
  assert swapped["accuracy"] == pytest.approx(2 / 8)
  config["prompts"] = {"bone": ["bone"]}
  with pytest.raises(ValueError, match="unknown classes"):
    patch_zero_shot.Evaluator(ml_collections.ConfigDict(config), task, sharding.make_mesh())


@pytest.mark.slow
def test_demo_path_cohort_tiles_patch_clip_features(demo_cohort, demo_tiles, tmp_path):
  """make_demo_cohort -> tile_slides -> train (patch_clip, tiny) -> extract_features with the
  trained checkpoint: the evaluators report, and the exported features are the trained ViT's.
  The cohort and its tiles are conftest's (made once per session; test_demo_cohort checks them).
  """
  from data_prep import extract_features
  from pathflip_jax import config_args, metric_writer, train
  from pathflip_jax.data import feature_shards
  from pathflip_jax import predict
  cohort, (patches, _) = demo_cohort, demo_tiles
  config = config_args.load_config(
      os.path.join(REPO, "configs", "patch_clip_demo.py") + f":cohort_dir={cohort},"
      f"patches_dir={patches},size=test,eval_split=test",   # seed 0's 8 slides: no val patient
      {"total_steps": 6, "log_steps": 3, "input.worker_count": 0})
  workdir = tmp_path / "run"
  results = train.train_and_evaluate(config, str(workdir))
  for key in ("linear_probe/accuracy", "linear_probe/colour_mean_accuracy",
              "zero_shot/balanced_accuracy", "zero_shot/chance_balanced_accuracy"):
    assert 0.0 <= results[key] <= 1.0, key
  assert (workdir / "tokenizer.model").exists() and (workdir / "checkpoints" / "6").is_dir()
  rows = metric_writer.read_metrics(str(workdir))
  assert [r["step"] for r in rows if "train/loss" in r] == [3, 6]

  summary = extract_features.run([
      "--patches", str(patches), "--output_dir", str(tmp_path / "features"), "--config",
      os.path.join(REPO, "configs", "extract_features.py") + f":checkpoint={workdir},"
      "num_workers=0", "--progress_interval", "0"])
  assert summary["slides_written"] == 8
  shards = feature_shards.FeatureShards(str(tmp_path / "features"))
  record = shards[0]
  assert record["features"].shape[1] == 32 and record["encoder"].startswith("patch_clip:")
  # The exported features are the trained ViT's pooled output on the (resized) patches.
  model, clip_config, _ = predict.load_image_encoder(str(workdir))
  assert clip_config.vision.width == 32 and np.isfinite(record["features"]).all()
