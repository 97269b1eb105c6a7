"""Caption decomposition: sentence splitting, PathFLIP's subcaption sampling, rewrite backends.

PathFLIP aligns regions with *subcaptions*: a slide's report is split into sentences, and each
epoch K subcaptions of 1-3 sentences are drawn per slide, the first half consecutive sentences
(a run in report order) and the rest random sentences (:func:`sample_subcaption_indices`).

Before that, an optional offline step (``python -m data_prep.decompose_captions``) may have a
language model rewrite each report into region-level findings. Backends share the
:class:`RewriteBackend` interface: ``rule`` (:func:`split_sentences`) and ``openai`` (any
OpenAI-compatible chat-completions server, e.g. a local vLLM or llama.cpp one). The project's own
decoder will be registered in :data:`BACKENDS` too.

Imported by the training input pipeline, so only numpy and the standard library at import time
(``urllib`` is imported when an HTTP backend first sends a request).
"""

from __future__ import annotations

import json
import operator
import random
import re
import time
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from pathflip_jax import storage

# Words that end with a period without ending a sentence (compared lower-case, without the
# final period). Units ("mm.", "cm.") are left out: they often do end a sentence.
ABBREVIATIONS = frozenset({
    "e.g", "i.e", "approx", "appr", "dr", "drs", "prof", "mr", "mrs", "ms", "vs", "cf", "fig",
    "figs", "al", "ca", "resp", "incl", "esp", "viz", "st"})
# Abbreviations only when a number follows ("No. 3", "Nr. 12"); "No." before a capital is an
# answer ending its sentence ("Margins involved: No. Lymph nodes: ...").
NUMBER_ABBREVIATIONS = frozenset({"no", "nos", "nr"})

_BULLET = re.compile(r"^\s*(?:[-*+\u2022\u2023\u25e6\u25aa\u2013\u2014]|\(?\d{1,3}[.)]|\(?[a-z]\))"
                     r"\s+")
# A sentence end: terminal punctuation (an ellipsis counts as one), closing quotes/brackets,
# then whitespace.
_TERMINATOR = re.compile(r"([.!?\u2026]+)[\"')\]\u201d\u2019\u00bb]*(?=\s)")
_OPENERS = "\"'([\u201c\u2018\u00ab"


def _is_boundary(text: str, match: re.Match) -> bool:
  rest = text[match.end():].lstrip()
  if not rest:
    return True
  first = rest.lstrip(_OPENERS)[:1]
  if not (first.isupper() or first.isdigit()):
    return False
  if match.group(1) != ".":
    return True
  word = re.search(r"(\S*)$", text[:match.start()]).group(1).lstrip(_OPENERS).lower()
  if word in ABBREVIATIONS:
    return False
  return not (word in NUMBER_ABBREVIATIONS and first.isdigit())


def _split_line(text: str) -> list[str]:
  pieces, start = [], 0
  for match in _TERMINATOR.finditer(text):
    if _is_boundary(text, match):
      pieces.append(text[start:match.end()])
      start = match.end()
  pieces.append(text[start:])
  return pieces


def split_sentences(text: str) -> list[str]:
  """The sentences of a pathology report, in order, each with its terminal punctuation.

  Splits at ``. ! ?`` (or an ellipsis) followed by whitespace and a capital letter or digit (or
  the end), at line breaks, and at bullet or numbered lines (``- ``, ``* ``, ``1. ``, ``1) ``;
  the marker is removed). Decimals ("1.5 mm") and abbreviations ("e.g.", "approx.", "Dr.",
  "No. 3", "et al.", ...) do not end a sentence. A line that does not end with punctuation and is
  followed by a line starting lower-case is taken as hard-wrapped and joined with it. Whitespace
  is collapsed; pieces without a letter or digit are dropped.
  """
  lines: list[str] = []
  wrapped = False  # the last line ended mid-sentence (no punctuation)
  for raw in str(text).splitlines():
    bullet = _BULLET.match(raw)
    line = raw[bullet.end():] if bullet else raw
    line = " ".join(line.split())
    if not line:
      wrapped = False
      continue
    if wrapped and not bullet and line[0].islower():
      lines[-1] += " " + line
    else:
      lines.append(line)
    wrapped = lines[-1][-1] not in ".!?:;\u2026"
  sentences = []
  for line in lines:
    for piece in _split_line(line):
      piece = piece.strip()
      if any(c.isalnum() for c in piece):
        sentences.append(piece)
  return sentences


