"""Text-prompted heatmaps: the patch scores against a per-region NumPy reference, the signed
region contributions, the PNG overlay, QuPath GeoJSON, and the localization evaluator's metrics
on a demo cohort (an oracle and an inverted heatmap)."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from pathflip_jax import evaluate, heatmaps, train
from pathflip_jax.data import demo_annotations, feature_shards, patch_shards, slide_examples
from pathflip_jax.evaluators import localization
from pathflip_jax.models import pathflip, qformer
from tests.test_pathflip import _element, _Tokens


def _model(**overrides):
  q = qformer.QFormerConfig(feature_dim=12, width=16, depth=2, num_heads=2, mlp_ratio=2.0,
                            num_queries=3, vocab_size=40, max_text_len=16, kv_chunk=8)
  fields = dict(embed_dim=16, context_depth=1, context_heads=2, region_heads=2,
                position_frequencies=3)
  fields.update(overrides)
  return pathflip.PathFlip(pathflip.PathFlipConfig(qformer=q, **fields), rngs=nnx.Rngs(0))


def _example(n=30):
  config = slide_examples.ExampleConfig(region_patches=2, eval_num_regions=12, num_subcaptions=2,
                                        caption_len=8, subcaption_len=8, buckets=(64,))
  return slide_examples.build_example(_element(n=n), config, _Tokens(), None)


@nnx.jit
def _pieces(model, batch, tokens):
  text = model.encode_texts(tokens)[None]
  encoded = model.encode_slides(batch)
  return (text, encoded, model.patch_heatmap(batch, text, "attention"),
          model.patch_heatmap(batch, text, "contribution"),
          model.region_text_attention(text, encoded["regions"], encoded["region_valid"]),
          model.region_contributions(text, encoded["regions"], encoded["region_valid"]),
          model.region_scores(text, encoded["regions"], encoded["region_valid"]),
          model.text_conditioned_regions(text, encoded["regions"], encoded["region_valid"]))


def test_patch_heatmap_is_region_score_times_patch_attention():
  model = _model()
  example = _example()       # 30 patches of 10 x 3: 5 x 2 regions; 12 region slots, 2 empty
  batch = {k: jnp.asarray(v)[None] for k, v in example.items()}
  tokens = jnp.asarray(_Tokens().encode_batch(["tumour", "fat"], 8))
  _, _, heat_att, heat_con, attention, contribution, _, _ = _pieces(model, batch, tokens)
  assert heat_att.shape == (1, 2, 64)
  projected = nnx.jit(lambda m, f: m.qformer.project_features(f))(model, batch["features"])
  patch_attention = nnx.jit(lambda m, x, v: m.qformer.patch_attention(x, v))
  expected = {"attention": np.zeros((2, 64)), "contribution": np.zeros((2, 64))}
  for m in np.nonzero(example["region_valid"])[0]:
    members = example["region_index"][m][example["region_patch_valid"][m]]
    # Each region alone, unpadded: padding in the batch must not change the scores.
    within = np.asarray(patch_attention(model, projected[:, members],
                                        jnp.ones((1, len(members)), bool)))[0]
    for name, region_score in (("attention", attention), ("contribution", contribution)):
      expected[name][:, members] += (np.asarray(region_score)[0, :, m, None] * within[None]
                                     * len(members))
  np.testing.assert_allclose(heat_att[0], expected["attention"], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(heat_con[0], expected["contribution"], rtol=1e-4, atol=1e-6)
  assert float(jnp.abs(heat_att[0, :, 30:]).max()) == 0.0       # padded patches score 0
  # Attention weights are a distribution over regions, so the heat sums to sum_m a_m * count_m.
  np.testing.assert_allclose(np.asarray(attention)[0].sum(-1), 1.0, rtol=1e-5)


def test_region_contributions_split_the_text_region_score():
  model = _model()
  batch = {k: jnp.asarray(v)[None] for k, v in _example().items()}
  tokens = jnp.asarray(_Tokens().encode_batch(["tumour", "fat"], 8))
  text, _, _, _, _, contribution, score, z = _pieces(model, batch, tokens)
  o_bias = np.asarray(model.region_attention.attention.o_bias[...])
  unit_text = np.asarray(text) / np.linalg.norm(np.asarray(text), axis=-1, keepdims=True)
  bias_term = (unit_text @ o_bias) / np.linalg.norm(np.asarray(z), axis=-1)
  np.testing.assert_allclose(np.asarray(contribution).sum(-1) + bias_term, score,
                             rtol=1e-4, atol=1e-5)


def test_region_attention_layer_norms_the_text_query():
  # Unit-norm texts straight into the query projection gave attention logits ~sqrt(e) times too
  # small to move from uniform in a demo run; the query side is layer-normed like the keys, so
  # the weights ignore the text's scale and offset but not its direction.
  model = _model()
  regions = jax.random.normal(jax.random.key(1), (1, 5, 16))
  valid = jnp.array([[True, True, True, True, False]])
  text = jax.random.normal(jax.random.key(2), (1, 2, 16))
  weights = model.region_text_attention(text, regions, valid)
  np.testing.assert_allclose(model.region_text_attention(7.0 * text + 0.5, regions, valid),
                             weights, rtol=1e-4, atol=1e-6)
  assert float(jnp.abs(weights[0, 0] - weights[0, 1]).max()) > 1e-4
  assert float(weights[0, :, 4].max()) == 0.0


def test_ablation_heatmap_ignores_the_text():
  model = _model(region_attention=False)
  batch = {k: jnp.asarray(v)[None] for k, v in _example().items()}
  tokens = jnp.asarray(_Tokens().encode_batch(["tumour", "fat"], 8))
  heat = nnx.jit(lambda m, b, t: m.patch_heatmap(b, m.encode_texts(t)[None]))(model, batch,
                                                                             tokens)
  np.testing.assert_allclose(heat[0, 0], heat[0, 1], rtol=1e-6)
  with pytest.raises(ValueError, match="heatmap method 'gradcam'"):
    model.patch_heatmap(batch, jnp.zeros((1, 1, 16)), "gradcam")


def test_overlay_png_and_geojson(tmp_path):
  thumb = np.full((60, 100, 3), 230, np.uint8)
  coords = np.array([[0, 0], [256, 0], [512, 256]], np.int64)
  scores = np.array([0.1, 0.9, 0.5])
  image = heatmaps.render_overlay(thumb, 8.0, coords, 256, scores, 'a query "tumour"')
  pixels = np.asarray(image)
  assert image.width > 100 and image.height > 60
  # The body sits below the title band: the hot patch is brighter than the cold one.
  band = image.height - 60 - 8
  hot, cold = pixels[band + 10, 8 + 40], pixels[band + 10, 8 + 10]
  assert hot.astype(int).sum() > cold.astype(int).sum()
  assert (pixels[band + 10, 8 + 80] == 230).all()              # untiled glass keeps the thumb
  light = heatmaps.colormap(np.linspace(0, 1, 11)).astype(float) @ [0.299, 0.587, 0.114]
  assert np.all(np.diff(light) > 0)                             # lightness rises along the ramp

  written = heatmaps.write_outputs(str(tmp_path), "S1", ["tumour", "fat"], np.stack([scores,
                                   1 - scores]), coords, 256, thumb, 8.0)
  assert Image.open(written[0]["png"]).size == image.size
  collection = json.load(open(written[1]["geojson"]))
  assert collection["type"] == "FeatureCollection" and len(collection["features"]) == 3
  feature = collection["features"][1]
  assert feature["properties"]["objectType"] == "detection"
  assert feature["properties"]["classification"]["name"] == "fat"
  assert feature["geometry"]["coordinates"][0] == [[256, 0], [512, 0], [512, 256], [256, 256],
                                                   [256, 0]]
  assert feature["properties"]["measurements"]["score"] == pytest.approx(0.1)
  assert feature["properties"]["measurements"]["score_normalised"] == pytest.approx(0.0)
  kept = heatmaps.geojson(coords, 256, scores, "tumour", min_score=0.4)["features"]
  assert len(kept) == 2
  assert heatmaps.safe_name('Invasive carcinoma, "grade 3"!') == "invasive_carcinoma_grade_3"


class _OracleModel(nnx.Module):
  """Scores each patch by its true tissue fraction for the query (features carry the fractions);
  ``sign`` -1 inverts the heatmap."""

  def __init__(self, query_tokens, query_columns, sign=1.0):
    self.query_tokens = nnx.Variable(jnp.asarray(query_tokens))
    self.columns = nnx.Variable(jax_one_hot(query_columns, len(demo_annotations.CLASS_LABELS)))
    self.sign = sign

  def encode_texts(self, tokens_tl):
    match = jnp.all(tokens_tl[:, None] == self.query_tokens[...][None], axis=-1)   # [t, q]
    return match.astype(jnp.float32) @ self.columns[...]

  def patch_heatmap(self, batch, text_bte, method="contribution"):
    fractions = batch["features"].astype(jnp.float32)
    return self.sign * jnp.einsum("bnc,btc->btn", fractions, text_bte)


def jax_one_hot(index, size):
  return jnp.eye(size, dtype=jnp.float32)[jnp.asarray(index)]


class _Task:
  """What the evaluator reads of an align task, over a feature directory of tissue fractions:
  the first ``val`` slides are the val split (Dice thresholds), the rest the test split."""

  def __init__(self, features_dir, texts, val=3, workdir=None):
    self.features_dir, self.texts, self.workdir = features_dir, texts, workdir
    self.splits = {"val": list(range(val)), "test": list(range(val, len(texts)))}
    self.example_config = slide_examples.ExampleConfig(region_patches=2, eval_num_regions=64,
                                                       subcaption_len=8, caption_len=8,
                                                       num_subcaptions=2, buckets=(64, 256))
    self.tokenizer = _Tokens()

  def source(self, split):
    indices = self.splits[split]
    return slide_examples.SlideSource(self.features_dir, indices,
                                      [self.texts[i] for i in indices])

  def eval_examples(self, split):
    source = self.source(split)
    return [slide_examples.build_example(source[i], self.example_config, self.tokenizer, None)
            for i in range(len(source))]


class _TruthReference:
  """Stands in for a patch_clip run (common.PatchClipReference): a patch embeds as its tissue
  fractions (the truth features), a query as its tissue's one-hot column."""

  def __init__(self, workdir, key=""):
    del workdir, key

  def class_embeddings(self, texts, prompt_class, num_classes):
    del texts
    columns = {demo_annotations.TISSUE_NAMES[c]: i
               for i, c in enumerate(demo_annotations.CLASS_LABELS)}
    queries = ["tumour", "benign glands", "stroma"]
    assert num_classes == len(queries) and len(prompt_class)
    return jax_one_hot([columns[q] for q in queries], len(columns)).__array__()

  def patch_embeddings(self, features, slide_id):
    del slide_id
    return np.asarray(features, np.float32)


