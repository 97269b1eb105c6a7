"""Caption metrics against sacrebleu and hand-worked values, on resamples, METEOR's corpus
score from its statistics; VQA parsing, accuracies, baselines. (The comparison with the COCO
caption evaluation itself, Java included, is tests/test_coco_metrics.py.)"""

from __future__ import annotations

import math

import numpy as np
import pytest
from sacrebleu.metrics import BLEU

from pathflip_jax.evaluators import text_metrics as tm

HYPOTHESES = [
    "Invasive ductal carcinoma, grade 2.",
    "The tissue shows normal fat.",
    "Lymph node with metastatic carcinoma and necrosis",
    "ki-67 is high in the tumour cells",
    "benign",
    "well-differentiated adenocarcinoma with glands of 3.5 mm",
]
REFERENCES_A = [
    "Invasive ductal carcinoma (grade 2).",
    "Normal adipose tissue; fat only.",
    "Metastatic carcinoma in a lymph node, with necrosis.",
    "The tumour cells show high Ki-67.",
    "Benign breast tissue.",
    "Well-differentiated adenocarcinoma forming glands.",
]
REFERENCES_B = [
    "Ductal carcinoma, invasive, grade 2.",
    "The tissue shows fat.",
    "Lymph node: metastatic carcinoma.",
    "High ki-67 in tumour cells",
    "benign lesion",
    "Adenocarcinoma, well differentiated, with glands of 3.5 mm.",
]


def _joined(text):
  return " ".join(tm.tokenize(text))


def _sacrebleu(hypotheses, reference_streams, order):
  bleu = BLEU(tokenize="none", smooth_method="none", max_ngram_order=order,
              effective_order=False)
  streams = [[_joined(r) for r in stream] for stream in reference_streams]
  return bleu.corpus_score([_joined(h) for h in hypotheses], streams).score / 100.0


def test_tokenize_as_the_coco_evaluation_does():
  # PTB tokens, lower case, COCO's punctuation dropped (its brackets "-lrb-" stay: its list is
  # upper case).
  assert tm.tokenize("Carcinoma.") == tm.tokenize("carcinoma .") == ["carcinoma"]
  assert tm.tokenize("Ki-67 (high), 3.5 mm; and/or") == [
      "ki-67", "-lrb-", "high", "-rrb-", "3.5", "mm", "and/or"]
  assert tm.tokenize("Measuring about 0.4 mm. The tumour's margin isn't clear...") == [
      "measuring", "about", "0.4", "mm", "the", "tumour", "'s", "margin", "is", "n't", "clear"]
  assert tm.tokenize("e.g. 3.5mm, etc. vs. 10mm") == ["e.g.", "3.5", "mm", "etc.", "vs.", "10mm"]
  assert tm.tokenize("") == []
  # One stream, a text per line: "B." before a line starting "The" ends a sentence there.
  assert tm.coco_tokenize(["Grade B.", "The margin."]) == [["grade", "b"], ["the", "margin"]]
  assert tm.coco_tokenize(["Grade B.", "no margin"]) == [["grade", "b."], ["no", "margin"]]
  assert tm.coco_tokenize([]) == []
  with pytest.raises(TypeError, match="not one str"):
    tm.coco_tokenize("a text")


@pytest.mark.parametrize("subset", [slice(None), slice(0, 3), slice(2, 6), slice(4, 5)])
def test_bleu_matches_sacrebleu(subset):
  hyps = HYPOTHESES[subset]
  refs_a, refs_b = REFERENCES_A[subset], REFERENCES_B[subset]
  one = tm.corpus_bleu(hyps, [[r] for r in refs_a])
  two = tm.corpus_bleu(hyps, [[a, b] for a, b in zip(refs_a, refs_b)])
  for n in range(1, 5):
    assert one[f"bleu_{n}"] == pytest.approx(_sacrebleu(hyps, [refs_a], n), abs=1e-6)
    assert two[f"bleu_{n}"] == pytest.approx(_sacrebleu(hyps, [refs_a, refs_b], n), abs=1e-6)
  assert one["bleu_1"] > 0 and two["bleu_1"] >= one["bleu_1"]
  # Against B alone every order has matches, so BLEU-4 is compared away from 0 too.
  only_b = tm.corpus_bleu(hyps, [[r] for r in refs_b])
  for n in range(1, 5):
    assert only_b[f"bleu_{n}"] == pytest.approx(_sacrebleu(hyps, [refs_b], n), abs=1e-6)
  if subset == slice(None):
    assert only_b["bleu_4"] > 0.1


