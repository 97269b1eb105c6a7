"""The benchmarks' FLOP counts and abstract-shape compiles (benchmarks/patch_encoder.py,
benchmarks/slide_encoder.py): analytic counts against XLA's own, without running a model."""

import jax.numpy as jnp
import pytest

from benchmarks import patch_encoder, slide_encoder
from pathflip_jax.models import layers, vit


def test_analytic_vit_flops_match_xla_cost_analysis():
  # Wide enough that the matmuls dominate as in ViT-B/L: GELU, softmax and norms, which the
  # analytic count leaves out, are a quarter of XLA's count at width 32, 8% at 128, 2% at 512.
  config = vit.ViTConfig(width=512, depth=1, num_heads=8, image_size=32)
  compiled, _, _ = patch_encoder.compile_vit(config, batch=4, dtype=jnp.float32)
  counted = patch_encoder.xla_flops(compiled)
  analytic = patch_encoder.vit_flops_per_image(config)
  assert counted is not None
  assert counted / 4 == pytest.approx(analytic, rel=0.05)
  # The patch embedding alone, by hand: 4 patches of 16 x 16 x 3 pixels into 512 channels.
  bare = vit.ViTConfig(width=512, depth=0, num_heads=8, image_size=32)
  assert patch_encoder.vit_flops_per_image(bare) == 2 * 4 * 768 * 512
  assert layers.DOT_PRODUCT_ATTENTION is None   # compile_vit restores the switch


def test_slide_encoder_compiles_from_abstract_shapes():
  compiled, state, features, _, q = slide_encoder.compile_slide_encoder(3000, jnp.float32)
  assert features.shape == (1, 3000, slide_encoder.FEATURE_DIM)
  assert not hasattr(features, "device")   # abstract: nothing allocated
  assert patch_encoder.xla_temp_bytes(compiled) > 0
  assert q.width == 768 and q.kv_chunk == 2048   # the paper's sizes: 2 chunks here
  flops = slide_encoder.qformer_flops(q, 3000)
  # Dominated by the 6 cross-attention layers' key and value projections: 6 x 4 N D^2.
  assert flops > 6 * 4 * 3000 * 768 ** 2
  assert flops < 1.2 * (6 * 4 * 3000 * 768 ** 2 + 2 * 3000 * 512 * 768)