@pytest.fixture(scope="module")
def truth_features(demo_cohort, demo_tiles, tmp_path_factory):
  """A feature directory over the demo cohort's tiles whose 6 features are each patch's true
  tissue fractions (what a perfect patch encoder would see)."""
  annotations = demo_annotations.CohortAnnotations(str(demo_cohort))
  patches = patch_shards.PatchShards(str(demo_tiles[0]))
  directory = tmp_path_factory.mktemp("truth_features")
  writer = feature_shards.FeatureWriter(str(directory), {"encoder": "truth", "feature_dim": 6})
  texts, rows = [], []
  for slide_id in sorted(annotations.slides):
    start, stop = patches.slide_range(slide_id)
    records = [patches[i] for i in range(start, stop)]
    coords = np.array([[r["x"], r["y"]] for r in records], np.int64)
    size = records[0]["patch_size_level0"]
    fractions = annotations.tissue_fractions(slide_id, coords, size)
    writer.add({"slide_id": slide_id, "features": fractions.astype(np.float16),
                "coords": coords, "patch_size_level0": size, "mpp": 0.5, "encoder": "truth",
                "weights_hash": "", "source": "test"}, {"slide_id": slide_id})
    rows.append({"slide_id": slide_id})
    texts.append(slide_examples.SlideText(slide_id, "x", ("x",), 0))
  writer.close(rows)
  return directory, texts


