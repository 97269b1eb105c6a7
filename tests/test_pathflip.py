"""PathFLIP model and slide examples: chunked cross-attention, regions, padding, sizes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pathflip_jax import config_args, optim
from pathflip_jax.data import regions, slide_examples
from pathflip_jax.models import pathflip, qformer, vit
from pathflip_jax.tasks import align


def _tiny_config(**overrides) -> pathflip.PathFlipConfig:
  q = qformer.QFormerConfig(feature_dim=12, width=16, depth=2, num_heads=2, mlp_ratio=2.0,
                            num_queries=3, vocab_size=40, max_text_len=16, kv_chunk=8)
  fields = dict(embed_dim=16, context_depth=1, context_heads=2, region_heads=2,
                position_frequencies=3)
  fields.update(overrides)
  return pathflip.PathFlipConfig(qformer=q, **fields)


def test_chunked_cross_attention_equals_full_attention():
  attention = qformer.Attention(16, 2, rngs=nnx.Rngs(0), dtype=jnp.float32,
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
    x = jnp.take(model.token_embed[...], tokens, axis=0) + model.pos_embed[:6]
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
  # Concept bits of the caption and of each subcaption for the named-negative rule.
  assert e["caption_concepts"] == 0 and not e["subcaption_concepts"].any()
  named = dataclasses.replace(config, negative_lexicon=(("one", ("one",)), ("three", ("three",))))
  n = slide_examples.build_example(element, named, _Tokens(), None)
  assert n["caption_concepts"] == 0b11
  np.testing.assert_array_equal(n["subcaption_concepts"], [0b01, 0, 0b10, 0])


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


def test_feature_shortcut_starts_tokens_as_projected_mean_features():
  """feature_shortcut: at initialisation a region token is the shortcut of its patches' mean
  feature (the Q-Former's projection and the positions' start at zero), and with
  identity_region_values the text-conditioned embedding is each head's attention-weighted mean
  of the layer-normed regions; training still reaches the Q-Former."""
  model = pathflip.PathFlip(_tiny_config(feature_shortcut=True, identity_region_values=True),
                            rngs=nnx.Rngs(0))
  config = slide_examples.ExampleConfig(region_patches=2, eval_num_regions=24, num_subcaptions=2,
                                        caption_len=8, subcaption_len=8, buckets=(32,))
  batch = _inputs(slide_examples.build_example(_element(n=30), config, _Tokens(), None))
  features = np.asarray(batch["features"][0], np.float32)
  kept = np.asarray(batch["region_valid"][0])
  index = np.asarray(batch["region_index"][0])[kept]
  member = np.asarray(batch["region_patch_valid"][0])[kept]
  mean_me = np.stack([features[i[v]].mean(0) for i, v in zip(index, member)])
  shortcut = model.feature_shortcut
  expected_me = mean_me @ np.asarray(shortcut.kernel[...]) + np.asarray(shortcut.bias[...])
  patches = model.qformer.project_features(batch["features"])
  np.testing.assert_allclose(model.region_tokens(patches, batch)[0][kept], expected_me,
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(model.position_proj.kernel[...]), 0.0)

  regions_bme = jax.random.normal(jax.random.key(0), (1, 5, 16))
  valid_bm = jnp.array([[1, 1, 0, 1, 1]], bool)
  text_bte = jax.random.normal(jax.random.key(1), (1, 3, 16))
  z_bte = model.text_conditioned_regions(text_bte, regions_bme, valid_bm)
  weights_bhtm = model.region_attention.head_weights(text_bte, regions_bme, valid_bm)
  normed_bmhc = model.region_attention.region_norm(regions_bme).reshape(1, 5, 2, 8)
  expected_bte = jnp.einsum("bhtm,bmhc->bthc", weights_bhtm, normed_bmhc).reshape(1, 3, 16)
  np.testing.assert_allclose(z_bte, expected_bte, rtol=1e-5, atol=1e-6)

  def slide_norm(model):
    return jnp.sum(model.encode_slides(batch)["slide"] * jnp.arange(16.0))
  grads = nnx.grad(slide_norm)(model)
  assert float(jnp.abs(grads.vision_proj.kernel[...]).max()) > 0
  assert float(jnp.abs(grads.position_proj.kernel[...]).max()) > 0


def test_patch_attention_is_a_distribution_over_valid_patches():
  model = pathflip.PathFlip(_tiny_config(), rngs=nnx.Rngs(0))
  features = jax.random.normal(jax.random.key(0), (2, 11, 12))
  valid = jnp.arange(11)[None] < jnp.array([[11], [6]])
  weights = nnx.jit(lambda m: m.qformer.patch_attention(m.qformer.project_features(features),
                                                        valid))(model)
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
  assert float(weights[1, 6:].max()) == 0.0


def test_slide_shortcut_false_leaves_the_slide_token_to_the_qformer():
  """Without the context Transformer the slide embedding is the normed slide token: at
  initialisation (the Q-Former's projection at zero) it is the shortcut's with slide_shortcut,
  and zero without it, while the region tokens keep their shortcut."""
  config = slide_examples.ExampleConfig(region_patches=2, eval_num_regions=24, num_subcaptions=2,
                                        caption_len=8, subcaption_len=8, buckets=(32,))
  batch = _inputs(slide_examples.build_example(_element(n=30), config, _Tokens(), None))
  encoded = {}
  for slide_shortcut in (True, False):
    model = pathflip.PathFlip(_tiny_config(feature_shortcut=True, slide_shortcut=slide_shortcut,
                                           context_depth=0), rngs=nnx.Rngs(0))
    encoded[slide_shortcut] = nnx.jit(lambda m: m.encode_slides(batch))(model)
  assert float(jnp.abs(encoded[True]["slide"]).max()) > 0.1
  np.testing.assert_array_equal(encoded[False]["slide"], 0.0)
  np.testing.assert_allclose(encoded[False]["regions"], encoded[True]["regions"], rtol=1e-6)


def test_region_patch_weights_mix_in_the_shortcut_mean():
  """The heatmap's within-region weights: the region Q-Former's attention for the paper's model;
  with feature_shortcut the plain mean enters by the shortcut's share of the token (all of it at
  initialisation, where the Q-Former's projection is zero)."""
  config = slide_examples.ExampleConfig(region_patches=2, eval_num_regions=24, num_subcaptions=2,
                                        caption_len=8, subcaption_len=8, buckets=(32,))
  batch = _inputs(slide_examples.build_example(_element(n=30), config, _Tokens(), None))
  valid = np.asarray(batch["region_patch_valid"])
  kept = np.asarray(batch["region_valid"])
  b, m, p = valid.shape
  uniform = valid / np.maximum(valid.sum(-1, keepdims=True), 1)

  def weights(model):
    patches = model.qformer.project_features(batch["features"])
    attention = model.qformer.patch_attention(model.region_patches(patches, batch["region_index"]),
                                              batch["region_patch_valid"].reshape(b * m, p))
    return model.region_patch_weights(patches, batch), attention.reshape(b, m, p)

  paper = pathflip.PathFlip(_tiny_config(), rngs=nnx.Rngs(0))
  mixed, attention = nnx.jit(weights)(paper)
  np.testing.assert_array_equal(mixed, attention)
  assert not np.allclose(attention[kept], uniform[kept])

  shortcut = pathflip.PathFlip(_tiny_config(feature_shortcut=True), rngs=nnx.Rngs(0))
  mixed, _ = nnx.jit(weights)(shortcut)
  np.testing.assert_allclose(mixed[kept], uniform[kept], rtol=1e-6)
  # A trained Q-Former projection takes its share: the weights lie between the two poolings.
  shortcut.vision_proj.kernel[...] = jax.random.normal(jax.random.key(2),
                                                       shortcut.vision_proj.kernel.shape)
  mixed, attention = nnx.jit(weights)(shortcut)
  np.testing.assert_allclose(mixed.sum(-1)[kept], 1.0, rtol=1e-5)
  low, high = np.minimum(attention, uniform), np.maximum(attention, uniform)
  assert np.all(mixed[kept] >= low[kept] - 1e-6) and np.all(mixed[kept] <= high[kept] + 1e-6)
  assert not np.allclose(mixed[kept], uniform[kept]) and not np.allclose(mixed[kept],
                                                                         attention[kept])


def test_paper_config_has_a_bert_base_sized_qformer():
  config = config_args.load_config("configs/pathflip_paper.py:features_dir=F")
  model_config = align.model_config(config, vocab_size=30522, pad_id=0, feature_dim=512)
  assert model_config.qformer.width == 768 and model_config.qformer.depth == 12
  assert model_config.embed_dim == 256 and model_config.qformer.num_queries == 8
  model = nnx.eval_shape(lambda: pathflip.PathFlip(model_config, rngs=nnx.Rngs(0)))
  qformer_params = vit.count_params(model.qformer)
  # BERT-base is 110 M; BLIP-2's Q-Former (BERT-base + cross-attention + query MLPs) 188 M.
  assert 150e6 < qformer_params < 200e6, qformer_params
  assert vit.count_params(model) - qformer_params < 5e6      # context + projections are small
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


def test_heatmap_reuses_the_region_tokens_parts():
  """``encode_slides(..., return_region_parts=True)`` hands the heatmap the regions' two
  poolings, so the region Q-Former runs once; the weights are the same as computed afresh."""
  config = slide_examples.ExampleConfig(region_patches=2, eval_num_regions=24, num_subcaptions=2,
                                        caption_len=8, subcaption_len=8, buckets=(32,))
  batch = _inputs(slide_examples.build_example(_element(n=30), config, _Tokens(), None))
  model = pathflip.PathFlip(_tiny_config(feature_shortcut=True), rngs=nnx.Rngs(0))
  model.vision_proj.kernel[...] = jax.random.normal(jax.random.key(2),
                                                    model.vision_proj.kernel.shape)

  def both(model):
    patches = model.qformer.project_features(batch["features"])
    encoded = model.encode_slides(batch, patches, return_region_parts=True)
    return (model.region_patch_weights(patches, batch, encoded["region_parts"]),
            model.region_patch_weights(patches, batch), encoded)

  reused, afresh, encoded = nnx.jit(both)(model)
  np.testing.assert_allclose(reused, afresh, rtol=1e-6, atol=1e-7)
  token_ke, shortcut_ke = encoded["region_parts"]
  b, m, _ = batch["region_index"].shape
  assert token_ke.shape == shortcut_ke.shape == (b * m, model.config.embed_dim)
  # The parts are the region tokens before their positions are added.
  np.testing.assert_allclose((token_ke + shortcut_ke).reshape(b, m, -1),
                             model.region_tokens(
                                 model.qformer.project_features(batch["features"]), batch),
                             rtol=1e-5, atol=1e-6)


def test_identity_values_arg_sets_the_value_path_start():
  """``identity_values`` applies with ``feature_shortcut`` only; False leaves the text-conditioned
  attention's value/output projections at their random start, as in the paper."""
  def identity_start(arg):
    config = config_args.load_config(f"configs/pathflip_demo.py:size=test{arg}")
    return config.model.identity_region_values

  assert identity_start(",feature_shortcut=True")
  assert not identity_start(",feature_shortcut=True,identity_values=False")
  assert not identity_start("")
  for start in (True, False):
    model = pathflip.PathFlip(_tiny_config(feature_shortcut=True, identity_region_values=start),
                              rngs=nnx.Rngs(0))
    v_kernel = np.asarray(model.region_attention.attention.v_kernel[...])
    identity = np.eye(v_kernel.shape[0]).reshape(v_kernel.shape)
    assert np.array_equal(v_kernel, identity) == start


def test_value_gate_arg_sets_the_gate_and_its_learning_rate():
  """``value_gate`` (with ``feature_shortcut``) replaces the identity start by the shut gate,
  whose learning rate ``gate_lr`` multiplies (``optim.lr_multipliers``, on the gate alone)."""
  config = config_args.load_config(
      "configs/pathflip_demo.py:size=test,feature_shortcut=True,value_gate=True,gate_lr=20")
  assert config.model.region_value_gate and not config.model.identity_region_values
  model = pathflip.PathFlip(_tiny_config(feature_shortcut=True, region_value_gate=True),
                            rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  factors = optim.lr_multiplier_tree(params, tuple(config.optim.lr_multipliers.items()))
  scaled = {path: factor for path, factor in zip(jax.tree.leaves(optim.param_paths(params)),
                                                 jax.tree.leaves(factors)) if factor != 1.0}
  assert scaled == {"region_attention/value_gate": 20.0}
  plain = config_args.load_config("configs/pathflip_demo.py:size=test,value_gate=True")
  assert not plain.model.region_value_gate and "lr_multipliers" not in plain.optim


def test_value_gate_starts_shut_and_adds_the_identity_path():
  """region_value_gate: the value/output projections start at random and the gate at 0, so
  the text-conditioned embedding starts as without it; gate g adds g times each head's
  attention-weighted mean of the normed regions (what identity_region_values starts with)."""
  regions_bme = jax.random.normal(jax.random.key(0), (2, 5, 16))
  valid_bm = jnp.array([[1, 1, 0, 1, 1], [1, 0, 0, 0, 0]], bool)
  text_bte = jax.random.normal(jax.random.key(1), (2, 3, 16))
  plain = pathflip.PathFlip(_tiny_config(feature_shortcut=True), rngs=nnx.Rngs(0))
  gated = pathflip.PathFlip(_tiny_config(feature_shortcut=True, region_value_gate=True),
                            rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(np.asarray(gated.region_attention.value_gate[...]), 0.0)
  z_plain = plain.text_conditioned_regions(text_bte, regions_bme, valid_bm)
  np.testing.assert_allclose(gated.text_conditioned_regions(text_bte, regions_bme, valid_bm),
                             z_plain, rtol=1e-6, atol=1e-7)
  identity = pathflip.PathFlip(_tiny_config(feature_shortcut=True, identity_region_values=True),
                               rngs=nnx.Rngs(0))
  # The identity start's embedding is o_bias-free (its o_bias starts at 0 too).
  z_identity = identity.text_conditioned_regions(text_bte, regions_bme, valid_bm)
  heads = gated.config.region_heads
  gate_h = np.linspace(0.5, 2.0, heads).astype(np.float32)
  gated.region_attention.value_gate[...] = jnp.asarray(gate_h)
  z_gated = np.asarray(gated.text_conditioned_regions(text_bte, regions_bme, valid_bm))
  expected = (np.asarray(z_plain) + (np.asarray(z_identity).reshape(2, 3, heads, -1)
                                     * gate_h[:, None]).reshape(2, 3, -1))
  np.testing.assert_allclose(z_gated, expected, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="exclusive"):
    _tiny_config(identity_region_values=True, region_value_gate=True)


def test_zero_output_starts_the_text_conditioned_embedding_empty():
  """region_output_zero_init: the output projection starts at 0 and nothing else changes (the
  same random draws), so the text-conditioned embedding starts at 0; an opened gate then adds
  the identity path alone. The config arg applies with feature_shortcut, not beside the
  identity start."""
  def zero_output(arg):
    config = config_args.load_config(f"configs/pathflip_demo.py:size=test,zero_output=True{arg}")
    return config.model.region_output_zero_init

  assert zero_output(",feature_shortcut=True,value_gate=True")
  assert zero_output(",feature_shortcut=True,identity_values=False")
  assert not zero_output(",feature_shortcut=True")  # the identity start sets the output itself
  assert not zero_output("")
  regions_bme = jax.random.normal(jax.random.key(0), (2, 5, 16))
  valid_bm = jnp.array([[1, 1, 0, 1, 1], [1, 0, 0, 0, 0]], bool)
  text_bte = jax.random.normal(jax.random.key(1), (2, 3, 16))
  gated = pathflip.PathFlip(_tiny_config(feature_shortcut=True, region_value_gate=True),
                            rngs=nnx.Rngs(0))
  zeroed = pathflip.PathFlip(_tiny_config(feature_shortcut=True, region_value_gate=True,
                                          region_output_zero_init=True), rngs=nnx.Rngs(0))
  gated_params = dict(nnx.to_flat_state(nnx.state(gated, nnx.Param)))
  zeroed_params = dict(nnx.to_flat_state(nnx.state(zeroed, nnx.Param)))
  assert gated_params.keys() == zeroed_params.keys()
  for path, param in zeroed_params.items():
    if path[-2:] == ("attention", "o_kernel") and path[0] == "region_attention":
      assert not np.any(np.asarray(param[...])) and np.any(np.asarray(gated_params[path][...]))
    else:
      np.testing.assert_array_equal(np.asarray(param[...]), np.asarray(gated_params[path][...]),
                                    err_msg=str(path))
  np.testing.assert_array_equal(
      zeroed.text_conditioned_regions(text_bte, regions_bme, valid_bm), 0.0)
  identity = pathflip.PathFlip(_tiny_config(feature_shortcut=True, identity_region_values=True),
                               rngs=nnx.Rngs(0))
  z_identity = np.asarray(identity.text_conditioned_regions(text_bte, regions_bme, valid_bm))
  heads = zeroed.config.region_heads
  gate_h = np.linspace(-1.0, 2.0, heads).astype(np.float32)
  zeroed.region_attention.value_gate[...] = jnp.asarray(gate_h)
  np.testing.assert_allclose(
      zeroed.text_conditioned_regions(text_bte, regions_bme, valid_bm),
      (z_identity.reshape(2, 3, heads, -1) * gate_h[:, None]).reshape(2, 3, -1),
      rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="exclusive"):
    _tiny_config(identity_region_values=True, region_output_zero_init=True)


def test_identity_qk_starts_the_attention_at_the_normed_match():
  """region_identity_qk: the query and key projections start as the identity (every other
  parameter draws the same numbers), so the weights start as the softmax of the layer-normed
  text and region embeddings' dot product over sqrt(head width); the config arg also sets one
  head, holds the match there (q, k and the two norms frozen, and nothing else) and makes the
  heatmap read the weights."""
  config = config_args.load_config("configs/pathflip_demo.py:size=test,identity_qk=True,"
                                   "cohort_dir=/some/cohort")
  assert config.model.region_identity_qk and config.model.region_heads == 1
  assert config.evals.localization.method == "attention"
  default = config_args.load_config("configs/pathflip_demo.py:size=test,cohort_dir=/c")
  assert not default.model.get("region_identity_qk") and not default.optim.get("frozen")
  assert default.evals.localization.method == "contribution"
  ablation = config_args.load_config(
      "configs/pathflip_demo.py:size=test,identity_qk=True,region_attention=False")
  assert not ablation.optim.get("frozen")  # no attention, nothing to hold
  with pytest.raises(ValueError, match="hold_match=False needs identity_qk=True"):
    config_args.load_config("configs/pathflip_demo.py:size=test,hold_match=False")
  plain = pathflip.PathFlip(_tiny_config(region_heads=1), rngs=nnx.Rngs(0))
  model = pathflip.PathFlip(_tiny_config(region_heads=1, region_identity_qk=True),
                            rngs=nnx.Rngs(0))
  plain_params = dict(nnx.to_flat_state(nnx.state(plain, nnx.Param)))
  changed = []
  for path, param in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if not np.array_equal(np.asarray(param[...]), np.asarray(plain_params[path][...])):
      changed.append("/".join(map(str, path)))
  assert sorted(changed) == ["region_attention/attention/k_kernel",
                             "region_attention/attention/q_kernel"]
  params = nnx.state(model, nnx.Param)
  paths = jax.tree.leaves(optim.param_paths(params))
  mask = jax.tree.leaves(optim.trainable_mask(params, config.optim.frozen))
  assert sorted(p for p, train in zip(paths, mask) if not train) == sorted(
      f"region_attention/{name}" for name in (
          "attention/q_kernel", "attention/q_bias", "attention/k_kernel", "attention/k_bias",
          "text_norm/scale", "text_norm/bias", "region_norm/scale", "region_norm/bias"))
  regions_bme = jax.random.normal(jax.random.key(0), (2, 5, 16))
  valid_bm = jnp.array([[1, 1, 0, 1, 1], [1, 0, 0, 0, 0]], bool)
  text_bte = jax.random.normal(jax.random.key(1), (2, 3, 16))

  def layer_norm(x):
    x = np.asarray(x, np.float64)
    x = x - x.mean(-1, keepdims=True)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6)

  logits = np.einsum("bte,bme->btm", layer_norm(text_bte), layer_norm(regions_bme)) / 4.0
  logits = np.where(np.asarray(valid_bm)[:, None], logits, -np.inf)
  expected = np.exp(logits - logits.max(-1, keepdims=True))
  expected /= expected.sum(-1, keepdims=True)
  np.testing.assert_allclose(model.region_text_attention(text_bte, regions_bme, valid_bm),
                             expected, rtol=1e-4, atol=1e-6)


def test_lock_text_freezes_the_whole_text_branch():
  """lock_text: the Q-Former takes the text tower's shape and every text-branch parameter is
  frozen (each LOCKED_TEXT pattern matches one; the query side trains); it needs text_init."""
  with pytest.raises(ValueError, match="lock_text=True needs text_init"):
    config_args.load_config("configs/pathflip_demo.py:size=test,lock_text=True")
  config = config_args.load_config(
      "configs/pathflip_demo.py:size=test,lock_text=True,text_init=/some/patch_clip")
  assert (config.model.qformer.depth, config.model.qformer.mlp_ratio,
          config.model.qformer.cross_attention_every) == (1, 4.0, 1)
  q = qformer.QFormerConfig(**dict(config.model.qformer, feature_dim=12, vocab_size=40,
                                   max_text_len=16))
  model = pathflip.PathFlip(dataclasses.replace(_tiny_config(), qformer=q, embed_dim=32),
                            rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  mask = optim.trainable_mask(params, config.optim.frozen)
  paths = jax.tree.leaves(optim.param_paths(params))
  frozen = sorted(p for p, train in zip(paths, jax.tree.leaves(mask)) if not train)
  assert "qformer/token_embed" in frozen and "text_proj/kernel" in frozen
  assert "qformer/layers/0/text_mlp/fc1/kernel" in frozen
  assert all(p.startswith(("qformer/", "text_proj/")) for p in frozen)
  assert "qformer/query_tokens" not in frozen
  assert "qformer/layers/0/cross_attention/q_kernel" not in frozen


def test_local_region_attention_reads_each_region_on_its_own():
  """local_region_attention: the tokens the text-conditioned attention reads hold a region's
  own patches (and place) only, so changing one region's patches moves that region's token and
  the slide token, and no other region's; read after the slide context, every region moves.
  Same parameters either way (the switch adds none)."""
  config = slide_examples.ExampleConfig(region_patches=2, eval_num_regions=24,
                                        num_subcaptions=2, caption_len=8, subcaption_len=8,
                                        buckets=(32,))
  element = _element(n=30)
  inputs = _inputs(slide_examples.build_example(element, config, _Tokens(), None))
  index = np.asarray(inputs["region_index"][0, 0])[np.asarray(inputs["region_patch_valid"][0, 0])]
  changed = dict(inputs)
  changed["features"] = inputs["features"].at[0, index].add(3.0)
  local = pathflip.PathFlip(_tiny_config(local_region_attention=True), rngs=nnx.Rngs(0))
  context = pathflip.PathFlip(_tiny_config(), rngs=nnx.Rngs(0))
  assert (jax.tree.structure(nnx.state(local, nnx.Param))
          == jax.tree.structure(nnx.state(context, nnx.Param)))
  r = int(inputs["region_valid"].sum())
  for model, others_move in ((local, False), (context, True)):
    before, after = model.encode_slides(inputs), model.encode_slides(changed)
    moved_r = np.abs(np.asarray(after["regions"] - before["regions"])[0, :r]).max(-1)
    assert moved_r[0] > 1e-3
    assert float(np.abs(np.asarray(after["slide"] - before["slide"])).max()) > 1e-4
    assert (moved_r[1:].min() > 1e-4) if others_move else (moved_r[1:].max() < 1e-6)
  assert config_args.load_config(
      "configs/pathflip_demo.py:size=test,local_attention=True").model.local_region_attention


def test_local_region_positions_false_reads_what_a_region_shows_not_where():
  """local_region_positions=False: moving the regions on the grid leaves the tokens the
  attention reads as they were (and moves the slide token, which the context makes with the
  positions); with the positions the read tokens move. It needs local_region_attention."""
  config = slide_examples.ExampleConfig(region_patches=2, eval_num_regions=24,
                                        num_subcaptions=2, caption_len=8, subcaption_len=8,
                                        buckets=(32,))
  inputs = _inputs(slide_examples.build_example(_element(n=30), config, _Tokens(), None))
  moved = dict(inputs, region_pos=inputs["region_pos"] + 3)
  r = int(inputs["region_valid"].sum())
  for positions, regions_move in ((False, False), (True, True)):
    model = pathflip.PathFlip(_tiny_config(local_region_attention=True,
                                           local_region_positions=positions), rngs=nnx.Rngs(0))
    before, after = model.encode_slides(inputs), model.encode_slides(moved)
    moved_r = np.abs(np.asarray(after["regions"] - before["regions"])[0, :r]).max(-1)
    assert (moved_r.min() > 1e-4) if regions_move else (moved_r.max() == 0.0)
    assert float(np.abs(np.asarray(after["slide"] - before["slide"])).max()) > 1e-4
  with pytest.raises(ValueError, match="local_region_positions=False needs"):
    _tiny_config(local_region_positions=False)
  with pytest.raises(ValueError, match="attention_positions=False needs local_attention"):
    config_args.load_config("configs/pathflip_demo.py:size=test,attention_positions=False")
  assert not config_args.load_config("configs/pathflip_demo.py:size=test,local_attention=True,"
                                     "attention_positions=False").model.local_region_positions
