"""The SentencePiece tokenizer: special ids, <image>, batches, determinism, pickling, models
trained elsewhere, and the training job."""

from __future__ import annotations

import csv
import hashlib
import json
import copy as copy_module
import random
import shutil

import numpy as np
import pytest
import sentencepiece as spm

from data_prep import train_tokenizer
from pathflip_jax import tokenizer as T

SIZES = ["Small", "Medium-sized", "Large"]
TISSUES = ["invasive carcinoma with pleomorphic nuclei", "benign glands with round lumina",
           "stroma with wavy pink collagen fibres", "necrosis with karyorrhectic debris",
           "adipose tissue with empty polygonal vacuoles", "dense lymphocytic infiltrate"]
PLACES = ["in the upper left", "in the lower right", "in the centre", "on the left side"]
VERBS = ["can be seen", "is noted", "is identified"]


def _corpus(n: int = 48, seed: int = 0) -> list[str]:
  rng = random.Random(seed)
  return [f"{rng.choice(SIZES)} {rng.choice(TISSUES)} {rng.choice(VERBS)} {rng.choice(PLACES)}, "
          f"measuring about {rng.randint(1, 9)}.{rng.randint(0, 9)} mm across." for _ in range(n)]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
  return T.train(_corpus(), str(tmp_path_factory.mktemp("tok") / "sub" / "tok"), vocab_size=400)


@pytest.fixture(scope="module")
def tok(model_path) -> T.Tokenizer:
  return T.Tokenizer(model_path)


def test_special_ids_and_files(model_path, tok):
  assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id, tok.image_id) == (0, 1, 2, 3, 4)
  assert (T.PAD_ID, T.EOS_ID, T.BOS_ID, T.UNK_ID, T.IMAGE_ID) == (0, 1, 2, 3, 4)
  assert tok.num_embeddings == tok.vocab_size
  assert 261 < tok.vocab_size <= 400        # 5 specials + 256 bytes + learned pieces
  vocab = open(model_path[:-len(".model")] + ".vocab", encoding="utf-8").read().splitlines()
  assert len(vocab) == tok.vocab_size
  assert [line.split("\t")[0] for line in vocab[:5]] == [T.PAD, T.EOS, T.BOS, T.UNK, T.IMAGE]
  with open(model_path, "rb") as f:
    assert tok.sha256 == hashlib.sha256(f.read()).hexdigest()
  assert f"vocab_size={tok.vocab_size}" in repr(tok) and "image_id=4" in repr(tok)
  assert model_path in repr(tok)


def test_image_is_one_token(tok):
  ids = tok.encode("Describe <image> in detail.")
  assert ids.count(tok.image_id) == 1
  assert tok.decode(ids) == "Describe <image> in detail."
  assert tok.encode("<image><image>").count(tok.image_id) == 2
  # Other special tokens written in text stay text: a caption cannot end itself early.
  ids = tok.encode("<eos> <pad> <bos>")
  assert not {tok.eos_id, tok.pad_id, tok.bos_id} & set(ids)
  assert tok.decode(ids) == "<eos> <pad> <bos>"


def test_round_trip(tok):
  text = "Large invasive carcinoma is identified in the centre, measuring about 2.5 mm across."
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert len(ids) < 0.7 * len(text)         # pieces learned, not characters
  # Unseen characters go through byte fallback, never <unk>.
  text = "Ж-shaped focus of 12 µm ✓"
  ids = tok.encode(text, add_bos=True, add_eos=True)
  assert tok.unk_id not in ids
  assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
  assert tok.decode(np.array(ids)) == text
  # Decoding stops at EOS and skips padding and BOS.
  body = tok.encode("benign glands")
  padded = np.array([tok.bos_id, *body, tok.eos_id, *tok.encode("stroma"), tok.pad_id])
  assert tok.decode(padded) == "benign glands"
  assert tok.decode([tok.pad_id, *body, tok.pad_id]) == "benign glands"
  with pytest.raises(ValueError, match="outside"):
    tok.decode([tok.num_embeddings])