def test_bleu_reference_length_ties_go_to_shorter():
  # Hypothesis of 4 tokens, references of 3 and 5 tokens: both 1 away, the shorter (3) is used,
  # so there is no brevity penalty; choosing 5 would give exp(1 - 5/4).
  hyps, refs = ["a b c d"], [["a b c", "a b c d e"]]
  ours = tm.corpus_bleu(hyps, refs, max_order=1)["bleu_1"]
  assert ours == pytest.approx(1.0)
  assert ours == pytest.approx(_sacrebleu(hyps, [["a b c"], ["a b c d e"]], 1), abs=1e-9)
  # Hypothesis of 2 tokens against the same: 3 is closest, BP = exp(1 - 3/2).
  short = tm.corpus_bleu(["a b"], refs, max_order=1)["bleu_1"]
  assert short == pytest.approx(math.exp(1 - 3 / 2))


def test_bleu_hand_worked_and_zero_matches():
  # hyp "the cat the cat" vs ref "the cat sat": unigrams clipped to the:1, cat:1 -> 2/4;
  # bigrams (the cat) x2 clipped to 1, (cat the) 0 -> 1/3. Lengths 4 >= 3: BP = 1.
  result = tm.corpus_bleu(["the cat the cat"], [["the cat sat"]])
  assert result["bleu_1"] == pytest.approx(0.5)
  assert result["bleu_2"] == pytest.approx(math.sqrt(0.5 * 1 / 3))
  assert result["bleu_3"] == 0.0 and result["bleu_4"] == 0.0
  assert tm.corpus_bleu([""], [["a b"]])["bleu_1"] == 0.0


def test_rouge_l_hand_worked():
  # LCS("the cat sat", "the cat was sat") = 3: P = 3/3, R = 3/4,
  # F = (1 + 1.44) * 1 * 0.75 / (0.75 + 1.44 * 1) = 1.83 / 2.19.
  assert tm.rouge_l(["the cat sat"], [["the cat was sat"]]) == pytest.approx(1.83 / 2.19)
  # "the dog sat" vs "sat": LCS 1, P = 1/3, R = 1/1; vs "the dog ran down": LCS 2, P = 2/3,
  # R = 2/4. COCO maxes P (2/3) and R (1) separately, from different references:
  # F = 2.44 * (2/3) * 1 / (1 + 1.44 * 2/3) = 1.62667 / 1.96; averaged with a perfect segment.
  expected = 2.44 * (2 / 3) / (1 + 1.44 * 2 / 3)
  score = tm.rouge_l(["the dog sat", "Fat."], [["sat", "the dog ran down"], ["fat ."]])
  assert score == pytest.approx((expected + 1.0) / 2)
  assert tm.rouge_l(["Normal fat."], [["normal fat ."]]) == pytest.approx(1.0)
  assert tm.rouge_l(["x y"], [["a b"]]) == 0.0


def test_cider_d_hand_worked():
  # N = 2 segments, refs "a b" and "c d": every ref n-gram has df = 1, weight log 2; so does
  # the unseen "e" (df clipped to 1). Segment 2 is a perfect match: orders 1 and 2 give cosine
  # 1, orders 3 and 4 have no n-grams (0), so 10 * (1 + 1 + 0 + 0) / 4 = 5.
  # Segment 1, "a b e": order 1 dot = 2 log2^2, norms sqrt(3) log2 and sqrt(2) log2 -> 2/sqrt(6);
  # order 2 ("a b", "b e" vs "a b") -> 1/sqrt(2); length penalty exp(-1 / (2 * 36)).
  seg1 = 10 * math.exp(-1 / 72) * (2 / math.sqrt(6) + 1 / math.sqrt(2)) / 4
  score = tm.cider_d(["a b e", "c d"], [["a b"], ["c d"]])
  assert score == pytest.approx((seg1 + 5.0) / 2)
  # With one segment every n-gram is in every document: idf = log(1/1) = 0.
  assert tm.cider_d(["a b"], [["a b"]]) == 0.0


def test_cider_d_prefers_better_captions():
  refs = [[a, b] for a, b in zip(REFERENCES_A, REFERENCES_B)]
  perfect = tm.cider_d(REFERENCES_A, refs)
  generated = tm.cider_d(HYPOTHESES, refs)
  shuffled = tm.cider_d(HYPOTHESES[1:] + HYPOTHESES[:1], refs)
  assert perfect > generated > shuffled >= 0.0
  # Repeating the reference words inflates counts but clipping keeps it from paying off.
  padded = tm.cider_d(["a b a b a b", "c d"], [["a b"], ["c d"]])
  assert padded < tm.cider_d(["a b", "c d"], [["a b"], ["c d"]])


def test_caption_metrics_keys():
  result = tm.caption_metrics(HYPOTHESES, [[r] for r in REFERENCES_A])
  assert set(result) == {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider_d",
                         "num_captions"}
  assert result["num_captions"] == len(HYPOTHESES)
  assert 1 >= result["bleu_1"] >= result["bleu_2"] >= result["bleu_4"] >= 0