@pytest.mark.slow
def test_localization_evaluator_scores_oracle_and_inverted_heatmaps(demo_cohort, truth_features,
                                                                    tmp_path, monkeypatch):
  from pathflip_jax.evaluators import common, stats
  task = _Task(str(truth_features[0]), truth_features[1], workdir=str(tmp_path))
  queries = ["tumour", "benign glands", "stroma"]
  config = dict(split="test", cohort_dir=str(demo_cohort), queries=queries,
                lesions=["tumour", "benign glands"], prompts={"tumour": ["tumour", "carcinoma"]},
                froc=True, reference="truth_run")
  monkeypatch.setattr(common, "PatchClipReference", _TruthReference)
  evaluator = localization.Evaluator(ml_collections.ConfigDict(config), task, mesh=None)
  column = {demo_annotations.TISSUE_NAMES[c]: i
            for i, c in enumerate(demo_annotations.CLASS_LABELS)}
  prompt_columns = [column["tumour"], column["tumour"], column["benign glands"],
                    column["stroma"]]
  oracle_model = _OracleModel(evaluator.tokens, prompt_columns)
  oracle = evaluator.run(oracle_model)
  rows = stats.read_slide_rows(str(tmp_path / "eval"), "localization", "test")
  inverted = evaluator.run(_OracleModel(evaluator.tokens, prompt_columns, sign=-1.0))
  assert oracle["num_slides/tumour"] >= 1 and oracle["num_slides/stroma"] >= 1
  # The truth ranks every positive patch (>= half tissue) above every negative one.
  assert oracle["auroc/tumour"] == 1.0 and oracle["auroc/stroma"] == 1.0
  assert oracle["dice/tumour"] > 0.8
  assert inverted["auroc/tumour"] == 0.0 and inverted["mean_lesion_auroc"] < 0.2
  assert oracle["mean_lesion_froc"] > 0.9 and inverted["mean_lesion_froc"] < oracle[
      "mean_lesion_froc"]
  assert oracle["chance_auroc"] == 0.5
  # Every metric has an interval holding it; counts, thresholds and chance have none.
  for result in (oracle, inverted):
    for key in [k for k in result if k.startswith(("auroc/", "dice/", "froc/", "mean_lesion",
                                                   "reference/auroc", "minus_reference/"))
                and not stats.is_interval_key(k)]:
      assert result[key + "/ci_low"] - 1e-9 <= result[key] <= result[key + "/ci_high"] + 1e-9, key
  assert "num_slides/tumour/ci_low" not in oracle and "chance_auroc/ci_low" not in oracle
  # The reference (the truth itself) and the paired differences: the inverted heatmap is worse
  # on these slides beyond doubt, the oracle ties it on AUROC.
  assert oracle["reference/mean_lesion_auroc"] == 1.0
  assert oracle["minus_reference/mean_lesion_auroc"] == 0.0
  assert inverted["minus_reference/mean_lesion_auroc/ci_high"] < -0.5
  # The Dice threshold comes from the val slides' heatmaps, and Dice is the test slides' there.
  val = evaluator.tabulate(evaluator.slide_heatmaps(oracle_model, "val"))
  test = evaluator.tabulate(evaluator.slide_heatmaps(oracle_model, "test"))
  assert set(val.slide_ids).isdisjoint(test.slide_ids) and len(test.slide_ids) == 5
  chosen = localization.choose_thresholds(val)
  for q, query in enumerate(queries):
    key = heatmaps.safe_name(query)
    if f"dice/{key}" in oracle:
      assert oracle[f"dice_threshold/{key}"] == localization.THRESHOLDS[chosen[q]]
      per_slide = test.dice[:, q, chosen[q]]
      assert oracle[f"dice/{key}"] == pytest.approx(np.nanmean(per_slide))
  # Per-slide rows: what compare pairs across runs.
  assert [r["slide_id"] for r in rows] == test.slide_ids
  tumour = [r["auroc"]["tumour"] for r in rows if r["auroc"]["tumour"] is not None]
  assert np.mean(tumour) == oracle["auroc/tumour"] and rows[0]["lesions"] == ["tumour",
                                                                              "benign_glands"]
  assert "froc_hits" in rows[0] and "froc_false_positives" in rows[0]
  with pytest.raises(ValueError, match="queries names \\['tumor'\\]"):
    localization.Evaluator(ml_collections.ConfigDict({**config, "queries": ["tumor"]}), task,
                           None)
  with pytest.raises(ValueError, match="cohort_dir='/nonexistent'"):
    localization.Evaluator(ml_collections.ConfigDict({**config, "cohort_dir": "/nonexistent"}),
                           task, None)
  with pytest.raises(ValueError, match="threshold_split='test' is the split scored"):
    localization.Evaluator(ml_collections.ConfigDict({**config, "threshold_split": "test"}),
                           task, None)
  with pytest.raises(ValueError, match="threshold_split='tune': no such split"):
    localization.Evaluator(ml_collections.ConfigDict({**config, "threshold_split": "tune"}),
                           task, None)
  # A cohort too small for a val split: a fixed level, not one chosen on the test slides.
  no_val = localization.Evaluator(ml_collections.ConfigDict(config),
                                  _Task(str(truth_features[0]), truth_features[1], val=0), None)
  assert no_val.threshold_split == ""
  assert no_val.thresholds(None, "model").tolist() == [localization.DEFAULT_THRESHOLD] * 3