def test_encode_batch(tok):
  short, long = "stroma", " ".join(_corpus(3))
  batch = tok.encode_batch([short, long], 16)
  assert batch.shape == (2, 16) and batch.dtype == np.int32
  ids = tok.encode(short, add_bos=True, add_eos=True)
  np.testing.assert_array_equal(batch[0, :len(ids)], ids)
  assert (batch[0, len(ids):] == tok.pad_id).all()
  # Truncated: still starts with BOS and ends with EOS, no padding.
  assert len(tok.encode(long)) > 16
  assert batch[1, 0] == tok.bos_id and batch[1, -1] == tok.eos_id
  assert tok.pad_id not in batch[1].tolist()
  np.testing.assert_array_equal(batch[1, 1:15], tok.encode(long)[:14])
  plain = tok.encode_batch([long], 8, add_bos=False, add_eos=False)
  np.testing.assert_array_equal(plain[0], tok.encode(long)[:8])
  assert tok.encode_batch([], 4).shape == (0, 4)
  with pytest.raises(ValueError, match="max_len"):
    tok.encode_batch([short], 1)
  with pytest.raises(TypeError):
    tok.encode_batch(short, 8)


def test_training_is_deterministic(model_path, tmp_path):
  again = T.train(_corpus(), str(tmp_path / "again"), vocab_size=400)
  with open(model_path, "rb") as a, open(again, "rb") as b:
    assert a.read() == b.read()             # also from another output path
  with open(model_path[:-6] + ".vocab") as a, open(tmp_path / "again.vocab") as b:
    assert a.read() == b.read()
  bpe = T.Tokenizer(T.train(_corpus(), str(tmp_path / "bpe"), vocab_size=400, model_type="bpe"))
  assert (bpe.pad_id, bpe.eos_id, bpe.bos_id, bpe.unk_id, bpe.image_id) == (0, 1, 2, 3, 4)
  assert bpe.sha256 != T.Tokenizer(again).sha256


def test_pickle_keeps_the_model(model_path, tmp_path):
  copy = tmp_path / "copy.model"
  shutil.copy(model_path, copy)
  tok = T.Tokenizer(str(copy))
  copy.unlink()                              # a worker needs no file: the bytes travel
  # deepcopy runs the __getstate__/__setstate__ round trip that pickling for a spawned grain
  # worker runs (the project does not unpickle, even in tests).
  clone = copy_module.deepcopy(tok)
  text = "Describe <image>: small necrosis in the centre."
  assert clone.encode(text, add_eos=True) == tok.encode(text, add_eos=True)
  assert repr(clone) == repr(tok) and clone.sha256 == tok.sha256
  np.testing.assert_array_equal(clone.encode_batch([text], 12), tok.encode_batch([text], 12))


def _foreign_model(tmp_path, name: str, **kwargs) -> str:
  # sentencepiece's defaults: <unk>=0, <s>=1, </s>=2, no pad (a LLaMA-style layout).
  spm.SentencePieceTrainer.train(sentence_iterator=iter(_corpus()),
                                 model_prefix=str(tmp_path / name), vocab_size=120,
                                 hard_vocab_limit=False, minloglevel=2, **kwargs)
  return str(tmp_path / f"{name}.model")


def test_model_without_pad_or_image(tmp_path):
  tok = T.Tokenizer(_foreign_model(tmp_path, "llama_like"))
  assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  assert tok.pad_id == tok.eos_id            # documented fallback
  assert tok.image_id == tok.vocab_size
  assert tok.num_embeddings == tok.vocab_size + 1
  text = "<image> Small stroma in the centre."
  ids = tok.encode(text, add_bos=True)
  assert ids.count(tok.image_id) == 1 and max(ids) == tok.image_id
  assert tok.decode(ids) == text
  batch = tok.encode_batch([text], 32)
  assert batch.max() == tok.image_id and batch[0, -1] == tok.pad_id
  assert tok.decode(batch[0]) == text


def test_model_with_control_image(tmp_path):
  # <image> present but as a control piece: never matched in text by sentencepiece itself.
  tok = T.Tokenizer(_foreign_model(tmp_path, "control", control_symbols=["<image>"]))
  assert tok.image_id < tok.vocab_size == tok.num_embeddings
  ids = tok.encode("<image> small glands <image>")
  assert ids.count(tok.image_id) == 2
  assert tok.decode(ids) == "<image> small glands<image>"     # the documented lost space


def test_bad_model_files(tmp_path):
  missing = tmp_path / "nope.model"
  with pytest.raises(FileNotFoundError, match=str(missing)):
    T.Tokenizer(str(missing))
  garbage = tmp_path / "garbage.model"
  garbage.write_bytes(b"not a model")
  with pytest.raises(ValueError, match=str(garbage)):
    T.Tokenizer(garbage)