def test_corpus_metrics_on_resamples_are_recomputed_corpora():
  """A resample (slides drawn with repeats) scores as the corpus of the drawn captions would:
  BLEU's sums, ROUGE-L's mean and CIDEr-D's document frequencies all from the drawn ones;
  several hypothesis sets under one name give the mean of their metrics."""
  refs = [[a, b] if i % 2 else [a] for i, (a, b) in enumerate(zip(REFERENCES_A, REFERENCES_B))]
  shifted = HYPOTHESES[2:] + HYPOTHESES[:2]
  corpus = tm.CaptionCorpus(refs)
  metrics = corpus.metrics({"model": [HYPOTHESES], "draws": [HYPOTHESES, shifted]})
  everything = np.arange(len(refs))
  assert metrics["model"](everything) == pytest.approx(
      {k: v for k, v in tm.caption_metrics(HYPOTHESES, refs).items() if k != "num_captions"})
  for idx in (np.array([0, 0, 3, 5, 5, 5]), np.array([1, 2, 2, 4, 1, 0])):
    direct = tm.caption_metrics([HYPOTHESES[i] for i in idx], [refs[i] for i in idx])
    shifted_direct = tm.caption_metrics([shifted[i] for i in idx], [refs[i] for i in idx])
    for key, value in metrics["model"](idx).items():
      assert value == pytest.approx(direct[key], abs=1e-12), key
      assert metrics["draws"](idx)[key] == pytest.approx(
          (direct[key] + shifted_direct[key]) / 2, abs=1e-12), key
  # Drawn twice, a segment's n-grams count twice in the document frequencies.
  assert metrics["model"](np.array([0, 0, 3, 5, 5, 5]))["cider_d"] != pytest.approx(
      metrics["model"](np.array([0, 3, 5]))["cider_d"])
  segments = corpus.segment_scores(HYPOTHESES)
  assert segments["cider_d"].mean() == pytest.approx(metrics["model"](everything)["cider_d"])
  assert segments["rouge_l"].mean() == pytest.approx(metrics["model"](everything)["rouge_l"])
  with pytest.raises(ValueError, match="differ in length"):
    corpus.metrics({"short": [HYPOTHESES[:2]]})
  with pytest.raises(ValueError, match="list of caption lists"):
    corpus.metrics({"flat": HYPOTHESES})


def test_lcs_length_matches_dynamic_programming():
  def table(a, b):
    row = [0] * (len(b) + 1)
    for x in a:
      diagonal = 0
      for j, y in enumerate(b, start=1):
        diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]

  rng = np.random.default_rng(0)
  for _ in range(300):
    a = list(rng.choice(list("abcd"), rng.integers(0, 25)))
    b = list(rng.choice(list("abcde"), rng.integers(0, 70)))
    assert tm._lcs_length(a, b) == table(a, b), (a, b)


def test_meteor_corpus_score_from_statistics():
  # Statistics lines as METEOR 1.5's jar writes them (test length, reference length, function
  # words, then per module exact/stem/synonym/paraphrase: test and reference content matches,
  # test and reference function-word matches; chunks; word matches).
  perfect = [5, 5, 0, 0, 5, 5, 0, 0] + [0] * 12 + [1, 5, 5]
  # "the tissue shows normal fat" against "normal adipose tissue fat only": 3 exact content
  # matches in 3 chunks, one function word ("the") in the hypothesis.
  partial = [5, 5, 1, 0, 3, 3, 0, 0] + [0] * 12 + [3, 3, 3]
  rows = tm.meteor_segment_stats(np.array([perfect, partial], np.float64))
  assert rows[:, 23].tolist() == [0, 3]        # a segment matched whole adds no chunk
  # Content words weigh 0.75, function words 0.25: P = 0.75 * 3 / (0.75 * 4 + 0.25 * 1),
  # R = 0.75 * 3 / (0.75 * 5), Fmean = 1 / (0.15 / P + 0.85 / R); 3 chunks of 3 matches:
  # fragmentation 1, penalty 0.6 * 1 ** 0.2.
  p, r = 2.25 / 3.25, 2.25 / 3.75
  assert tm.meteor_from_stats(rows[1]) == pytest.approx(1 / (0.15 / p + 0.85 / r) * 0.4)
  assert tm.meteor_from_stats(rows[0]) == pytest.approx(1.0)
  # The jar's EVAL of [perfect, partial, partial] (its output, 0.34820973727868937).
  assert tm.meteor_from_stats(rows[[0, 1, 1]].sum(0)) == pytest.approx(0.34820973727868937,
                                                                       abs=1e-15)
  # Nothing to match (an empty hypothesis): 0, not nan.
  empty = tm.meteor_segment_stats(np.array([[0, 4, 0, 1] + [0] * 19], np.float64))
  assert tm.meteor_from_stats(empty[0]) == 0.0


