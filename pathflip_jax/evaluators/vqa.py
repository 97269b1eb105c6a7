"""Visual question answering (stage "instruct"): multiple-choice and open questions.

``type="vqa"``. Questions of ``split`` (``config.questions`` of the task). Multiple choice, two
ways:

  ranked     the option whose answer the model finds most likely (sum of answer-token log
             probabilities, the lm-eval-harness protocol): ``mc/ranked_accuracy``, the headline
             (it does not depend on how an answer is phrased);
  generated  the greedy answer parsed into an option (a letter, "B. fat", or the option's text:
             ``text_metrics.parse_choice``; unparseable answers count wrong): ``mc/accuracy``
             (SlideChat's protocol), ``mc/accuracy_by_text`` (the answer's text, a leading
             letter removed, equals the correct option's), ``mc/unparsed_fraction``.

Both overall and per category (``.../<category>``), each with its 95% bootstrap interval over
slides (a slide's questions are resampled together). Beside them, baselines that can beat a
model that does not use the slide:

  mc/best_single_letter_accuracy  always answering the letter most often right on this split
                                  (chosen on it: a bar that flatters the baseline; per category
                                  that category's letter; ``mc/always_<X>_accuracy`` per letter);
  shuffled_visual/                the same model with each slide's visual tokens replaced by
                                  those of another slide of the split (a fixed derangement;
                                  ranked answers);
  question_only/                  a decoder trained without visual tokens (an instruct run with
                                  ``data.visual_tokens="none"``, evaluated by this evaluator
                                  first): its per-question rows are read from
                                  ``<question_only>/eval/<name>_<split>_slides.jsonl``.

``minus_<baseline>/<metric>`` is the paired difference model minus baseline on the same
resamples (per category too). Open questions: SQuAD-style exact match and token F1, overall and
per category, with intervals, and the question-only run's.

Predictions go to ``<workdir>/eval/<name>_<split>.jsonl``; per question (slide, category,
question, options, answer letter, ranked and generated choices, correct flags, the shuffled
baseline's choice) to ``<workdir>/eval/<name>_<split>_slides.jsonl``, which a later run names as
its ``question_only``.

Config: ``split`` ("test"), ``every``, ``batch_size`` (8), ``max_new_tokens`` (32, and
``description_tokens`` 256 for open questions of category "description"), ``question_only``
("": none; the workdir of the question-only run), ``shuffled_visual`` (True).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from pathflip_jax import storage
from pathflip_jax.data import instructions as ins
from pathflip_jax.evaluators import captioning, common, stats, text_metrics

# "B. fat", "(B) fat", "B) fat" -> "fat": what the answer says, apart from the letter it names.
_LEADING_LETTER = re.compile(r"^\s*\(?[A-Da-d][.):]\s*")
SHUFFLED, QUESTION_ONLY, BEST_LETTER = "shuffled_visual", "question_only", "best_single_letter"


def derangement(n: int, seed: int = 0) -> np.ndarray:
  """A fixed permutation of ``n`` >= 2 items that moves every item: each takes the place of the
  next one along a random cycle."""
  if n < 2:
    raise ValueError(f"a derangement needs at least 2 items, got {n}")
  order = np.random.default_rng(seed).permutation(n)
  out = np.empty(n, np.int64)
  out[order] = np.roll(order, -1)
  return out


def question_key(row: dict[str, Any]) -> tuple:
  """What identifies a question across runs of the same questions file."""
  options = row.get("options") or {}
  return (row["slide_id"], row["type"], row["question"],
          tuple(options[k] for k in sorted(options)), row.get("answer", ""))


def grouped_means(series: dict[str, np.ndarray], categories: np.ndarray, groups: Sequence[Any]
                  ) -> tuple[Callable[[np.ndarray], dict[str, float]], int]:
  """The dict metric of slide indices: each per-question series' mean over the questions of
  the slides drawn (a slide drawn twice counts twice), overall and per category
  (``<name>/<category>``; nan when a resample has none); and the number of slides."""
  members, count = stats.group_members(groups)
  names = sorted(set(categories))
  codes = np.searchsorted(names, categories)
  values = np.stack([np.asarray(v, np.float64) for v in series.values()])      # [series, q]

  def metric(idx: np.ndarray) -> dict[str, float]:
    q = members(idx)
    out = {}
    with np.errstate(invalid="ignore", divide="ignore"):
      overall = values[:, q].mean(1) if len(q) else np.full(len(values), np.nan)
      per_count = np.bincount(codes[q], minlength=len(names)).astype(np.float64)
      per_sum = np.stack([np.bincount(codes[q], v[q], minlength=len(names)) for v in values])
      per = per_sum / per_count
    for s, name in enumerate(series):
      out[name] = float(overall[s])
      out.update({f"{name}/{c}": float(per[s, j]) for j, c in enumerate(names)})
    return out

  return metric, count


def best_letter(answers: np.ndarray, categories: np.ndarray, groups: Sequence[Any]
                ) -> Callable[[np.ndarray], dict[str, float]]:
  """The dict metric of slide indices: the accuracy of always answering the letter most often
  right on all the split's questions (per category, that category's letter). The letters are
  chosen once, so that a resample scores a fixed answer (a maximum over letters on each resample
  would lie above its own point value)."""
  letters = sorted(set(answers) | set(ins.LETTERS))

  def best(pick: np.ndarray) -> str:
    return max(letters, key=lambda x: (np.mean(answers[pick] == x), -letters.index(x)))

  overall = best(np.ones(len(answers), bool))
  per_category = {c: best(categories == c) for c in set(categories)}
  key = "mc/best_single_letter_accuracy"
  means_all, _ = grouped_means({key: answers == overall}, categories, groups)
  means_own, _ = grouped_means(
      {key: answers == np.array([per_category[c] for c in categories])}, categories, groups)

  def metric(idx: np.ndarray) -> dict[str, float]:
    return {**{k: v for k, v in means_own(idx).items() if k != key}, key: means_all(idx)[key]}

  return metric


class Evaluator(common.EvaluatorBase):

  def __init__(self, config: ml_collections.ConfigDict, task: Any, mesh: Mesh):
    super().__init__(config, task, mesh)
    self.choice = task.eval_items(self.split, [ins.MULTIPLE_CHOICE])
    self.open = task.eval_items(self.split, [ins.OPEN])
    if not self.choice and not self.open:
      raise ValueError(f"config.evals.*.split={self.split!r}: no questions there (is "
                       "config.questions set?)")
    self.prompt_len = task.prompt_len(self.split, [ins.MULTIPLE_CHOICE, ins.OPEN])
    ids = task.slide_ids(self.split)
    self.choice_slides = [ids[i.slide] for i in self.choice]
    self.open_slides = [ids[i.slide] for i in self.open]
    visual = task.visual[self.split]
    self.shuffled = None
    if config.get("shuffled_visual", True) and len(visual) >= 2 and all(
        len(v["tokens"]) for v in visual):
      swap = derangement(len(visual))
      self.shuffled = [visual[j] for j in swap]
    self.question_only_dir = config.get("question_only", "")
    if self.question_only_dir and not storage.isdir(storage.join(self.question_only_dir,
                                                                 "eval")):
      raise FileNotFoundError(f"config.evals.*.question_only={self.question_only_dir}: no "
                              "eval/ folder there (train and evaluate the question-only run "
                              "first: --config.data.visual_tokens=none)")
    # Read at the first run, under this evaluator's final name (evaluators.build sets it).
    self.question_only: dict[str, dict[str, np.ndarray]] | None = None

  def _read_question_only(self, workdir: str) -> dict[str, dict[str, np.ndarray]]:
    """The question-only run's per-question results, in this evaluator's question order."""
    key = "config.evals.*.question_only"
    try:
      rows = stats.read_slide_rows(storage.join(workdir, "eval"), self.name, self.split)
    except FileNotFoundError as e:
      raise FileNotFoundError(f"{key}={workdir}: {e}") from None
    by_key: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
      by_key.setdefault(question_key(row), []).append(row)

    def take(items, slides, kind):
      out = []
      for item, slide in zip(items, slides):
        row = {"slide_id": slide, "type": kind, "question": item.question,
               "options": dict(zip(ins.LETTERS, item.options)), "answer": item.answer}
        found = by_key.get(question_key(row))
        if not found:
          raise ValueError(f"{key}={workdir}: its {self.name}_{self.split}_slides.jsonl has no "
                           f"row for slide {slide}'s question {item.question!r} (evaluated on "
                           "another questions file?)")
        out.append(found.pop(0))
      return out

    mc = take(self.choice, self.choice_slides, ins.MULTIPLE_CHOICE)
    open_rows = take(self.open, self.open_slides, ins.OPEN)
    return {"mc": {"ranked_correct": np.array([r["ranked_correct"] for r in mc], np.float64),
                   "generated_correct": np.array([r["generated_correct"] for r in mc],
                                                 np.float64)},
            "open": {"exact_match": np.array([r["exact_match"] for r in open_rows], np.float64),
                     "f1": np.array([r["f1"] for r in open_rows], np.float64)}}

  def _answers(self, model, items, max_new_tokens: int) -> list[str]:
    if not items:
      return []
    return self.task.generate(model, self.split, items, prompt_len=self.prompt_len,
                              max_new_tokens=max_new_tokens,
                              batch_size=int(self.config.get("batch_size", 8)))

  def _ranked(self, model, visual=None) -> np.ndarray:
    logp = self.task.option_log_probs(model, self.split, self.choice,
                                      int(self.config.get("batch_size", 8)), visual=visual)
    return np.array(list(ins.LETTERS))[np.argmax(logp, axis=1)]

  def run(self, model: nnx.Module) -> dict[str, float]:
    c = self.config
    short = int(c.get("max_new_tokens", 32))
    result: dict[str, float] = {}
    predictions, rows = [], []
    if self.question_only_dir and self.question_only is None:
      self.question_only = self._read_question_only(self.question_only_dir)
    if self.choice:
      result.update(self._choice(model, short, predictions, rows))
    if self.open:
      result.update(self._open(model, short, predictions, rows))
    captioning.write_predictions(self.task.workdir, self.name, self.split, predictions)
    self.write_rows(rows)
    return result

  def _choice(self, model, max_new_tokens: int, predictions: list, rows: list
              ) -> dict[str, float]:
    items = self.choice
    answers = self._answers(model, items, max_new_tokens)
    options = [dict(zip(ins.LETTERS, i.options)) for i in items]
    letters = [text_metrics.parse_choice(a, o) for a, o in zip(answers, options)]
    categories = np.array([i.category for i in items])
    truth = np.array([i.answer for i in items])
    stripped = [_LEADING_LETTER.sub("", a) for a in answers]
    mc = text_metrics.multiple_choice_metrics(letters, list(truth), list(categories),
                                              predicted_texts=stripped, option_texts=options)
    ranked = self._ranked(model)
    generated_correct = np.array([p == t for p, t in zip(letters, truth)], np.float64)
    by_text = np.array([text_metrics.normalize_answer(s) == text_metrics.normalize_answer(o[t])
                        for s, o, t in zip(stripped, options, truth)], np.float64)
    series = {"mc/ranked_accuracy": ranked == truth, "mc/accuracy": generated_correct,
              "mc/accuracy_by_text": by_text,
              "mc/unparsed_fraction": np.array([p is None for p in letters], np.float64)}
    shuffled = None
    if self.shuffled is not None:
      shuffled = self._ranked(model, self.shuffled)
      series[f"{SHUFFLED}/mc/ranked_accuracy"] = shuffled == truth
      series[f"minus_{SHUFFLED}/mc/ranked_accuracy"] = (
          (ranked == truth).astype(np.float64) - (shuffled == truth))
    if self.question_only is not None:
      other = self.question_only["mc"]
      for name, own, theirs in (("ranked_accuracy", ranked == truth, other["ranked_correct"]),
                                ("accuracy", generated_correct, other["generated_correct"])):
        series[f"{QUESTION_ONLY}/mc/{name}"] = theirs
        series[f"minus_{QUESTION_ONLY}/mc/{name}"] = own.astype(np.float64) - theirs
    means, slides = grouped_means(series, categories, self.choice_slides)
    letter = best_letter(truth, categories, self.choice_slides)

    def metric(idx: np.ndarray) -> dict[str, float]:
      out = {k: v for k, v in means(idx).items()
             if not k.startswith(("mc/accuracy_by_text/", "mc/unparsed_fraction/"))}
      best = letter(idx)
      out.update(best)
      for key in ("mc/ranked_accuracy", "mc/accuracy"):
        for suffix in [""] + [f"/{c}" for c in sorted(set(categories))]:
          out[f"minus_{BEST_LETTER}/{key}{suffix}"] = (
              out[key + suffix] - best[f"mc/best_single_letter_accuracy{suffix}"])
      return out

    result = {f"mc/{k}": float(v) for k, v in mc.items()
              if k.startswith("always_") or k == "num_questions"}
    stats.add_intervals(result, metric, slides)
    for i, item in enumerate(items):
      predictions.append({"slide_id": self.choice_slides[i], "type": ins.MULTIPLE_CHOICE,
                          "category": item.category, "question": item.question,
                          "options": options[i], "answer": item.answer,
                          "generated": answers[i], "parsed": letters[i],
                          "ranked": str(ranked[i])})
      rows.append({**predictions[-1], "answer_text": item.answer_text,
                   "ranked_correct": bool(ranked[i] == truth[i]),
                   "generated_correct": bool(generated_correct[i])})
      if shuffled is not None:
        rows[-1][f"{SHUFFLED}_ranked"] = str(shuffled[i])
    return result

  def _open(self, model, max_new_tokens: int, predictions: list, rows: list
            ) -> dict[str, float]:
    items = self.open
    long = [i for i in items if i.category == "description"]
    rest = [i for i in items if i.category != "description"]
    generated = dict(zip(map(id, rest), self._answers(model, rest, max_new_tokens)))
    generated.update(zip(map(id, long), self._answers(
        model, long, int(self.config.get("description_tokens", 256)))))
    answers = [generated[id(i)] for i in items]
    exact, f1 = text_metrics.open_ended_scores(answers, [i.answer_text for i in items])
    series = {"open/exact_match": exact, "open/f1": f1}
    if self.question_only is not None:
      other = self.question_only["open"]
      for name, own in (("exact_match", exact), ("f1", f1)):
        series[f"{QUESTION_ONLY}/open/{name}"] = other[name]
        series[f"minus_{QUESTION_ONLY}/open/{name}"] = own - other[name]
    means, slides = grouped_means(series, np.array([i.category for i in items]),
                                  self.open_slides)
    result = {"open/num_questions": float(len(items))}
    stats.add_intervals(result, means, slides)
    for i, item in enumerate(items):
      predictions.append({"slide_id": self.open_slides[i], "type": ins.OPEN,
                          "category": item.category, "question": item.question,
                          "answer": item.answer_text, "generated": answers[i]})
      rows.append({**predictions[-1], "options": {}, "answer": "",
                   "answer_text": item.answer_text, "exact_match": float(exact[i]),
                   "f1": float(f1[i])})
    return result