def sample_subcaption_indices(num_sentences: int, k: int, rng: np.random.Generator,
                              max_sentences: int = 3) -> list[tuple[int, ...]]:
  """PathFLIP's rule: ``k`` tuples of sentence indices, each in report order.

  The first ``ceil(k / 2)`` are consecutive runs (a length L in 1..min(max_sentences, n), then a
  start), the rest L distinct random sentences (sorted). Deterministic for a given ``rng`` state.
  """
  n = operator.index(num_sentences)
  if n < 1:
    raise ValueError(f"num_sentences must be >= 1 to sample subcaptions, got {n}")
  if k < 0 or max_sentences < 1:
    raise ValueError(f"need k >= 0 and max_sentences >= 1, got k={k}, "
                     f"max_sentences={max_sentences}")
  top = min(max_sentences, n)
  num_consecutive = (k + 1) // 2
  out: list[tuple[int, ...]] = []
  for i in range(k):
    length = int(rng.integers(1, top + 1))
    if i < num_consecutive:
      start = int(rng.integers(0, n - length + 1))
      out.append(tuple(range(start, start + length)))
    else:
      picked = np.sort(rng.choice(n, size=length, replace=False))
      out.append(tuple(int(j) for j in picked))
  return out


def sample_subcaptions(sentences: Sequence[str], k: int, rng: np.random.Generator,
                       max_sentences: int = 3) -> list[str]:
  """``k`` subcaptions of a slide (:func:`sample_subcaption_indices`), sentences joined by a
  space."""
  if not sentences:
    raise ValueError("cannot sample subcaptions from a caption without sentences")
  return [" ".join(sentences[j].strip() for j in group)
          for group in sample_subcaption_indices(len(sentences), k, rng, max_sentences)]


def read_sentences(path: str) -> dict[str, list[str]]:
  """slide_id -> sentences of a ``decompose_captions`` output (sentences as strings) or of a
  demo cohort's ``captions.jsonl`` (sentences as ``{"text": ...}``)."""
  out: dict[str, list[str]] = {}
  for line_number, line in enumerate(storage.read_text(path).splitlines(), start=1):
    if not line.strip():
      continue
    where = f"{path}:{line_number}"
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict) or row.get("slide_id") in (None, ""):
      raise ValueError(f"{where}: expected a JSON object with a 'slide_id'")
    items = row.get("sentences")
    if not isinstance(items, list):
      raise ValueError(f"{where}: expected a 'sentences' list")
    texts = [s.get("text") if isinstance(s, dict) else s for s in items]
    if not all(isinstance(t, str) for t in texts):
      raise ValueError(f"{where}: every sentence must be a string or have a 'text' string")
    slide_id = str(row["slide_id"])
    if slide_id in out:
      raise ValueError(f"{where}: slide_id {slide_id!r} appears twice")
    out[slide_id] = [t for t in texts if t.strip()]
  return out


# ---------------------------------------------------------------------------------------------
# Rewrite backends.


class RewriteError(RuntimeError):
  """A report that a backend could not rewrite (the message names the URL, slide, HTTP status
  and the start of the reply when there was one)."""

  def __init__(self, message: str, *, url: str = "", slide_id: str = "",
               status: int | None = None, body: str = ""):
    super().__init__(message)
    self.url, self.slide_id, self.status, self.body = url, slide_id, status, body


@runtime_checkable
class RewriteBackend(Protocol):
  """Rewrites a report into region-level findings (sentence-like strings, in order)."""

  name: str

  def rewrite(self, caption: str, slide_id: str = "") -> list[str]:
    ...