def test_dice_threshold_is_chosen_on_another_split():
  """The level that is best on the val slides is the one the test slides are scored at, even
  where another level would score the test slides higher."""
  levels = localization.THRESHOLDS

  def table(peaks):
    # One query; per slide a Dice curve over the levels peaking at ``peak``.
    curves = np.stack([np.exp(-((np.arange(len(levels)) - p) / 3.0) ** 2) for p in peaks])
    return localization.SlideTable([f"s{i}" for i in range(len(peaks))],
                                   np.full((len(peaks), 1), 0.7), curves[:, None, :],
                                   [[np.zeros(0)] * len(peaks)], [[np.zeros(0)] * len(peaks)])

  val, test = table([3, 4, 3]), table([15, 16, 15, 14])
  chosen = localization.choose_thresholds(val)
  assert chosen.tolist() == [3]
  metric = localization.table_metrics(test, ["tumour"], ["tumour"], chosen, froc=False)
  got = metric(np.arange(4))
  assert got["dice/tumour"] == pytest.approx(test.dice[:, 0, 3].mean())
  best_on_test = test.dice[:, 0].mean(0).max()
  assert got["dice/tumour"] < 0.5 * best_on_test            # what choosing on test would give
  assert got["mean_lesion_dice"] == got["dice/tumour"] and got["auroc/tumour"] == 0.7
  # A query no val slide can score falls back to the middle of the normalised scale.
  empty = localization.SlideTable(["v"], np.full((1, 1), np.nan), np.full((1, 1, len(levels)),
                                  np.nan), [[np.zeros(0)]], [[np.zeros(0)]])
  assert levels[localization.choose_thresholds(empty)[0]] == pytest.approx(0.5)


