"""Slide captioning (stage "instruct"): generated captions against the slides' reports.

``type="captioning"``. Each slide of ``split`` gets the caption prompt (``task.eval_items``,
"Describe the slide."); the answer is decoded greedily (``beams=1``) or by beam search, and
scored against the slide's caption with corpus BLEU-1..4, ROUGE-L and CIDEr-D
(``text_metrics``). The baseline beside them is a *random training caption* per slide (the
mean over ``baseline_draws`` draws): what a model that ignores the slide would score on these
templated reports. Generated captions and references are written to
``<workdir>/eval/<name>_<split>.jsonl``; the first ``samples`` are printed.

Config: ``split`` ("test"), ``every``, ``batch_size`` (8), ``max_new_tokens`` (256), ``beams``
(1), ``samples`` (3), ``baseline_draws`` (20).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from pathflip_jax.data import instructions as ins
from pathflip_jax.evaluators import common, text_metrics


def write_predictions(workdir: str, name: str, split: str, rows: list[dict[str, Any]]) -> str:
  path = os.path.join(workdir, "eval", f"{name}_{split}.jsonl")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
  return path


class Evaluator(common.EvaluatorBase):

  def __init__(self, config: ml_collections.ConfigDict, task: Any, mesh: Mesh):
    super().__init__(config, task, mesh)
    self.items = task.eval_items(self.split, [ins.CAPTION])
    if not self.items:
      raise ValueError(f"config.evals.*.split={self.split!r}: no slides with a caption there")
    self.prompt_len = task.prompt_len(self.split, [ins.CAPTION])
    self.baseline = self._baseline()

  def _baseline(self) -> dict[str, float]:
    """Metrics of random training captions (what ignoring the slide scores)."""
    train = [i.answer_text for i in self.task.eval_items("train", [ins.CAPTION])]
    references = [[i.answer_text] for i in self.items]
    rng = np.random.default_rng(0)
    draws = [text_metrics.caption_metrics(list(rng.choice(train, len(references))), references)
             for _ in range(int(self.config.get("baseline_draws", 20)))]
    return {f"random_train_caption/{k}": float(np.mean([d[k] for d in draws]))
            for k in ("bleu_1", "bleu_4", "rouge_l", "cider_d")}

  def run(self, model: nnx.Module) -> dict[str, float]:
    c = self.config
    generated = self.task.generate(model, self.split, self.items, prompt_len=self.prompt_len,
                                   max_new_tokens=int(c.get("max_new_tokens", 256)),
                                   batch_size=int(c.get("batch_size", 8)),
                                   beams=int(c.get("beams", 1)))
    references = [[i.answer_text] for i in self.items]
    result = text_metrics.caption_metrics(generated, references)
    slide_ids = self.task.slide_ids(self.split)
    rows = [{"slide_id": slide_ids[i.slide], "generated": g, "reference": i.answer_text}
            for i, g in zip(self.items, generated)]
    path = write_predictions(self.task.workdir, self.name, self.split, rows)
    for row in rows[:int(c.get("samples", 3))]:
      print(f"[{self.name}] {row['slide_id']}\n  generated: {row['generated']}\n  reference: "
            f"{row['reference']}", file=sys.stderr)
    print(f"[{self.name}] captions of {len(rows)} slides -> {path}", file=sys.stderr)
    return {**result, **self.baseline}