class RuleBackend:
  """The paper's rule: the report's own sentences (:func:`split_sentences`)."""

  name = "rule"
  model = None

  def rewrite(self, caption: str, slide_id: str = "") -> list[str]:
    sentences = split_sentences(caption)
    if not sentences:
      raise RewriteError(f"slide {slide_id!r}: caption has no sentences: {caption[:200]!r}",
                         slide_id=slide_id)
    return sentences


DEFAULT_PROMPT = (
    "You rewrite pathology reports of whole-slide images into region-level findings.\n"
    "Return ONLY a JSON array of strings, nothing else. Each string is one short, "
    "self-contained finding (a complete sentence) about one distinct tissue region or lesion "
    "seen on the slide. Rules:\n"
    "- one finding per distinct region/lesion; do not merge different regions;\n"
    "- keep every location word (left, centre, upper, margin, ...) and every size or "
    "measurement exactly as written;\n"
    "- repeat the subject in each finding instead of using pronouns;\n"
    "- include the report's diagnosis as its own finding, worded as in the report;\n"
    "- do not add findings, diagnoses or speculation that the report does not state.\n"
    'Example: ["Sheets of tumour cells with pleomorphic nuclei are seen in the centre.", '
    '"Fibrous stroma is present on the left side."]')

_FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\n?(.*?)```", re.DOTALL)
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)
_RETRY_STATUS = frozenset({408, 429})


def parse_findings(content: str) -> list[str]:
  """Findings of a model reply: a JSON array of strings (bare, in a ```json fence, or an object
  with one array field), else one finding per non-empty line with bullets and numbers removed.

  Raises ValueError for a JSON array with items that are not strings, and returns [] when the
  reply holds no text.
  """
  text = _THINK.sub("", content).strip()
  candidates = [(m.group(1), True) for m in _FENCE.finditer(text)] + [(text, True)]
  if "[" in text and "]" in text:
    # An array with a sentence of prose around it ("Here are the findings: [...]"); not strict,
    # as brackets inside plain-text findings ("sites [1, 2]") are no reply format.
    candidates.append((text[text.index("["):text.rindex("]") + 1], False))
  for candidate, strict in candidates:
    try:
      value = json.loads(candidate)
    except ValueError:
      continue
    if isinstance(value, dict):
      lists = [v for v in value.values() if isinstance(v, list)]
      if len(lists) != 1:
        continue
      value = lists[0]
    if not isinstance(value, list):
      continue
    findings = []
    for i, item in enumerate(value):
      if isinstance(item, dict):
        item = item.get("finding", item.get("text"))
      if not isinstance(item, str):
        if not strict:
          break
        raise ValueError(f"reply is a JSON array, but item {i} is not a string: {item!r}")
      if item.strip():
        findings.append(" ".join(item.split()))
    else:
      return findings
  findings = []
  for raw in text.splitlines():
    if raw.strip().startswith("```"):
      continue
    bullet = _BULLET.match(raw)
    line = " ".join((raw[bullet.end():] if bullet else raw).split())
    if any(c.isalnum() for c in line):
      findings.append(line)
  if len(findings) > 1 and findings[0].endswith(":"):
    findings = findings[1:]  # a heading such as "Findings:"
  return findings


class OpenAIChatBackend:
  """Rewrites reports with an OpenAI-compatible chat-completions server (vLLM, llama.cpp,
  ...), over ``urllib`` only.

  Connection errors, timeouts, HTTP 408/429 and 5xx are retried ``max_retries`` times with
  exponential backoff (``backoff`` seconds, doubling; a ``Retry-After`` header is honoured up to
  a minute); other HTTP errors fail at once. Safe to share between threads.
  """

  name = "openai"

  def __init__(self, base_url: str, model: str, api_key: str | None = None,
               timeout: float = 60.0, max_retries: int = 3, temperature: float = 0.0,
               system_prompt: str = DEFAULT_PROMPT, *, backoff: float = 0.2):
    if not base_url or not model:
      raise ValueError("OpenAIChatBackend needs a base_url (e.g. http://127.0.0.1:8000/v1) "
                       "and a model name")
    if max_retries < 0 or timeout <= 0:
      raise ValueError(f"need max_retries >= 0 and timeout > 0, got {max_retries}, {timeout}")
    self.base_url = base_url.rstrip("/")
    self.url = f"{self.base_url}/chat/completions"
    self.model = model
    self.timeout = timeout
    self.max_retries = max_retries
    self.temperature = temperature
    self.system_prompt = system_prompt
    self.backoff = backoff
    self._api_key = api_key or None

  def __repr__(self) -> str:
    # Leaves the API key out: reprs end up in logs.
    return (f"OpenAIChatBackend(url={self.url!r}, model={self.model!r}, "
            f"api_key={'set' if self._api_key else None})")

  def _error(self, what: str, slide_id: str, status: int | None = None,
             body: str = "") -> RewriteError:
    status_text = f"HTTP {status}" if status is not None else "no HTTP status"
    return RewriteError(f"{self.url}: slide {slide_id!r}: {status_text}: {what}; "
                        f"body: {body[:200]!r}", url=self.url, slide_id=slide_id,
                        status=status, body=body)

  def _post(self, payload: bytes, slide_id: str) -> tuple[int, str]:
    """(status, body) of a successful request, retrying transient failures."""
    import http.client
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json", "Accept": "application/json",
               "User-Agent": "pathflip_jax-decompose-captions"}
    if self._api_key:
      headers["Authorization"] = f"Bearer {self._api_key}"
    attempt = 0
    while True:
      request = urllib.request.Request(self.url, data=payload, headers=headers, method="POST")
      retry_after = None
      try:
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
          return response.status, response.read().decode("utf-8", errors="replace")
      except urllib.error.HTTPError as e:
        try:
          body = e.read().decode("utf-8", errors="replace")
        except (OSError, http.client.HTTPException):
          body = ""
        error = self._error(f"request failed ({e.reason})", slide_id, e.code, body)
        if not (e.code in _RETRY_STATUS or e.code >= 500):
          raise error from None
        try:
          retry_after = float((e.headers or {}).get("Retry-After", ""))
        except (TypeError, ValueError):
          pass
        if retry_after is not None:
          retry_after = min(retry_after, 60.0) if retry_after >= 0 else None
      except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        # URLError (refused, unknown host), socket timeouts, resets, truncated replies.
        reason = getattr(e, "reason", None) or e
        error = self._error(f"request failed ({type(reason).__name__}: {reason})", slide_id)
      if attempt >= self.max_retries:
        raise RewriteError(f"{error} (after {attempt + 1} attempts)", url=error.url,
                           slide_id=slide_id, status=error.status, body=error.body) from None
      delay = self.backoff * 2 ** attempt * random.uniform(1.0, 1.25)
      time.sleep(retry_after if retry_after is not None else delay)
      attempt += 1

  def rewrite(self, caption: str, slide_id: str = "") -> list[str]:
    """Region-level findings of one report; raises RewriteError (also for no findings)."""
    payload = json.dumps({
        "model": self.model,
        "messages": [{"role": "system", "content": self.system_prompt},
                     {"role": "user", "content": caption}],
        "temperature": self.temperature,
    }).encode("utf-8")
    status, body = self._post(payload, slide_id)
    try:
      content = json.loads(body)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
      raise self._error("reply is not a chat completion (choices[0].message.content)",
                        slide_id, status, body) from None
    if not isinstance(content, str):
      raise self._error("reply has no text content", slide_id, status, body)
    try:
      findings = parse_findings(content)
    except ValueError as e:
      raise self._error(str(e), slide_id, status, body) from None
    if not findings:
      raise self._error("reply has no findings", slide_id, status, body)
    return findings


BACKENDS: dict[str, Callable[..., RewriteBackend]] = {
    "rule": RuleBackend,
    "openai": OpenAIChatBackend,
}


def make_backend(name: str, **kwargs: Any) -> RewriteBackend:
  """The backend registered as ``name`` in :data:`BACKENDS`, built with ``kwargs``."""
  if name not in BACKENDS:
    raise ValueError(f"unknown rewrite backend {name!r}; known: {', '.join(sorted(BACKENDS))}")
  return BACKENDS[name](**kwargs)
