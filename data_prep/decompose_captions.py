r"""Splits (or has a language model rewrite) each slide's caption into the sentences PathFLIP
samples subcaptions from.

  python -m data_prep.decompose_captions --input manifest.jsonl --output sentences.jsonl \
      [--backend rule|openai] [--base_url http://127.0.0.1:8000/v1 --model NAME \
      --api_key_env VAR --workers 4 --timeout 60 --max_retries 3 --fallback] [--limit N]

Input: a manifest (.jsonl or .csv) with ``slide_id`` and ``caption`` columns, a tiling or
features ``slides.jsonl``, or a demo cohort's ``captions.jsonl`` (a directory holding one of
these works too). A row without a slide_id or with an empty caption is reported (file and line)
and skipped; a slide_id used twice is an error.

Backends (``pathflip_jax.data.captions``): ``rule`` splits the caption into its sentences;
``openai`` asks an OpenAI-compatible chat-completions server (vLLM, llama.cpp, ...) to rewrite
it into region-level findings. The API key is read from the environment variable named by
``--api_key_env``, never from the command line.

Output: one JSON line per slide, ``{"slide_id", "caption", "sentences", "backend", "model"}``,
appended and flushed as each slide finishes, so a killed job resumes where it stopped: a re-run
skips the slides already in ``--output`` (delete rows to redo them). A slide whose model call
fails goes to ``<output>.failures.jsonl`` (rewritten by every run) and the exit status is 1; with
``--fallback`` it gets the rule split instead, with backend ``"rule-fallback"`` and the error.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import time
from typing import Any, Iterator

from pathflip_jax import progress as progress_lib
from pathflip_jax.data import captions
from pathflip_jax.data import manifest

# Looked for, in this order, when --input is a directory.
INPUT_NAMES = ("captions.jsonl", "slides.jsonl", "manifest.jsonl", "manifest.csv")
PROGRESS_EVERY = 5.0  # seconds between progress lines
FAILURES_SUFFIX = ".failures.jsonl"


class DecomposeError(ValueError):
  """Input or output that cannot be used (the message names the file and line)."""


def _log(message: str) -> None:
  print(f"[decompose_captions] {message}", file=sys.stderr, flush=True)


def input_path(path: str) -> str:
  """``path``, or the first of :data:`INPUT_NAMES` inside it when it is a directory."""
  if not os.path.isdir(path):
    return path
  for name in INPUT_NAMES:
    candidate = os.path.join(path, name)
    if os.path.isfile(candidate):
      return candidate
  raise DecomposeError(f"{path}: directory has none of {', '.join(INPUT_NAMES)}")


def read_captions(path: str) -> tuple[list[dict[str, Any]], list[str]]:
  """(rows with slide_id, caption and line; problems) of an input file, in file order.

  Rows without a slide_id or a caption are problems (``file:line: ...``) and left out; a
  slide_id used twice raises DecomposeError naming both lines.
  """
  rows, problems = [], []
  seen: dict[str, int] = {}
  for line, row in manifest.read_rows(path):
    where = f"{path}:{line}"
    slide_id = row.get("slide_id")
    if slide_id is None or str(slide_id).strip() == "":
      problems.append(f"{where}: no slide_id; skipped")
      continue
    slide_id = str(slide_id)
    if slide_id in seen:
      raise DecomposeError(f"{where}: slide_id {slide_id!r} already used on line "
                           f"{seen[slide_id]}")
    seen[slide_id] = line
    caption = row.get("caption")
    if not isinstance(caption, str) or not caption.strip():
      problems.append(f"{where}: slide {slide_id!r} has no caption "
                      f"({'empty' if caption in (None, '') else type(caption).__name__}); "
                      "skipped")
      continue
    rows.append({"slide_id": slide_id, "caption": caption, "line": line})
  return rows, problems


def load_done(path: str) -> set[str]:
  """slide_ids already in an output file, made safe to append to.

  A last line left unfinished by a killed job is dropped (the file is truncated before it); a
  bad line anywhere else raises DecomposeError.
  """
  if not os.path.exists(path):
    return set()
  with open(path, "rb") as f:
    data = f.read()
  done: set[str] = set()
  lines = data.split(b"\n")
  last = max((i for i, raw in enumerate(lines) if raw.strip()), default=-1)
  offset = 0
  for i, raw in enumerate(lines):
    start, offset = offset, offset + len(raw) + 1
    if not raw.strip():
      continue
    try:
      row = json.loads(raw)
      ok = (isinstance(row, dict) and row.get("slide_id") not in (None, "")
            and isinstance(row.get("sentences"), list))
    except ValueError:
      ok = False
    if ok:
      done.add(str(row["slide_id"]))
      continue
    if i != last:
      raise DecomposeError(f"{path}:{i + 1}: not an output row of this job; fix or remove "
                           "the line (or the file) and run again")
    _log(f"{path}:{i + 1}: dropping an unfinished last line (from an interrupted run)")
    with open(path, "r+b") as f:
      f.truncate(start)
    return done
  if data and not data.endswith(b"\n"):
    # A complete last row whose newline was not written: finish it before appending.
    with open(path, "ab") as f:
      f.write(b"\n")
  return done


def _decompose(backend: captions.RewriteBackend, row: dict[str, Any],
               fallback: bool) -> tuple[dict[str, Any] | None, str | None]:
  """(output row, None) or (None, error) for one slide."""
  slide_id, caption = row["slide_id"], row["caption"]
  try:
    sentences = backend.rewrite(caption, slide_id)
    return {"slide_id": slide_id, "caption": caption, "sentences": sentences,
            "backend": backend.name, "model": getattr(backend, "model", None)}, None
  except captions.RewriteError as e:
    error = str(e)
  if fallback and backend.name != "rule":
    sentences = captions.split_sentences(caption)
    if sentences:
      return {"slide_id": slide_id, "caption": caption, "sentences": sentences,
              "backend": "rule-fallback", "model": None, "error": error}, None
    error += "; rule fallback found no sentences either"
  return None, error


def _results(backend: captions.RewriteBackend, todo: list[dict[str, Any]], fallback: bool,
             workers: int) -> Iterator[tuple[dict[str, Any], dict[str, Any] | None, str | None]]:
  """(input row, output row, error) per slide, as slides finish."""
  if backend.name == "rule" or workers <= 1:
    for row in todo:
      yield (row, *_decompose(backend, row, fallback))
    return
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
  try:
    futures = {pool.submit(_decompose, backend, row, fallback): row for row in todo}
    for future in concurrent.futures.as_completed(futures):
      yield (futures[future], *future.result())
  finally:
    # On an interrupt, requests not yet started are dropped; finished rows are already saved.
    pool.shutdown(wait=True, cancel_futures=True)


def run(argv=None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--input", required=True,
                      help="manifest .jsonl/.csv (slide_id, caption), slides.jsonl, "
                           "captions.jsonl, or a directory holding one")
  parser.add_argument("--output", required=True, help="output .jsonl (appended; resumable)")
  parser.add_argument("--backend", choices=sorted(captions.BACKENDS), default="rule")
  parser.add_argument("--base_url", help="openai: server URL, e.g. http://127.0.0.1:8000/v1")
  parser.add_argument("--model", help="openai: model name the server serves")
  parser.add_argument("--api_key_env",
                      help="openai: name of the environment variable holding the API key")
  parser.add_argument("--workers", type=int, default=4, help="openai: concurrent requests")
  parser.add_argument("--timeout", type=float, default=60.0, help="openai: seconds a request")
  parser.add_argument("--max_retries", type=int, default=3,
                      help="openai: retries of a request after a transient failure")
  parser.add_argument("--fallback", action="store_true",
                      help="a slide whose model call fails gets the rule split (marked)")
  parser.add_argument("--limit", type=int, help="only the first N slides of the input")
  args = parser.parse_args(argv)
  if args.workers < 1 or args.max_retries < 0 or args.timeout <= 0:
    parser.error("need --workers >= 1, --max_retries >= 0 and --timeout > 0")
  if args.limit is not None and args.limit < 1:
    parser.error("--limit must be >= 1")
  if args.backend == "rule":
    backend = captions.make_backend("rule")
  else:
    if not args.base_url or not args.model:
      parser.error(f"--backend {args.backend} needs --base_url and --model")
    api_key = None
    if args.api_key_env:
      api_key = os.environ.get(args.api_key_env)
      if not api_key:
        parser.error(f"--api_key_env {args.api_key_env}: that environment variable is not set")
    backend = captions.make_backend(args.backend, base_url=args.base_url, model=args.model,
                                    api_key=api_key, timeout=args.timeout,
                                    max_retries=args.max_retries)

  source = input_path(args.input)
  rows, problems = read_captions(source)
  for problem in problems:
    _log(problem)
  if args.limit is not None:
    rows = rows[:args.limit]
  output = args.output
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  done_before = load_done(output)
  todo = [row for row in rows if row["slide_id"] not in done_before]
  failures_path = output + FAILURES_SUFFIX
  if os.path.exists(failures_path):
    os.remove(failures_path)  # this run retries every slide that failed before
  _log(f"{source}: {len(rows)} slides; {len(rows) - len(todo)} already in {output}; "
       f"{len(todo)} to do with backend {backend.name!r}")

  start = time.time()
  progress = progress_lib.Progress(len(todo), "slides", "decompose_captions", PROGRESS_EVERY)
  written = failed = fell_back = 0
  failures = None
  try:
    with open(output, "a", encoding="utf-8") as out:
      for row, result, error in _results(backend, todo, args.fallback, args.workers):
        if result is not None:
          out.write(json.dumps(result, ensure_ascii=False) + "\n")
          out.flush()
          written += 1
          if result["backend"] == "rule-fallback":
            fell_back += 1
            _log(f"slide {row['slide_id']!r}: using the rule split: {error or result['error']}")
        else:
          if failures is None:
            failures = open(failures_path, "a", encoding="utf-8")
          failures.write(json.dumps({"slide_id": row["slide_id"], "line": row["line"],
                                     "backend": backend.name,
                                     "model": getattr(backend, "model", None),
                                     "error": error}, ensure_ascii=False) + "\n")
          failures.flush()
          failed += 1
          _log(f"slide {row['slide_id']!r} failed: {error}")
        progress.update(written + failed)
  finally:
    if failures is not None:
      failures.close()
  seconds = time.time() - start
  summary = {
      "input": os.path.abspath(source),
      "output": os.path.abspath(output),
      "backend": backend.name,
      "model": getattr(backend, "model", None),
      "total": len(rows),
      "done": written,
      "resumed": len(rows) - len(todo),
      "skipped": len(problems),
      "failed": failed,
      "fallback": fell_back,
      "seconds": round(seconds, 2),
      "failures_file": os.path.abspath(failures_path) if failed else None,
      "problems": problems,
  }
  _log(f"done {written} | already done {summary['resumed']} | skipped {len(problems)} | "
       f"failed {failed}" + (f" | rule fallback {fell_back}" if fell_back else "")
       + f" | {seconds:.1f}s -> {output}"
       + (f" (failures: {failures_path})" if failed else ""))
  return summary


def main(argv=None) -> None:
  """Runs the job; exit status 1 when a slide failed, 2 for unusable input."""
  try:
    summary = run(argv)
  except (DecomposeError, manifest.ManifestError) as e:
    _log(str(e))
    raise SystemExit(2) from None
  if summary["failed"]:
    raise SystemExit(1)


if __name__ == "__main__":
  from data_prep import decompose_captions
  decompose_captions.main()
