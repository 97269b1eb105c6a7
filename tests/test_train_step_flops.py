"""benchmarks/train_step.py: the analytic FLOP count of the align step against XLA's, and the
table for one tiny stage.

XLA's ``cost_analysis()`` of the lowered step (the same HloCostAnalysis as the compiled one's,
without the seconds of compilation) counts elementwise operations and the optimizer too, so the
analytic count of matrix products must lie within 10% below it; the dots of the HLO are what the
analytic count describes, so they must agree to rounding.
"""

import dataclasses

import pytest

from benchmarks import train_step


@pytest.fixture(scope="module")
def tiny_align():
  stage = train_step.build("align_demo", tiny=True)
  # The cross-check's subject is the scan-free step: every patch in one chunk.
  assert stage.scan_free is None
  assert stage.stub.model_config.qformer.kv_chunk >= stage.batch["features"].shape[1]
  return stage, train_step.lower_step(stage)


def test_align_analytic_flops_match_xla(tiny_align):
  stage, lowered = tiny_align
  cost = lowered.lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla = float(cost["flops"])
  analytic = stage.flops.total
  assert 0.9 * xla <= analytic <= xla, (analytic, xla)
  dots = train_step.hlo_dot_flops(lowered.lowered)
  # Not exact on several devices: the losses' shard_map bodies (contrastive logits, region
  # attention) appear in the HLO with one device's slides (0.4% of the step on 8 devices).
  assert analytic == pytest.approx(dots, rel=1e-2)
  # Backward: 2x the forward except the feature and position projections' (data inputs: 1x).
  assert 1.9 * stage.flops.forward < stage.flops.backward < 2 * stage.flops.forward


def test_lora_backward_is_one_forward_for_frozen_weights():
  from pathflip_jax.models import decoder, lora  # pylint: disable=import-outside-toplevel
  config = decoder.get_config("tiny")
  full = train_step.instruct_flops(config, None, 2, 16, 4, 20)
  adapted = train_step.instruct_flops(
      config, lora.LoraConfig(rank=4, alpha=8.0, targets=("q_proj",)), 2, 16, 4, 20)
  # Frozen projections and LM head: 1x forward backward; adapters and attention: 2x.
  assert adapted.backward < full.backward
  grown = dataclasses.replace(config, vocab_size=2 * config.vocab_size)
  extra = (train_step.instruct_flops(grown, lora.LoraConfig(rank=4, alpha=8.0), 2, 16, 4, 20)
           .backward - train_step.instruct_flops(config, lora.LoraConfig(rank=4, alpha=8.0),
                                                 2, 16, 4, 20).backward)
  assert extra == 2 * 2 * 16 * config.vocab_size * config.width   # input gradient only


def test_table_of_a_tiny_stage(capsys):
  rows = train_step.main(["--stages", "align_demo", "--steps", "1", "--tiny"])
  out = capsys.readouterr().out
  assert rows[0]["stage"] == "align_demo" and rows[0]["step_s"] > 0
  assert "| align_demo | 8 x 256 patches (24 regions x 4) |" in out
  assert "MFU peak for float32" in out and "ratio" in out
