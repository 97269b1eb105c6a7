r"""Trains the project's SentencePiece tokenizer on a cohort's captions and questions, or on text.

  python -m data_prep.train_tokenizer --output PREFIX [--cohort DIR] [--text FILE ...] \
      [--vocab_size 1000] [--model_type unigram|bpe]

Corpus:
  --cohort DIR   a demo-cohort-like directory: every caption and caption sentence of
                 DIR/captions.jsonl, and (when present) every question, non-empty option and
                 answer_text of DIR/questions.csv.
  --text FILE    (repeatable) a .jsonl file (each line's ``caption``, and ``text`` when present)
                 or a plain text file (one text per line, blank lines skipped).

Writes PREFIX.model, PREFIX.vocab and PREFIX.json: number of texts, vocabulary size, sha256 of the
model, the special ids, and tokens per caption (mean, 95th percentile, max, counting BOS and EOS)
to choose text lengths by. Captions are the cohort's and the .jsonl ``caption`` fields; with
none, the stats count every text.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import numpy as np

from pathflip_jax import tokenizer
from pathflip_jax.data import manifest

JSONL_EXTS = (".jsonl", ".json", ".ndjson")


def cohort_texts(cohort_dir: str) -> tuple[list[str], list[str]]:
  """(all texts, captions) of a cohort directory's captions.jsonl and questions.csv."""
  captions_path = os.path.join(cohort_dir, "captions.jsonl")
  if not os.path.isfile(captions_path):
    raise FileNotFoundError(f"{captions_path}: not found; --cohort takes a directory written "
                            "by data_prep.make_demo_cohort")
  texts: list[str] = []
  captions: list[str] = []
  for line, row in manifest.read_rows(captions_path):
    caption = row.get("caption")
    if not isinstance(caption, str):
      raise ValueError(f"{captions_path}:{line}: missing 'caption' text")
    captions.append(caption)
    texts.append(caption)
    for sentence in row.get("sentences") or []:
      if isinstance(sentence, dict) and sentence.get("text"):
        texts.append(str(sentence["text"]))
  questions_path = os.path.join(cohort_dir, "questions.csv")
  if os.path.isfile(questions_path):
    for _, row in manifest.read_rows(questions_path):
      # answer (a letter) is left out: it is not text a model reads or writes.
      for column in ("question", "A", "B", "C", "D", "answer_text"):
        if row.get(column):
          texts.append(row[column])
  return texts, captions


def file_texts(path: str) -> tuple[list[str], list[str]]:
  """(all texts, captions) of a .jsonl file (caption and text fields) or a plain text file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: text file not found")
  texts: list[str] = []
  captions: list[str] = []
  if os.path.splitext(path)[1].lower() in JSONL_EXTS:
    for line, row in manifest.read_rows(path):
      if "caption" not in row and "text" not in row:
        raise ValueError(f"{path}:{line}: a line needs a 'caption' or 'text' field")
      for field in ("caption", "text"):
        value = row.get(field)
        if value is not None and not isinstance(value, str):
          raise ValueError(f"{path}:{line}: field {field!r} must be a string")
        if value:
          texts.append(value)
          if field == "caption":
            captions.append(value)
    return texts, captions
  with open(path, encoding="utf-8") as f:
    texts = [line.strip() for line in f if line.strip()]
  return texts, captions


def _lengths(tok: tokenizer.Tokenizer, texts: list[str]) -> dict[str, float]:
  counts = np.array([len(tok.encode(t, add_bos=True, add_eos=True)) for t in texts])
  return {"mean": round(float(counts.mean()), 1),
          "p95": int(np.ceil(np.percentile(counts, 95))), "max": int(counts.max())}


def run(argv=None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--output", required=True,
                      help="output prefix: writes PREFIX.model, PREFIX.vocab, PREFIX.json")
  parser.add_argument("--cohort", help="cohort directory (captions.jsonl, questions.csv)")
  parser.add_argument("--text", action="append", default=[],
                      help="a .jsonl or plain text file; repeat for more")
  parser.add_argument("--vocab_size", type=int, default=1000,
                      help="at most this many pieces (fewer when the corpus is small)")
  parser.add_argument("--model_type", choices=tokenizer.MODEL_TYPES, default="unigram")
  args = parser.parse_args(argv)
  if not args.cohort and not args.text:
    parser.error("no corpus: pass --cohort DIR and/or --text FILE")
  prefix = args.output[:-len(".model")] if args.output.endswith(".model") else args.output
  texts: list[str] = []
  captions: list[str] = []
  sources = []
  if args.cohort:
    more, caps = cohort_texts(args.cohort)
    texts += more
    captions += caps
    sources.append(os.path.abspath(args.cohort))
  for path in args.text:
    more, caps = file_texts(path)
    texts += more
    captions += caps
    sources.append(os.path.abspath(path))
  if not any(t.strip() for t in texts):
    raise SystemExit(f"no text found in {', '.join(sources)}")
  model_path = tokenizer.train(texts, prefix, vocab_size=args.vocab_size,
                               model_type=args.model_type)
  tok = tokenizer.Tokenizer(model_path)
  stats = {
      "model": os.path.abspath(model_path),
      "sources": sources,
      "num_texts": len(texts),
      "num_captions": len(captions),
      "model_type": args.model_type,
      "vocab_size_requested": args.vocab_size,
      "vocab_size": tok.vocab_size,
      "num_embeddings": tok.num_embeddings,
      "sha256": tok.sha256,
      "special_ids": {"pad": tok.pad_id, "eos": tok.eos_id, "bos": tok.bos_id,
                      "unk": tok.unk_id, "image": tok.image_id},
      # With BOS and EOS, as encode_batch writes them: what a text length has to hold.
      "tokens_per_caption": _lengths(tok, captions or texts),
  }
  with open(prefix + ".json", "w") as f:
    json.dump(stats, f, indent=1)
  lengths = stats["tokens_per_caption"]
  print(f"[train_tokenizer] {len(texts)} texts -> {model_path} | {tok.vocab_size} pieces | "
        f"tokens/caption mean {lengths['mean']} p95 {lengths['p95']} max {lengths['max']} | "
        f"sha256 {tok.sha256[:12]}", file=sys.stderr)
  return stats


def main() -> None:
  run()


if __name__ == "__main__":
  from data_prep import train_tokenizer
  train_tokenizer.main()
