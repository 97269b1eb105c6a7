"""The entry-point pages in docs/ match the code: each lists its command's own docstring and
every flag its parser accepts (docs/generate.py --check)."""

import importlib.util
import pathlib

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"


def _generator():
  spec = importlib.util.spec_from_file_location("docs_generate", DOCS / "generate.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_entry_point_pages_are_up_to_date():
  generate = _generator()
  pages = generate.pages()
  assert len(pages) == len(generate.ENTRY_POINTS) + 1
  stale = [name for name, text in pages.items()
           if not (DOCS / name).exists() or (DOCS / name).read_text(encoding="utf-8") != text]
  assert not stale, f"docs out of date: {stale}; run python docs/generate.py"
  infer_page = pages["infer.md"]
  for flag in ("--workdir", "--slide", "--query", "--question", "--heatmap_method"):
    assert flag in infer_page
