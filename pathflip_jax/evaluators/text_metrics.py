"""Captioning and visual-question-answering metrics in plain Python and numpy.

Captions: every metric scores the same tokens, from ``tokenize`` (lower case, punctuation split
off words). BLEU-1..4 is corpus-level BLEU without smoothing, with the reference length chosen
as sacrebleu and the COCO caption scorer do (closest to the hypothesis, ties to the shorter);
the tests compare it with sacrebleu. ROUGE-L and CIDEr-D follow the COCO caption evaluation
(Lin 2004 with beta = 1.2; Vedantam et al. 2015), written from their definitions.

METEOR is deliberately absent: standard METEOR matches stems and WordNet synonyms, and neither
the stemmer's tables nor WordNet can be obtained offline here. An exact-match-only variant would
report numbers that look like METEOR but are not comparable with published ones.

VQA: multiple-choice accuracy by option letter and by option text, per category, beside the
accuracy of always answering one letter (the bar a model must clearly beat: benchmarks often
have skewed answer letters); open-ended exact match and token F1 with SQuAD's normalisation.
"""

from __future__ import annotations

import collections
import math
import re
import string
from typing import Mapping, Sequence

import numpy as np

# Words keep inner hyphens, apostrophes, periods and slashes ("ki-67", "3.5", "and/or") as the
# PTB tokenizer does; any other non-space symbol becomes its own token.
_TOKEN_RE = re.compile(r"\w+(?:[-'./]\w+)*|[^\w\s]")


def tokenize(text: str) -> list[str]:
  """Lower-cases ``text`` and splits it into words and punctuation marks.

  A simplified PTB tokenisation: "Carcinoma." and "carcinoma ." both give
  ``["carcinoma", "."]``; hyphenated words, decimals and "and/or" stay one token. Punctuation is
  kept as tokens (COCO's scorer drops it), so a caption that ends its sentences with periods
  matches a reference that does.
  """
  return _TOKEN_RE.findall(text.lower())


def _check_pair(name_a: str, a: Sequence, name_b: str, b: Sequence) -> None:
  if len(a) == 0:
    raise ValueError(f"{name_a} is empty")
  if len(a) != len(b):
    raise ValueError(f"{name_a} and {name_b} differ in length: {len(a)} vs {len(b)}")


def _tokenize_captions(hypotheses: Sequence[str], references: Sequence[Sequence[str]]
                       ) -> tuple[list[list[str]], list[list[list[str]]]]:
  _check_pair("hypotheses", hypotheses, "references", references)
  for i, refs in enumerate(references):
    # A bare string would be iterated as one reference per character.
    if isinstance(refs, str) or len(refs) == 0:
      raise ValueError(f"references[{i}] must be a non-empty list of strings, got {refs!r}")
  return ([tokenize(h) for h in hypotheses],
          [[tokenize(r) for r in refs] for refs in references])