def test_bad_training_input(tmp_path):
  for corpus in ([], ["", "  \n"]):
    with pytest.raises(ValueError, match="empty corpus"):
      T.train(corpus, str(tmp_path / "empty"))
  with pytest.raises(ValueError, match="model_type"):
    T.train(_corpus(), str(tmp_path / "x"), model_type="word")
  with pytest.raises(ValueError, match="too small"):
    T.train(_corpus(), str(tmp_path / "x"), vocab_size=100)
  assert not list(tmp_path.iterdir())


def _fake_cohort(root):
  root.mkdir()
  corpus = _corpus(9, seed=1)
  with open(root / "captions.jsonl", "w") as f:
    for i in range(3):
      sentences = [{"text": t, "region_id": f"r{k}", "tissue": "stroma"}
                   for k, t in enumerate(corpus[3 * i:3 * i + 2])]
      f.write(json.dumps({"slide_id": f"S{i}", "caption": " ".join(corpus[3 * i:3 * i + 3]),
                          "sentences": sentences}) + "\n")
  with open(root / "questions.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=["slide_id", "split", "category", "question", "A", "B",
                                           "C", "D", "answer", "answer_text", "type"])
    writer.writeheader()
    writer.writerow({"slide_id": "S0", "split": "train", "category": "diagnosis",
                     "question": "What is the most likely diagnosis?", "A": "benign",
                     "B": "carcinoma", "C": "carcinoma with necrosis",
                     "D": "lymph node metastasis", "answer": "B", "answer_text": "carcinoma",
                     "type": "multiple_choice"})
    writer.writerow({"slide_id": "S0", "split": "train", "category": "location",
                     "question": "Where is the tumour?", "A": "", "B": "", "C": "", "D": "",
                     "answer": "", "answer_text": "In the centre.", "type": "open"})
  return root


def test_train_tokenizer_job(tmp_path, capsys):
  cohort = _fake_cohort(tmp_path / "cohort")
  extra = tmp_path / "extra.jsonl"
  extra.write_text(json.dumps({"caption": "Dense lymphocytic infiltrate.", "text": "Fat."}) + "\n"
                   + json.dumps({"text": "Necrosis."}) + "\n")
  plain = tmp_path / "extra.txt"
  plain.write_text("First line.\n\nSecond line.\n")
  prefix = tmp_path / "out" / "tok"
  stats = train_tokenizer.run(["--output", str(prefix), "--cohort", str(cohort), "--text",
                               str(extra), "--text", str(plain), "--vocab_size", "500"])
  for ext in (".model", ".vocab", ".json"):
    assert (tmp_path / "out" / f"tok{ext}").is_file()
  assert json.loads((tmp_path / "out" / "tok.json").read_text()) == stats
  assert {"num_texts", "num_captions", "vocab_size", "sha256", "special_ids",
          "tokens_per_caption"} <= set(stats)
  # 3 captions + 6 sentences; question, 4 options, answer_text; question, answer_text;
  # caption + text, text; two lines.
  assert stats["num_texts"] == 9 + 6 + 2 + 3 + 2
  assert stats["num_captions"] == 4
  assert stats["special_ids"] == {"pad": 0, "eos": 1, "bos": 2, "unk": 3, "image": 4}
  tok = T.Tokenizer(str(prefix) + ".model")
  assert stats["sha256"] == tok.sha256 and stats["vocab_size"] == tok.vocab_size
  lengths = stats["tokens_per_caption"]
  assert 2 < lengths["mean"] <= lengths["p95"] <= lengths["max"]
  assert "[train_tokenizer]" in capsys.readouterr().err


def test_train_tokenizer_job_errors(tmp_path):
  with pytest.raises(SystemExit):
    train_tokenizer.run(["--output", str(tmp_path / "tok")])
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"caption": "ok"}) + "\n" + json.dumps({"slide_id": "x"}) + "\n")
  with pytest.raises(ValueError, match=f"{bad}:2"):
    train_tokenizer.run(["--output", str(tmp_path / "tok"), "--text", str(bad)])
  with pytest.raises(FileNotFoundError, match="captions.jsonl"):
    train_tokenizer.run(["--output", str(tmp_path / "tok"), "--cohort", str(tmp_path)])
