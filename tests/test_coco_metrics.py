"""The caption metrics against the COCO caption evaluation itself (pycocoevalcap 1.2, a test
requirement): its Java PTB tokenizer, its BLEU, ROUGE-L and CIDEr-D scorers, and METEOR 1.5 from
the jar in its wheel (offline: the jar and its paraphrase table ship in the package)."""

from __future__ import annotations

import contextlib
import io
import shutil

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from pathflip_jax.evaluators import text_metrics as tm

pytestmark = pytest.mark.skipif(shutil.which("java") is None,
                                reason="the COCO caption evaluation needs a Java runtime")

# Report-like captions: several sentences, multiple references, punctuation, numbers, clitics,
# abbreviations, brackets, quotes and dashes.
HYPOTHESES = [
    "Invasive ductal carcinoma, grade 2, measuring about 0.4 mm across.",
    "Benign glands (round lumina) can be seen in the centre; no malignancy.",
    "Lymph node with metastatic carcinoma -- necrosis is present, e.g. in the upper part.",
    "The tumour's margin isn't clear. Ki-67 is 30% and ER+/PR- is noted.",
    "Fat.",
    "Well-differentiated adenocarcinoma with glands of 3.5mm... Grade B.",
    "Sheets of tumour cells \u2013 \u201clarge\u201d nuclei \u2013 and/or mitoses (10/10 HPF).",
    "",
]
REFERENCES = [
    ["Invasive ductal carcinoma (grade 2), measuring about 0.4 mm across.",
     "Ductal carcinoma, invasive, grade 2."],
    ["Small benign glands with round lumina are seen in the centre. No malignancy is identified."],
    ["Metastatic carcinoma in a lymph node, with necrosis.", "Lymph node: metastatic carcinoma.",
     "Necrosis in the upper part of a lymph node metastasis."],
    ["The tumour cells show high Ki-67 (30%); ER+/PR- status.", "Margins are not clear."],
    ["Adipose tissue; fat only.", "fat"],
    ["The adenocarcinoma is well differentiated, with glands of 3.5 mm. The grade is 2."],
    ["Sheets of tumour cells with large nuclei and frequent mitoses, 10/10 HPF.",
     "Large nuclei, many mitoses."],
    ["Normal breast tissue."],
]


def _quiet(fn, *args):
  with contextlib.redirect_stdout(io.StringIO()):
    return fn(*args)


def _coco(hypotheses, references):
  """pycocoevalcap's tokenized references and hypotheses, keyed by segment."""
  gts = {i: [{"caption": r} for r in refs] for i, refs in enumerate(references)}
  res = {i: [{"caption": h}] for i, h in enumerate(hypotheses)}
  tokenizer = PTBTokenizer()
  return _quiet(tokenizer.tokenize, gts), _quiet(tokenizer.tokenize, res)


def _coco_scores(gts, res):
  out = dict(zip(["bleu_1", "bleu_2", "bleu_3", "bleu_4"],
                 _quiet(Bleu(4).compute_score, gts, res)[0]))
  out["rouge_l"] = Rouge().compute_score(gts, res)[0]
  out["cider_d"] = Cider().compute_score(gts, res)[0]
  return out


def test_tokens_match_the_java_ptb_tokenizer():
  gts, res = _coco(HYPOTHESES, REFERENCES)
  ours = tm.coco_tokenize(HYPOTHESES)
  assert [" ".join(t) for t in ours] == [res[i][0] for i in range(len(HYPOTHESES))]
  refs = tm.CaptionCorpus(REFERENCES).references
  assert [[" ".join(t) for t in r] for r in refs] == [gts[i] for i in range(len(REFERENCES))]
  # Spot checks of what the lexer does (lines: "Grade B." then "Sheets...": not a sentence
  # start, so "b." keeps its period).
  assert ours[5][-2:] == ["grade", "b."] and "0.4" in ours[0] and "-lrb-" in ours[1]
  assert ours[3][:6] == ["the", "tumour", "'s", "margin", "is", "n't"] and ours[-1] == []


def test_metrics_match_pycocoevalcap():
  gts, res = _coco(HYPOTHESES, REFERENCES)
  theirs = _coco_scores(gts, res)
  ours = tm.caption_metrics(HYPOTHESES, REFERENCES)
  for key, value in theirs.items():
    # pycocoevalcap adds 1e-15 to BLEU's matches: an order without any is ~1e-5, not 0.
    assert ours[key] == pytest.approx(value, rel=1e-9, abs=1e-4 if ours[key] == 0 else 1e-12), key
  assert ours["bleu_4"] > 0.1 and ours["cider_d"] > 0.5
  # A bootstrap resample is the corpus of the slides drawn: pycocoevalcap on the drawn
  # captions (repeats as separate images) gives the same numbers.
  idx = np.array([0, 0, 2, 3, 3, 3, 5, 6])
  gts_r = {k: gts[int(i)] for k, i in enumerate(idx)}
  res_r = {k: res[int(i)] for k, i in enumerate(idx)}
  resampled = tm.CaptionCorpus(REFERENCES).metrics({"m": [HYPOTHESES]})["m"](idx)
  for key, value in _coco_scores(gts_r, res_r).items():
    assert resampled[key] == pytest.approx(value, rel=1e-9, abs=1e-4 if value < 1e-4 else 1e-12)


@pytest.mark.slow
def test_meteor_matches_pycocoevalcap_offline():
  """METEOR 1.5 from the wheel's jar and paraphrase table (no download): the statistics from
  our process and the corpus score computed from their sums equal pycocoevalcap's METEOR, on all
  segments and on a resample."""
  hyps, refs = HYPOTHESES, REFERENCES           # the last hypothesis is empty
  gts, res = _coco(hyps, refs)
  meteor = Meteor()
  theirs = meteor.compute_score(gts, res)[0]
  idx = np.array([1, 1, 4, 6, 0, 0, 2, 7])
  theirs_resampled = meteor.compute_score({k: gts[int(i)] for k, i in enumerate(idx)},
                                          {k: res[int(i)] for k, i in enumerate(idx)})[0]
  ours = tm.CaptionCorpus(refs, tm.Meteor()).metrics({"m": [hyps]})["m"]
  assert ours(np.arange(len(hyps)))["meteor"] == pytest.approx(theirs, abs=1e-12)
  assert ours(idx)["meteor"] == pytest.approx(theirs_resampled, abs=1e-12)
  assert 0.2 < theirs < 0.6
