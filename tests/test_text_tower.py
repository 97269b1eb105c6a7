"""convert/text_tower: a patch_clip text tower loaded into the PathFLIP Q-Former's text branch."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pathflip_jax import checkpointing
from pathflip_jax.convert import text_tower
from pathflip_jax.models import pathflip, qformer, text_encoder, vit


def _named(module) -> dict[str, np.ndarray]:
  return {k: np.asarray(v)
          for k, v in checkpointing.named_leaves(nnx.state(module, nnx.Param)).items()}


def _models(qformer_depth: int, mlp_ratio: float = 4.0):
  tower = text_encoder.TextEncoder(
      text_encoder.TextConfig(vocab_size=40, max_len=8, width=16, depth=1, num_heads=2,
                              mlp_ratio=4.0), rngs=nnx.Rngs(3))
  proj = vit.Dense(16, 16, ("embed", None), rngs=nnx.Rngs(4), dtype=jnp.float32,
                   param_dtype=jnp.float32)
  tower_params = {f"text/{k}": v for k, v in _named(tower).items()}
  tower_params.update({f"text_proj/{k}": v for k, v in _named(proj).items()})
  q = qformer.QFormerConfig(feature_dim=12, width=16, depth=qformer_depth, num_heads=2,
                            mlp_ratio=mlp_ratio, num_queries=3, vocab_size=40, max_text_len=16)
  model = pathflip.PathFlip(pathflip.PathFlipConfig(qformer=q, embed_dim=16, context_depth=1,
                                                    context_heads=2, region_heads=2,
                                                    position_frequencies=3),
                            rngs=nnx.Rngs(0))
  return tower, proj, tower_params, model


def test_loaded_text_branch_reproduces_the_tower():
  tower, proj, tower_params, model = _models(qformer_depth=1)
  before = _named(model)
  loaded, notes = text_tower.qformer_text_params(tower_params, before, num_heads=2)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params, taken = checkpointing.partial_init(params, loaded, [f"^{n}$" for n in loaded])
  model = nnx.merge(graphdef, params, rest)
  assert set(taken) == set(loaded) and "qformer/layers/0/self_attention/q_kernel" in taken
  tokens = jnp.asarray([[1, 5, 9, 7, 0, 0, 0, 0], [1, 3, 2, 0, 0, 0, 0, 0]], jnp.int32)

  @nnx.jit  # one compilation instead of one per eager op
  def run(model, tower, proj):
    expected = proj(tower(tokens))
    return (model.qformer.encode_text(tokens), tower(tokens), model.encode_texts(tokens),
            expected / jnp.linalg.norm(expected, axis=-1, keepdims=True))

  qformer_cls, tower_cls, texts, expected = run(model, tower, proj)
  np.testing.assert_allclose(qformer_cls, tower_cls, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(texts, expected, rtol=1e-5, atol=1e-5)
  # Positions beyond the tower's 8 keep their initial values; the query side is untouched.
  after = _named(model)
  np.testing.assert_array_equal(after["qformer/pos_embed"][8:], before["qformer/pos_embed"][8:])
  np.testing.assert_array_equal(after["qformer/query_tokens"], before["qformer/query_tokens"])
  assert any("positions 8..15" in n for n in notes)


def test_deeper_qformer_and_other_mlp_width_are_reported_not_loaded():
  _, _, tower_params, model = _models(qformer_depth=2, mlp_ratio=2.0)
  loaded, notes = text_tower.qformer_text_params(tower_params, _named(model), num_heads=2)
  assert "qformer/layers/1/self_norm/scale" not in loaded
  assert "qformer/layers/0/text_mlp/fc1/kernel" not in loaded
  assert any("layers 1..1" in n for n in notes) and any("text MLP" in n for n in notes)


def test_vocabulary_mismatch_names_the_tokenizer():
  _, _, tower_params, model = _models(qformer_depth=1)
  tower_params["text/token_embed"] = np.zeros((50, 16), np.float32)
  with pytest.raises(ValueError, match="same tokenizer"):
    text_tower.qformer_text_params(tower_params, _named(model), num_heads=2, source="run X")
  with pytest.raises(KeyError, match="patch_clip run"):
    text_tower.qformer_text_params({"vision/x": np.zeros(1)}, _named(model), num_heads=2)