def _ngrams(tokens: Sequence[str], n: int) -> collections.Counter:
  return collections.Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
                max_order: int = 4) -> dict[str, float]:
  """Corpus BLEU-1..``max_order`` (Papineni et al. 2002) in [0, 1], keys ``bleu_<n>``.

  Clipped n-gram matches and hypothesis n-grams are summed over the corpus before dividing; no
  smoothing, so an order without any match gives 0 for it and every higher BLEU. The brevity
  penalty compares the total hypothesis length with the summed per-segment reference length
  closest to each hypothesis (ties to the shorter reference).
  """
  if max_order < 1:
    raise ValueError(f"max_order must be >= 1, got {max_order}")
  hyps, refs = _tokenize_captions(hypotheses, references)
  matches = np.zeros(max_order)
  totals = np.zeros(max_order)
  hyp_len = ref_len = 0
  for hyp, hyp_refs in zip(hyps, refs):
    hyp_len += len(hyp)
    ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in hyp_refs)[1]
    for n in range(1, max_order + 1):
      hyp_counts = _ngrams(hyp, n)
      max_ref_counts = collections.Counter()
      for r in hyp_refs:
        max_ref_counts |= _ngrams(r, n)
      matches[n - 1] += sum(min(c, max_ref_counts[g]) for g, c in hyp_counts.items())
      totals[n - 1] += sum(hyp_counts.values())
  if hyp_len == 0:
    brevity = 0.0
  else:
    brevity = 1.0 if hyp_len >= ref_len else math.exp(1.0 - ref_len / hyp_len)
  result = {}
  log_sum = 0.0
  for n in range(1, max_order + 1):
    if matches[n - 1] == 0 or log_sum == -math.inf:
      log_sum = -math.inf
      result[f"bleu_{n}"] = 0.0
    else:
      log_sum += math.log(matches[n - 1] / totals[n - 1])
      result[f"bleu_{n}"] = float(brevity * math.exp(log_sum / n))
  return result


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
  row = [0] * (len(b) + 1)
  for x in a:
    diagonal = 0
    for j, y in enumerate(b, start=1):
      diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
  return row[-1]


def rouge_l(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
            beta: float = 1.2) -> float:
  """ROUGE-L F-measure from the longest common subsequence, averaged over segments.

  As in the COCO caption scorer, LCS precision and recall are each maximised over a segment's
  references before they are combined into F_beta (recall weighted by ``beta`` = 1.2).
  """
  hyps, refs = _tokenize_captions(hypotheses, references)
  scores = []
  for hyp, hyp_refs in zip(hyps, refs):
    lcs = [_lcs_length(hyp, r) for r in hyp_refs]
    precision = max((l / len(hyp) if hyp else 0.0) for l in lcs)
    recall = max((l / len(r) if r else 0.0) for l, r in zip(lcs, hyp_refs))
    if precision == 0 or recall == 0:
      scores.append(0.0)
    else:
      scores.append((1 + beta**2) * precision * recall / (recall + beta**2 * precision))
  return float(np.mean(scores))


def cider_d(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
            max_order: int = 4, sigma: float = 6.0) -> float:
  """CIDEr-D (Vedantam et al. 2015) as computed by the COCO caption evaluation.

  Each n-gram (n = 1..4) is weighted by its count in the sentence times log(N / df), with N the
  number of segments and df the number of segments whose references contain it (at least 1), so
  document frequencies come from the evaluated corpus. Per order, the hypothesis' counts are
  clipped by the reference's in a cosine similarity; orders are averaged, multiplied by a
  gaussian penalty on the length difference, averaged over references and scaled by 10. A corpus
  of one segment scores 0 (every n-gram is in every segment).
  """
  hyps, refs = _tokenize_captions(hypotheses, references)
  doc_freq = collections.Counter()
  for hyp_refs in refs:
    doc_freq.update(set().union(*(_ngrams(r, n) for r in hyp_refs
                                  for n in range(1, max_order + 1))))
  log_num_docs = math.log(len(refs))

  def vectors(tokens):
    result = []
    for n in range(1, max_order + 1):
      vec = {g: c * (log_num_docs - math.log(max(1.0, doc_freq[g])))
             for g, c in _ngrams(tokens, n).items()}
      result.append((vec, math.sqrt(sum(v * v for v in vec.values()))))
    return result

  scores = []
  for hyp, hyp_refs in zip(hyps, refs):
    hyp_vecs = vectors(hyp)
    per_ref = []
    for r in hyp_refs:
      sims = []
      for (h_vec, h_norm), (r_vec, r_norm) in zip(hyp_vecs, vectors(r)):
        dot = sum(min(v, r_vec.get(g, 0.0)) * r_vec.get(g, 0.0) for g, v in h_vec.items())
        sims.append(dot / (h_norm * r_norm) if h_norm > 0 and r_norm > 0 else 0.0)
      penalty = math.exp(-((len(hyp) - len(r))**2) / (2 * sigma**2))
      per_ref.append(penalty * np.mean(sims))
    scores.append(10.0 * np.mean(per_ref))
  return float(np.mean(scores))


