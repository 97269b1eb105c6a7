"""Visual question answering (stage "instruct"): multiple-choice and open questions.

``type="vqa"``. Questions of ``split`` (``config.questions`` of the task) are answered by greedy
decoding. Multiple choice, two ways:

  generated  the decoded answer is parsed into an option (a letter, "B. fat", or the option's
             text: ``text_metrics.parse_choice``); unparseable answers count wrong. This is the
             headline ``mc/accuracy`` (SlideChat's protocol), with ``mc/accuracy_by_text``
             (the answer's text, a leading letter removed, equals the correct option's), per
             category, and the always-the-same-letter baselines (``mc/always_<X>_accuracy``,
             ``mc/best_single_letter_accuracy``).
  ranked     the option whose answer the model finds most likely (sum of answer-token log
             probabilities): ``mc/ranked_accuracy`` (the lm-eval-harness protocol).

Open questions: SQuAD-style exact match and token F1, overall and per category. Predictions are
written to ``<workdir>/eval/<name>_<split>.jsonl``.

Config: ``split`` ("test"), ``every``, ``batch_size`` (8), ``max_new_tokens`` (32, and
``description_tokens`` 256 for open questions of category "description").
"""

from __future__ import annotations

import re
from typing import Any

import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from pathflip_jax.data import instructions as ins
from pathflip_jax.evaluators import captioning, common, text_metrics


# "B. fat", "(B) fat", "B) fat" -> "fat": what the answer says, apart from the letter it names.
_LEADING_LETTER = re.compile(r"^\s*\(?[A-Da-d][.):]\s*")


class Evaluator(common.EvaluatorBase):

  def __init__(self, config: ml_collections.ConfigDict, task: Any, mesh: Mesh):
    super().__init__(config, task, mesh)
    self.choice = task.eval_items(self.split, [ins.MULTIPLE_CHOICE])
    self.open = task.eval_items(self.split, [ins.OPEN])
    if not self.choice and not self.open:
      raise ValueError(f"config.evals.*.split={self.split!r}: no questions there (is "
                       "config.questions set?)")
    self.prompt_len = task.prompt_len(self.split, [ins.MULTIPLE_CHOICE, ins.OPEN])

  def _answers(self, model, items, max_new_tokens: int) -> list[str]:
    if not items:
      return []
    return self.task.generate(model, self.split, items, prompt_len=self.prompt_len,
                              max_new_tokens=max_new_tokens,
                              batch_size=int(self.config.get("batch_size", 8)))

  def run(self, model: nnx.Module) -> dict[str, float]:
    c = self.config
    short = int(c.get("max_new_tokens", 32))
    result: dict[str, float] = {}
    rows = []
    slide_ids = self.task.slide_ids(self.split)
    if self.choice:
      answers = self._answers(model, self.choice, short)
      options = [dict(zip(ins.LETTERS, i.options)) for i in self.choice]
      letters = [text_metrics.parse_choice(a, o) for a, o in zip(answers, options)]
      categories = [i.category for i in self.choice]
      mc = text_metrics.multiple_choice_metrics(
          letters, [i.answer for i in self.choice], categories,
          predicted_texts=[_LEADING_LETTER.sub("", a) for a in answers],
          option_texts=options)
      logp = self.task.option_log_probs(model, self.split, self.choice,
                                        int(c.get("batch_size", 8)))
      ranked = np.array(list(ins.LETTERS))[np.argmax(logp, axis=1)]
      truth = np.array([i.answer for i in self.choice])
      mc["ranked_accuracy"] = float(np.mean(ranked == truth))
      for category in sorted(set(categories)):
        pick = np.array(categories) == category
        mc[f"ranked_accuracy/{category}"] = float(np.mean(ranked[pick] == truth[pick]))
      result.update({f"mc/{k}": v for k, v in mc.items()})
      for item, answer, letter, r in zip(self.choice, answers, letters, ranked):
        rows.append({"slide_id": slide_ids[item.slide], "type": ins.MULTIPLE_CHOICE,
                     "category": item.category, "question": item.question,
                     "options": dict(zip(ins.LETTERS, item.options)), "answer": item.answer,
                     "generated": answer, "parsed": letter, "ranked": str(r)})
    if self.open:
      long = [i for i in self.open if i.category == "description"]
      rest = [i for i in self.open if i.category != "description"]
      generated = dict(zip(map(id, rest), self._answers(model, rest, short)))
      generated.update(zip(map(id, long), self._answers(
          model, long, int(c.get("description_tokens", 256)))))
      answers = [generated[id(i)] for i in self.open]
      result.update({f"open/{k}": v for k, v in text_metrics.open_ended_metrics(
          answers, [i.answer_text for i in self.open]).items()})
      categories = np.array([i.category for i in self.open])
      for category in sorted(set(categories)):
        pick = [j for j in range(len(self.open)) if categories[j] == category]
        m = text_metrics.open_ended_metrics([answers[j] for j in pick],
                                            [self.open[j].answer_text for j in pick])
        result[f"open/exact_match/{category}"] = m["exact_match"]
        result[f"open/f1/{category}"] = m["f1"]
      for item, answer in zip(self.open, answers):
        rows.append({"slide_id": slide_ids[item.slide], "type": ins.OPEN,
                     "category": item.category, "question": item.question,
                     "answer": item.answer_text, "generated": answer})
    captioning.write_predictions(self.task.workdir, self.name, self.split, rows)
    return result