OPTIONS = {"A": "tumour", "B": "fat", "C": "brown fat", "D": "stroma"}


@pytest.mark.parametrize("text, expected", [
    ("B", "B"), ("b.", "B"), ("(B)", "B"), ("(B) fat", "B"), ("B. fat", "B"), ("B) fat", "B"),
    ("The answer is B", "B"), ("Answer: (D).", "D"), ("the correct option is C", "C"),
    ("B fat", "B"), ("Fat.", "B"), ("This is brown fat.", "C"), ("The stroma", "D"),
    ("A tumour", "A"), ("the answer is a fat cell", "B"),
    ("A large nucleus", None), ("tumour or stroma", None), ("E", None), ("", None),
    (None, None), ("I am not sure", None),
])
def test_parse_choice(text, expected):
  assert tm.parse_choice(text, OPTIONS) == expected


def test_multiple_choice_metrics():
  answers = ["A", "A", "B", "C", "A", "D"]
  predicted = ["A", "B", "B", None, "a", "A"]
  categories = ["tissue", "tissue", "grade", "grade", "grade", "tissue"]
  result = tm.multiple_choice_metrics(predicted, answers, categories)
  assert result["accuracy"] == pytest.approx(3 / 6)
  assert result["accuracy/tissue"] == pytest.approx(1 / 3)
  assert result["accuracy/grade"] == pytest.approx(2 / 3)
  assert result["unparsed_fraction"] == pytest.approx(1 / 6)
  assert result["always_A_accuracy"] == pytest.approx(3 / 6)
  assert result["always_B_accuracy"] == pytest.approx(1 / 6)
  assert result["always_D_accuracy"] == pytest.approx(1 / 6)
  assert result["best_single_letter_accuracy"] == pytest.approx(3 / 6)
  assert result["num_questions"] == 6
  assert "accuracy_by_text" not in result


def test_multiple_choice_accuracy_by_text():
  options = [OPTIONS, OPTIONS, {"A": "Grade 1", "B": "Grade 2"}]
  result = tm.multiple_choice_metrics(
      [None, "B", None], ["B", "C", "B"], ["x", "x", "y"],
      predicted_texts=["Fat.", "fat", "grade 2"], option_texts=options)
  # Texts: "Fat." == "fat" (right), "fat" != "brown fat" (wrong), "grade 2" == "Grade 2" (right).
  assert result["accuracy_by_text"] == pytest.approx(2 / 3)
  assert result["accuracy"] == 0.0
  # An answer letter E outside A-D gets its own baseline.
  assert "always_E_accuracy" in tm.multiple_choice_metrics(["E"], ["E"], ["x"])


def test_open_ended_metrics():
  predictions = ["The tumour.", "invasive ductal carcinoma", "fat", None]
  answers = ["tumour", "ductal carcinoma", ["adipose", "Fat"], "stroma"]
  result = tm.open_ended_metrics(predictions, answers)
  assert result["exact_match"] == pytest.approx(2 / 4)
  # "invasive ductal carcinoma" vs "ductal carcinoma": P = 2/3, R = 1, F1 = 0.8.
  assert result["f1"] == pytest.approx((1 + 0.8 + 1 + 0) / 4)
  exact, f1 = tm.open_ended_scores(predictions, answers)
  assert exact.tolist() == [1, 0, 1, 0] and f1 == pytest.approx([1, 0.8, 1, 0])
  assert tm.normalize_answer("  An  Adipose, (fat) cell!") == "adipose fat cell"


@pytest.mark.parametrize("call, name", [
    (lambda: tm.corpus_bleu(["a"], [["a"], ["b"]]), "hypotheses and references"),
    (lambda: tm.rouge_l([], []), "hypotheses is empty"),
    (lambda: tm.cider_d(["a", "b"], ["a", "b"]), r"references\[0\]"),
    (lambda: tm.caption_metrics(["a"], [[]]), r"references\[0\]"),
    (lambda: tm.multiple_choice_metrics(["A"], ["A", "B"], ["x", "x"]),
     "predicted_letters and answer_letters"),
    (lambda: tm.multiple_choice_metrics(["A"], ["A"], ["x", "y"]), "answer_letters and categories"),
    (lambda: tm.multiple_choice_metrics(["A"], ["A"], ["x"], predicted_texts=["a"]),
     "option_texts"),
    (lambda: tm.multiple_choice_metrics(["A"], ["A"], ["x"], ["a", "b"], [OPTIONS]),
     "predicted_texts and answer_letters"),
    (lambda: tm.open_ended_metrics(["a"], []), "predictions and answers"),
    (lambda: tm.open_ended_metrics([], []), "predictions is empty"),
])
def test_errors_name_the_argument(call, name):
  with pytest.raises(ValueError, match=name):
    call()