@pytest.mark.slow
def test_evaluate_cli_runs_every_evaluator_on_a_checkpoint(demo_cohort, truth_features,
                                                           tmp_path, capsys):
  """Trained without evaluators; evaluate --config adds them (with overrides), and evaluate
  without --config runs the ones the run's own config.json lists."""
  arg = (f"configs/pathflip_demo.py:size=test,features_dir={truth_features[0]},"
         f"manifest={demo_cohort / 'manifest.jsonl'},cohort_dir={demo_cohort}")
  fast = ["--config.total_steps=2", "--config.log_steps=2", "--config.input.worker_count=0"]
  workdir = tmp_path / "align"
  train.main(["--config", arg + ",eval_split=", *fast, "--workdir", str(workdir)])
  assert not json.load(open(workdir / "config.json"))["evals"]
  capsys.readouterr()
  with pytest.raises(SystemExit, match="--only names \\['zero-shot'\\]"):
    evaluate.main(["--config", arg, "--workdir", str(workdir), "--only", "zero-shot"])
  with pytest.raises(SystemExit, match="--step 7: .* checkpoints at steps \\[2\\]"):
    evaluate.main(["--config", arg, "--workdir", str(workdir), "--step", "7"])
  with pytest.raises(SystemExit, match="config.evals is empty"):
    evaluate.main(["--workdir", str(workdir)])     # the run's own: no evaluators
  evaluate.main(["--config", arg, *fast, "--config.evals.localization.froc=False",
                 "--workdir", str(workdir)])
  printed = json.loads(capsys.readouterr().out)
  assert set(printed) == {"zero_shot", "retrieval", "localization"}
  record = json.load(open(workdir / "eval" / "localization.json"))
  assert record["step"] == 2 and record["type"] == "localization"
  assert 0.0 <= record["metrics"]["mean_lesion_auroc"] <= 1.0
  assert record["config"]["froc"] is False and "froc/tumour" not in record["metrics"]
  table = (workdir / "eval" / "metrics.md").read_text()
  assert "| localization | mean_lesion_auroc |" in table
  assert "| zero_shot | balanced_accuracy |" in table


