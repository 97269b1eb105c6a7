"""Multiple-choice questions as SlideChat's VQA files hold them (slide, question, letter columns,
answer) -> rows of the project's questions CSV; shared by SlideBench-VQA (TCGA) and (BCNB)."""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

from data_prep.public_benchmarks.slide_files import SlideFiles
from data_prep.public_benchmarks.tables import (BenchmarkError, Report, _check_split, _column,
                                                _problem, _RowProblem, read_table)
from pathflip_jax.data import instructions

# "(C)" or "C." / "C)" / "C:" (punctuation required, so that "A cat" is not the letter A).
_LETTER = r"(?:\(([A-Za-z])\)|([A-Za-z])[.):])"
_LETTER_ONLY = re.compile(rf"^(?:{_LETTER}|([A-Za-z]))$")
_LETTER_TEXT = re.compile(rf"^{_LETTER}\s*(.+)$", re.DOTALL)
_OPTION_PREFIX = re.compile(rf"^{_LETTER}\s+(.+)$", re.DOTALL)


def _norm(text: str) -> str:
  return re.sub(r"\s+", " ", text).strip().rstrip(".").strip().casefold()


def _strip_prefix(letter: str, text: str) -> str:
  """``text`` without an "A. " / "A) " / "(A) " / "A: " prefix naming its own letter."""
  m = _OPTION_PREFIX.match(text)
  if m and (m.group(1) or m.group(2)).upper() == letter:
    return m.group(3).strip()
  return text


def answer_letter(answer: str, options: dict[str, str], column: str = "Answer") -> str:
  """The letter of ``answer`` among ``options`` ({letter: text}); _RowProblem when none."""
  answer = answer.strip()
  if not answer or answer.lower() == "nan":
    raise _RowProblem(column, "empty answer")
  m = _LETTER_ONLY.match(answer)
  if m:
    letter = next(g for g in m.groups() if g).upper()
    if letter in options:
      return letter
    raise _RowProblem(column, f"answer {answer!r} names option {letter}, which this row does not "
                              f"have (options {sorted(options)})")
  matches = [k for k, v in options.items() if _norm(v) == _norm(answer)]
  if len(matches) == 1:
    return matches[0]
  if len(matches) > 1:
    raise _RowProblem(column, f"answer {answer!r} is the text of options {matches}")
  m = _LETTER_TEXT.match(answer)
  if m:
    letter = (m.group(1) or m.group(2)).upper()
    if letter in options and _norm(m.group(3)) == _norm(options[letter]):
      return letter
  raise _RowProblem(column, f"answer {answer!r} is not one of the options {options}")


def _option_columns(columns: Sequence[str], path: str) -> list[tuple[str, str]]:
  """(letter, column) of the single-letter option columns, A first."""
  letters = sorted((c.strip().upper(), c) for c in columns
                   if len(c.strip()) == 1 and c.strip().isalpha())
  found = [letter for letter, _ in letters]
  for needed in "AB":
    if needed not in found:
      raise BenchmarkError(f"{path}:1: missing required option column {needed!r}; the header "
                           f"has {list(columns)}")
  return letters


def _vqa(path: str, *, split: str, slides: SlideFiles, report: Report, skip_invalid: bool,
         slide_cols: Sequence[str], clean_id: Callable[[str], str],
         category_of: Callable[[list[str], str], Callable[[dict], str]],
         default_ext: str) -> list[dict[str, Any]]:
  """Questions-CSV rows of a SlideChat-style multiple-choice file."""
  _check_split(split)
  columns, rows = read_table(path)
  slide_col = _column(columns, slide_cols, path, "slide")
  question_col = _column(columns, ("Question",), path, "question")
  answer_col = _column(columns, ("Answer",), path, "answer")
  option_cols = _option_columns(columns, path)
  category = category_of(columns, path)
  out = []
  for where, row in report.filled(rows, [(slide_col, "empty_slide"),
                                         (question_col, "empty_question")]):
    question = row[question_col]
    try:
      options: dict[str, str] = {}
      empty = None
      for letter, column in option_cols:
        text = row.get(column, "")
        if not text or text.lower() == "nan":
          empty = empty or column
          continue
        if empty:
          raise _RowProblem(column, f"option {letter} is given but option {empty} before it is "
                                    "empty")
        options[letter] = _strip_prefix(letter, text)
      n = len(options)
      if n != len(instructions.LETTERS):
        reason = ("too_many_options" if n > 4 else "too_few_options" if n < 2
                  else "not_4_options")
        report.skip(where, reason, f"{n} option{'s' if n != 1 else ''} (the multiple-choice "
                                   "format holds exactly 4)")
        continue
      letter = answer_letter(row.get(answer_col, ""), options, answer_col)
      resolved = slides.resolve(clean_id(row[slide_col]), default_ext) if (
          slides.id_from_file) else None
    except _RowProblem as e:
      if e.column is None:  # several files could be the slide
        report.skip(where, "ambiguous_file", e.message)
      else:
        _problem(where, e, report, skip_invalid)
      continue
    slide_id = resolved.slide_id if resolved else clean_id(row[slide_col])
    texts = [options[k] for k in instructions.LETTERS]
    out.append({"slide_id": slide_id, "split": split, "category": category(row),
                "question": question, **dict(zip(instructions.LETTERS, texts)),
                "answer": letter, "answer_text": options[letter],
                "type": instructions.MULTIPLE_CHOICE})
  return out