def caption_metrics(hypotheses: Sequence[str], references: Sequence[Sequence[str]]
                    ) -> dict[str, float]:
  """BLEU-1..4, ROUGE-L and CIDEr-D of generated captions, and ``num_captions``."""
  result = corpus_bleu(hypotheses, references)
  result["rouge_l"] = rouge_l(hypotheses, references)
  result["cider_d"] = cider_d(hypotheses, references)
  result["num_captions"] = len(hypotheses)
  return result


def normalize_answer(text: str) -> str:
  """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
  text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
  text = re.sub(r"\b(a|an|the)\b", " ", text)
  return " ".join(text.split())


_LONE_LETTER_RE = re.compile(r"^\(?([A-Za-z])\)?[.):]?$")
_LEADING_LETTER_RE = re.compile(r"^(?:\(([A-Za-z])\)|([A-Za-z])[.):])\s*(.*)$", re.S)
_LETTER_WORD_RE = re.compile(r"^([A-Za-z])\s+(.*)$", re.S)
# The letter must be upper case here: "the answer is a fat cell" names no option.
_STATED_RE = re.compile(
    r"(?i:answer|option|choice)\s*(?:(?i:is)\s*)?(?:(?i:option|choice)\s*)?:?\s*"
    r"\(?([A-Z])\)?(?!\w)")


def parse_choice(generated_text: str | None, options: Mapping[str, str]) -> str | None:
  """The option letter a generated answer chooses, or None when it cannot be told.

  Accepts a lone letter ("B", "b.", "(B)"), a letter leading the answer ("(B) fat", "B. fat",
  or "B fat" when the rest is option B's text), a stated letter ("The answer is B"), or an
  option's text, exactly or as the one option mentioned. Option texts contained in a longer
  mentioned option ("fat" in "brown fat") do not count as separate mentions.
  """
  if generated_text is None:
    return None
  letters = {k.upper(): k for k in options}
  texts = {k: normalize_answer(v) for k, v in options.items()}
  text = generated_text.strip()
  normalized = normalize_answer(text)

  exact = [k for k, v in texts.items() if v and v == normalized]
  if len(exact) == 1:
    return exact[0]
  match = _LONE_LETTER_RE.match(text)
  if match and match.group(1).upper() in letters:
    return letters[match.group(1).upper()]
  match = _LEADING_LETTER_RE.match(text)
  if match:
    letter = (match.group(1) or match.group(2)).upper()
    if letter in letters:
      return letters[letter]
  match = _LETTER_WORD_RE.match(text)
  if match and match.group(1).upper() in letters:
    key = letters[match.group(1).upper()]
    if texts[key] and normalize_answer(match.group(2)) == texts[key]:
      return key
  match = _STATED_RE.search(text)
  if match and match.group(1) in letters:
    return letters[match.group(1)]

  padded = f" {normalized} "
  mentioned = [k for k, v in texts.items() if v and f" {v} " in padded]
  mentioned = [k for k in mentioned
               if not any(texts[k] != texts[o] and f" {texts[k]} " in f" {texts[o]} "
                          for o in mentioned)]
  return mentioned[0] if len(mentioned) == 1 else None


def multiple_choice_metrics(predicted_letters: Sequence[str | None],
                            answer_letters: Sequence[str],
                            categories: Sequence[str],
                            predicted_texts: Sequence[str | None] | None = None,
                            option_texts: Sequence[Mapping[str, str]] | None = None,
                            baseline_letters: str = "ABCD") -> dict[str, float]:
  """Multiple-choice accuracy by letter, by option text, per category, and letter baselines.

  ``predicted_letters`` may hold None for an unparseable answer (counted wrong; its share is
  ``unparsed_fraction``). With ``predicted_texts`` and ``option_texts`` (each question's options,
  letter -> text), ``accuracy_by_text`` counts a prediction right when its normalised text equals
  the correct option's, for models that answer with the text rather than the letter. Keys:
  ``accuracy``, ``accuracy/<category>``, ``always_<letter>_accuracy`` for each baseline letter
  (and any other answer letter), ``best_single_letter_accuracy``, ``num_questions``.
  """
  _check_pair("predicted_letters", predicted_letters, "answer_letters", answer_letters)
  _check_pair("answer_letters", answer_letters, "categories", categories)
  if (predicted_texts is None) != (option_texts is None):
    raise ValueError("predicted_texts and option_texts must be given together")

  def letter(x):
    return None if x is None else str(x).strip().upper()

  answers = np.array([letter(a) for a in answer_letters], dtype=object)
  if any(a is None or a == "" for a in answers):
    raise ValueError("answer_letters must all be letters, got None or empty")
  predicted = np.array([letter(p) for p in predicted_letters], dtype=object)
  correct = predicted == answers
  categories = np.array([str(c) for c in categories], dtype=object)

  result = {
      "accuracy": float(np.mean(correct)),
      "num_questions": len(answers),
      "unparsed_fraction": float(np.mean([p is None for p in predicted])),
  }
  if predicted_texts is not None:
    _check_pair("predicted_texts", predicted_texts, "answer_letters", answer_letters)
    _check_pair("option_texts", option_texts, "answer_letters", answer_letters)
    text_correct = []
    for i, (text, options) in enumerate(zip(predicted_texts, option_texts)):
      by_letter = {letter(k): v for k, v in options.items()}
      if answers[i] not in by_letter:
        raise ValueError(f"option_texts[{i}] has no option {answers[i]!r} (the answer)")
      text_correct.append(text is not None
                          and normalize_answer(text) == normalize_answer(by_letter[answers[i]]))
    result["accuracy_by_text"] = float(np.mean(text_correct))
  for category in sorted(set(categories)):
    result[f"accuracy/{category}"] = float(np.mean(correct[categories == category]))
  baseline = sorted(set(baseline_letters.upper()) | set(answers))
  for b in baseline:
    result[f"always_{b}_accuracy"] = float(np.mean(answers == b))
  result["best_single_letter_accuracy"] = max(result[f"always_{b}_accuracy"] for b in baseline)
  return result


def _token_f1(prediction: str, answer: str) -> float:
  pred_tokens = normalize_answer(prediction).split()
  answer_tokens = normalize_answer(answer).split()
  if not pred_tokens or not answer_tokens:
    # SQuAD v2: both empty is a match, one empty is not.
    return float(pred_tokens == answer_tokens)
  common = sum((collections.Counter(pred_tokens) & collections.Counter(answer_tokens)).values())
  if common == 0:
    return 0.0
  precision, recall = common / len(pred_tokens), common / len(answer_tokens)
  return 2 * precision * recall / (precision + recall)


def open_ended_metrics(predictions: Sequence[str | None],
                       answers: Sequence[str | Sequence[str]]) -> dict[str, float]:
  """SQuAD-style ``exact_match`` and mean token ``f1`` of free-text answers.

  Each answer may be one string or a list of acceptable strings (the best one counts, as in
  SQuAD). A None prediction scores 0.
  """
  _check_pair("predictions", predictions, "answers", answers)
  exact, f1 = [], []
  for i, (prediction, gold) in enumerate(zip(predictions, answers)):
    gold = [gold] if isinstance(gold, str) else list(gold)
    if not gold:
      raise ValueError(f"answers[{i}] is an empty list")
    prediction = "" if prediction is None else prediction
    exact.append(max(float(normalize_answer(prediction) == normalize_answer(g)) for g in gold))
    f1.append(max(_token_f1(prediction, g) for g in gold))
  return {"exact_match": float(np.mean(exact)), "f1": float(np.mean(f1)),
          "num_questions": len(predictions)}