def test_froc_score_counts_each_lesion_once():
  # Two slides, two lesions: a hit, a false positive, the other lesion, a repeat hit (ignored
  # for sensitivity), an ignored detection.
  detections = [(0.9, "a", 1), (0.8, "a", 0), (0.7, "b", 2), (0.6, "a", 1), (0.5, "b", -1)]
  # FPs per slide after each: 0, 0.5, 0.5, 0.5, 0.5; sensitivity 0.5, 0.5, 1, 1, 1.
  assert localization.froc_score(detections, 2, 2) == pytest.approx((0.5 + 5 * 1.0) / 6)
  assert localization.froc_score([(0.9, "a", 0)] * 40, 1, 1) == 0.0


def test_contour_geojson_outlines_connected_high_areas():
  # A 3 x 3 patch grid at (1000, 2000): a 2 x 2 hot block top left, one hot patch bottom right.
  coords = np.array([(1000 + 256 * c, 2000 + 256 * r) for r in range(3) for c in range(3)])
  scores = np.array([0.9, 0.8, 0.0,
                     1.0, 0.95, 0.1,
                     0.0, 0.2, 0.7])
  features = heatmaps.contour_geojson(coords, 256, scores, "tumour")["features"]
  assert len(features) == 2
  by_size = sorted(features, key=lambda f: -f["properties"]["measurements"]["patches"])
  assert [f["properties"]["measurements"]["patches"] for f in by_size] == [4.0, 1.0]
  assert all(f["properties"]["objectType"] == "annotation" for f in features)
  assert by_size[0]["properties"]["classification"]["name"] == "tumour"
  ring = np.array(by_size[0]["geometry"]["coordinates"][0])
  # The outline follows the block's edges to within a quarter patch (the mask resolution).
  np.testing.assert_allclose(ring.min(0), [1000, 2000], atol=64)
  np.testing.assert_allclose(ring.max(0), [1000 + 512, 2000 + 512], atol=64)
  small = np.array(by_size[1]["geometry"]["coordinates"][0])
  assert small.min(0)[0] > 1000 + 2 * 256 - 64 and small.max(0)[1] < 2000 + 3 * 256 + 64
  assert by_size[0]["properties"]["measurements"]["mean_score_normalised"] == pytest.approx(
      (0.9 + 0.8 + 1.0 + 0.95) / 4)
