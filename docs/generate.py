"""Writes docs/<entry point>.md from each command's own docstring and ``--help``, so the pages
list exactly the flags the code accepts.

  python docs/generate.py            rewrite the pages
  python docs/generate.py --check    exit 1 (naming the pages) when a page is out of date

tests/test_docs.py runs the check.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import sys

DOCS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(DOCS)

# (module, one-line role), in pipeline order.
ENTRY_POINTS = (
    ("pathflip_jax.quickstart", "the whole demo in one command"),
    ("data_prep.make_demo_cohort", "the synthetic demo cohort with exact ground truth"),
    ("data_prep.tile_slides", "slides -> tissue patch shards (Apache Beam)"),
    ("data_prep.demo_questions", "demo questions answerable from the tiled patch grid"),
    ("data_prep.extract_features", "patch shards -> frozen patch features"),
    ("data_prep.import_features", "TRIDENT / CLAM / SlideChat features -> feature shards"),
    ("data_prep.decompose_captions", "reports -> region-level sentences (rule or LLM)"),
    ("data_prep.train_tokenizer", "a SentencePiece tokenizer from captions"),
    ("data_prep.public_benchmarks", "public benchmark files -> manifests and questions"),
    ("pathflip_jax.train", "every training stage (patch_clip, align, instruct)"),
    ("pathflip_jax.evaluate", "every evaluator of a config on a checkpoint"),
    ("pathflip_jax.compare", "paired differences across runs; spread over seeds"),
    ("data_prep.demo_vqa_oracle", "the demo questions' ceiling: answers from exact patch tissue"),
    ("pathflip_jax.infer", "one slide file -> zero-shot, caption, answers, heatmaps"),
    ("pathflip_jax.serve", "a slide viewer: zoom a slide, type a phrase, see where it is"),
)


def _help(module_name: str) -> str:
  """The command's ``--help`` text, from its own parser (run in-process)."""
  module = importlib.import_module(module_name)
  out = io.StringIO()
  argv, columns = sys.argv, os.environ.get("COLUMNS")
  sys.argv = [f"python -m {module_name}", "--help"]
  os.environ["COLUMNS"] = "100"   # argparse wraps to the terminal: the same pages everywhere
  try:
    with contextlib.redirect_stdout(out):
      try:
        entry = getattr(module, "main")
        entry()
      except SystemExit:
        pass
  finally:
    sys.argv = argv
    if columns is None:
      os.environ.pop("COLUMNS", None)
    else:
      os.environ["COLUMNS"] = columns
  text = out.getvalue().strip()
  if not text.startswith("usage:"):
    raise RuntimeError(f"{module_name}: --help printed no usage")
  return text


def page(module_name: str, role: str) -> str:
  module = importlib.import_module(module_name)
  doc = (module.__doc__ or "").strip()
  return "\n".join([
      f"# `python -m {module_name}`: {role}", "",
      "<!-- Written by docs/generate.py from the module docstring and its --help; "
      "edit those, then run `python docs/generate.py`. -->", "",
      "## What it does", "", "```", doc, "```", "",
      "## Flags", "", "```", _help(module_name), "```", ""])


def index() -> str:
  lines = ["# Entry points", "",
           "One page per command: what it does, what it writes, and every flag (generated from "
           "the code by `docs/generate.py`). The on-disk layout of what they write is in "
           "`WORKSPACE.md`.", ""]
  lines += [f"- [`python -m {m}`]({m.split('.')[-1]}.md): {role}" for m, role in ENTRY_POINTS]
  lines += ["", "Measured numbers: [results.md](results.md), written by `docs/results.py` from a "
            "named quickstart run. History of what was tried, with the commit where removed "
            "code last lived: [experiments/](experiments/README.md). The viewer's picture, "
            "[viewer.jpg](viewer.jpg), is drawn by `docs/viewer_screenshot.py`."]
  return "\n".join(lines) + "\n"


def pages() -> dict[str, str]:
  out = {"README.md": index()}
  for module_name, role in ENTRY_POINTS:
    out[f"{module_name.split('.')[-1]}.md"] = page(module_name, role)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--check", action="store_true")
  args = parser.parse_args()
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  stale = []
  for name, text in pages().items():
    path = os.path.join(DOCS, name)
    current = open(path, encoding="utf-8").read() if os.path.exists(path) else None
    if current == text:
      continue
    if args.check:
      stale.append(name)
    else:
      with open(path, "w", encoding="utf-8") as f:
        f.write(text)
      print(f"wrote docs/{name}")
  if stale:
    raise SystemExit(f"docs out of date: {stale}; run python docs/generate.py")


if __name__ == "__main__":
  main()
