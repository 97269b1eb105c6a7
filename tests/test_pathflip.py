"""PathFLIP model and slide examples: chunked cross-attention, regions, padding, sizes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pathflip_jax import config_args
from pathflip_jax.data import regions, slide_examples
from pathflip_jax.models import layers, pathflip, qformer
from pathflip_jax.tasks import align


def _tiny_config(**overrides) -> pathflip.PathFlipConfig:
  q = qformer.QFormerConfig(feature_dim=12, width=16, depth=2, num_heads=2, mlp_ratio=2.0,
                            num_queries=3, vocab_size=40, max_text_len=16, kv_chunk=8)
  fields = dict(embed_dim=16, context_depth=1, context_heads=2, region_heads=2,
                position_frequencies=3)
  fields.update(overrides)
  return pathflip.PathFlipConfig(qformer=q, **fields)


def test_chunked_cross_attention_equals_full_attention():
  attention = layers.MultiHeadAttention(16, 2, rngs=nnx.Rngs(0), dtype=jnp.float32,
                                        param_dtype=jnp.float32)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 4, 16)), jnp.float32)
  kv = jnp.asarray(rng.normal(size=(3, 37, 16)), jnp.float32)
  valid = rng.random((3, 37)) < 0.7
  valid[1, :30] = False          # valid keys only in the last (partial) chunk
  valid = jnp.asarray(valid)
  graphdef, state = nnx.split(attention)

  def full(state, x, kv):
    return nnx.merge(graphdef, state)(x, kv, valid)

  def chunked(state, x, kv):
    return nnx.merge(graphdef, state).chunked(x, kv, valid, chunk=8)

  loss = lambda f: lambda s, x, kv: jnp.sum(jnp.sin(f(s, x, kv)))

  @jax.jit  # one compilation: eager ops (and an eager scan) each compile on their own
  def outputs_and_grads(state, x, kv):
    return (full(state, x, kv), chunked(state, x, kv),
            jax.grad(loss(full), argnums=(0, 1, 2))(state, x, kv),
            jax.grad(loss(chunked), argnums=(0, 1, 2))(state, x, kv))

  out_full, out_chunk, g_full, g_chunk = outputs_and_grads(state, x, kv)
  np.testing.assert_allclose(out_chunk, out_full, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g_chunk), jax.tree.leaves(g_full), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_text_cls_of_last_layer_equals_full_text_branch():
  model = qformer.QFormer(_tiny_config().qformer, rngs=nnx.Rngs(1))
  tokens = jnp.asarray([[1, 5, 9, 7, 0, 0], [1, 3, 0, 0, 0, 0]], jnp.int32)

  @nnx.jit  # one compilation instead of one per eager op
  def run(model):
    valid = tokens != model.config.pad_id
    x, _ = model.text_embed(tokens)
    for layer in model.layers:                   # every row through every layer
      x = layer.text(x, valid)
    longer = jnp.pad(tokens, ((0, 0), (0, 4)))
    return model.norm(x[:, 0]), model.encode_text(tokens), model.encode_text(longer)

  full, cls, cls_longer = run(model)
  np.testing.assert_allclose(cls, full, rtol=1e-5, atol=1e-5)
  # Padding after the text does not change its CLS output.
  np.testing.assert_allclose(cls_longer, cls, rtol=1e-5, atol=1e-5)


def test_group_patches_by_level0_grid():
  size = 256
  # A 5 x 3 grid of patches starting at an offset: regions of 2 x 2 patches.
  coords = np.array([(1000 + i * size, 500 + j * size) for j in range(3) for i in range(5)])
  grid, origin = regions.group_patches(coords, size, 2)
  centres = coords + size / 2
  cells = np.floor(centres / 512).astype(int)
  assert grid.num_regions == len(np.unique(cells, axis=0))
  assert sorted(np.concatenate(grid.members).tolist()) == list(range(len(coords)))
  for r, members in enumerate(grid.members):
    assert len(members) <= 4
    assert len({tuple(cells[i]) for i in members}) == 1          # one level-0 cell per region
    np.testing.assert_array_equal(grid.cells[r], cells[members[0]] - cells.min(0))
  bounds = grid.bounds_level0(origin)
  for r, members in enumerate(grid.members):   # every member's centre lies in its region
    c = centres[members]
    assert np.all((c >= bounds[r, :2]) & (c < bounds[r, 2:]))
  # An overlapping tiling (step = half a patch) still puts each patch in exactly one region.
  overlap = np.array([(i * 128, j * 128) for j in range(6) for i in range(6)])
  grid, _ = regions.group_patches(overlap, size, 2)
  assert sum(len(m) for m in grid.members) == len(overlap)
  assert max(grid.counts()) > 4


def _element(n=70, dim=12, seed=0):
  rng = np.random.default_rng(seed)
  cols = 10
  coords = np.array([((i % cols) * 256, (i // cols) * 256) for i in range(n)], np.int64)
  text = slide_examples.SlideText("s1", "One. Two. Three.", ("One.", "Two.", "Three."), 2)
  return {"features": rng.normal(size=(n, dim)).astype(np.float16), "coords": coords,
          "patch_size_level0": 256.0, "text": text, "slide_index": 5}


class _Tokens:
  """A stand-in tokenizer: one token per character (enough to check shapes and padding)."""

  def encode_batch(self, texts, max_len):
    out = np.zeros((len(texts), max_len), np.int32)
    for i, t in enumerate(texts):
      ids = [2] + [3 + ord(c) % 30 for c in t][:max_len - 1]
      out[i, :len(ids)] = ids
    return out


def test_build_example_samples_regions_and_pads_to_buckets():
  config = slide_examples.ExampleConfig(region_patches=2, num_regions=6, eval_num_regions=40,
                                        num_subcaptions=4, caption_len=24, subcaption_len=12,
                                        buckets=(64, 128), patch_dropout=0.2)
  element = _element()
  a = slide_examples.build_example(element, config, _Tokens(), np.random.default_rng(1))
  b = slide_examples.build_example(element, config, _Tokens(), np.random.default_rng(1))
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])           # same rng, same example
  kept = int(a["patch_valid"].sum())
  assert a["features"].shape == (128 if kept > 64 else 64, 12)
  assert a["region_index"].shape == (6, 4) and a["region_valid"].all()
  assert a["subcaptions"].shape == (4, 12) and a["subcaption_valid"].all()
  # Region members are valid patches, and the patches of one region share one 2x2 cell.
  for index, valid in zip(a["region_index"], a["region_patch_valid"]):
    assert a["patch_valid"][index[valid]].all()
  # Evaluation: every patch, fullest regions first, deterministic; padding regions are invalid.
  e = slide_examples.build_example(element, config, _Tokens(), None)
  assert e["patch_valid"].sum() == 70 and e["features"].shape == (128, 12)
  counts = e["region_patch_valid"].sum(1)[e["region_valid"]]
  assert list(counts) == sorted(counts, reverse=True)
  assert e["region_valid"].sum() == 5 * 4      # 10 x 7 patches -> 5 x 4 regions
  assert list(e["subcaption_valid"]) == [True, True, True, False]
  np.testing.assert_array_equal(e["features"][:70], element["features"])
  small = slide_examples.build_example(_element(n=20), config, _Tokens(), None)
  batch = slide_examples.collate([small, e])
  assert batch["features"].shape == (2, 128, 12) and batch["patch_valid"][0].sum() == 20


def _inputs(example):
  return {k: jnp.asarray(v)[None] for k, v in example.items()}


def test_slide_encoder_ignores_padding_and_region_order():
  model = pathflip.PathFlip(_tiny_config(), rngs=nnx.Rngs(0))
  base = slide_examples.ExampleConfig(region_patches=2, eval_num_regions=24, num_subcaptions=2,
                                      caption_len=8, subcaption_len=8, buckets=(32,))
  padded = dataclasses.replace(base, buckets=(256,), eval_num_regions=40)
  element = _element(n=30)

  @nnx.jit  # one compilation for both layouts (eager ops and scans each compile on their own)
  def run(model, inputs_a, inputs_b, tokens):
    a, b = model.encode_slides(inputs_a), model.encode_slides(inputs_b)
    text = model.encode_texts(tokens)[None]
    za = model.text_conditioned_regions(text, a["regions"], a["region_valid"])
    zb = model.text_conditioned_regions(text, b["regions"], b["region_valid"])
    return a, b, za, zb, model.region_text_attention(text, b["regions"], b["region_valid"])

  a, b, za, zb, weights = run(
      model, _inputs(slide_examples.build_example(element, base, _Tokens(), None)),
      _inputs(slide_examples.build_example(element, padded, _Tokens(), None)),
      jnp.asarray(_Tokens().encode_batch(["abc", "de"], 8)))
  assert a["regions"].shape[1] == 24 and b["regions"].shape[1] == 40
  np.testing.assert_allclose(a["slide"], b["slide"], rtol=2e-5, atol=2e-5)
  r = int(a["region_valid"].sum())
  assert r == 10                                  # 10 x 3 patches -> 5 x 2 regions
  np.testing.assert_allclose(a["regions"][:, :r], b["regions"][:, :r], rtol=2e-5, atol=2e-5)
  # Text-conditioned embeddings attend over valid regions only.
  np.testing.assert_allclose(za, zb, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
  assert float(jnp.abs(weights[..., r:]).max()) == 0.0


def test_region_attention_ablation_uses_mean_of_regions():
  model = pathflip.PathFlip(_tiny_config(region_attention=False), rngs=nnx.Rngs(0))
  assert model.region_attention is None
  regions_bme = jax.random.normal(jax.random.key(0), (2, 5, 16))
  valid_bm = jnp.array([[1, 1, 0, 1, 0], [1, 0, 0, 0, 0]], bool)
  text_bte = jax.random.normal(jax.random.key(1), (2, 3, 16))
  z = model.text_conditioned_regions(text_bte, regions_bme, valid_bm)
  np.testing.assert_allclose(z[0, 2], regions_bme[0, jnp.array([0, 1, 3])].mean(0), rtol=1e-5)
  np.testing.assert_allclose(z[1, 0], regions_bme[1, 0], rtol=1e-6)


def test_qformer_ablations_replace_the_region_and_slide_qformers():
  """region_qformer=False: a region's token is a projection of the mean of its patch features
  and its patches weigh equally in heatmaps; slide_qformer=False: the slide token is the mean of
  the region tokens, so patches outside the kept regions no longer reach it."""
  config = slide_examples.ExampleConfig(region_patches=2, eval_num_regions=2, num_subcaptions=2,
                                        caption_len=8, subcaption_len=8, buckets=(32,))
  batch = _inputs(slide_examples.build_example(_element(n=30), config, _Tokens(), None))
  # Real patches in none of the two kept regions: changing them must not reach a slide token
  # made of region tokens.
  n = batch["features"].shape[1]
  outside = (jnp.arange(n) < 30).at[batch["region_index"][0][batch["region_patch_valid"][0]]].set(
      False)
  changed = dict(batch, features=jnp.where(outside[None, :, None], batch["features"] + 3.0,
                                           batch["features"]))
  models = {name: pathflip.PathFlip(_tiny_config(**switch), rngs=nnx.Rngs(0))
            for name, switch in (("paper", {}), ("no_region_qformer", {"region_qformer": False}),
                                 ("no_slide_qformer", {"slide_qformer": False}))}

  @nnx.jit
  def run(model):
    patches = model.qformer.project_features(batch["features"])
    return (model.region_tokens(patches, batch), model.region_patch_weights(patches, batch),
            model.encode_slides(batch)["slide"], model.encode_slides(changed)["slide"])

  tokens, weights, slide, slide_changed = run(models["no_region_qformer"])
  proj = models["no_region_qformer"].region_feature_proj
  index, valid = np.asarray(batch["region_index"][0]), np.asarray(batch["region_patch_valid"][0])
  features = np.asarray(batch["features"][0], np.float32)
  for m in range(2):
    mean = features[index[m][valid[m]]].mean(0)
    np.testing.assert_allclose(tokens[0, m], mean @ np.asarray(proj.kernel[...])
                               + np.asarray(proj.bias[...]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(weights[0, m][valid[m]], 1.0 / valid[m].sum(), rtol=1e-6)
  assert models["paper"].region_feature_proj is None
  # The slide token: from every patch with the slide Q-Former, from the regions without it.
  assert bool(outside.any())
  _, _, slide, slide_changed = run(models["paper"])
  assert float(jnp.abs(slide - slide_changed).max()) > 1e-4
  _, _, slide, slide_changed = run(models["no_slide_qformer"])
  np.testing.assert_allclose(slide, slide_changed, rtol=1e-5, atol=1e-6)


def test_patch_attention_is_a_distribution_over_valid_patches():
  model = pathflip.PathFlip(_tiny_config(), rngs=nnx.Rngs(0))
  features = jax.random.normal(jax.random.key(0), (2, 11, 12))
  valid = jnp.arange(11)[None] < jnp.array([[11], [6]])
  weights = nnx.jit(lambda m: m.qformer.patch_attention(m.qformer.project_features(features),
                                                        valid))(model)
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
  assert float(weights[1, 6:].max()) == 0.0


def test_paper_config_has_a_bert_base_sized_qformer():
  config = config_args.load_config("configs/pathflip_paper.py:features_dir=F")
  model_config = align.model_config(config, vocab_size=30522, pad_id=0, feature_dim=512)
  assert model_config.qformer.width == 768 and model_config.qformer.depth == 12
  assert model_config.embed_dim == 256 and model_config.qformer.num_queries == 8
  model = nnx.eval_shape(lambda: pathflip.PathFlip(model_config, rngs=nnx.Rngs(0)))
  qformer_params = layers.count_params(model.qformer)
  # BERT-base is 110 M; BLIP-2's Q-Former (BERT-base + cross-attention + query MLPs) 188 M.
  assert 150e6 < qformer_params < 200e6, qformer_params
  assert layers.count_params(model) - qformer_params < 5e6      # context + projections are small
  cross = [layer.cross_attention is not None for layer in model.qformer.layers]
  assert cross == [i % 2 == 0 for i in range(12)]


def test_config_errors_name_the_key():
  config = config_args.load_config("configs/pathflip_demo.py:size=test")
  with config.unlocked():
    config.data.region_size = 3
  with pytest.raises(ValueError, match="config.data has unknown keys.*region_size"):
    align.example_config(config)
  config = config_args.load_config("configs/pathflip_demo.py:size=test")
  with config.unlocked():
    config.model.qformer.widht = 3
  with pytest.raises(ValueError, match="config.model.qformer has unknown keys.*widht"):
    align.model_config(config, 100, 0, 12)
