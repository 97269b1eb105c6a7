"""Captioning and visual-question-answering metrics, computed the way published numbers are.

Captions are scored as the COCO caption evaluation (``pycocoevalcap``) scores them: each text is
tokenized by the Penn Treebank tokenizer of Stanford CoreNLP 3.4.1 (lower case; its punctuation
tokens dropped, :func:`coco_tokenize`, a Python port checked against the Java tokenizer in the
tests), then corpus BLEU-1..4 (Papineni et al. 2002; no smoothing, the reference length closest
to the hypothesis), ROUGE-L (Lin 2004, beta = 1.2, precision and recall each maximised over a
segment's references) and CIDEr-D (Vedantam et al. 2015: n-grams weighted by tf-idf with
document frequencies from the evaluated references, clipped, with a gaussian length penalty,
times 10). The tests compare every number with pycocoevalcap's and BLEU also with sacrebleu.

METEOR 1.5 (Denkowski & Lavie 2014) needs stemming, WordNet synonyms and a paraphrase table,
which only its Java implementation has: :class:`Meteor` runs the jar that ships inside the
pycocoevalcap wheel (with its paraphrase table; nothing is downloaded) for the per-segment
statistics, and the corpus score is computed here from their sums exactly as the jar computes
it. It is optional, as pycocoevalcap is a test requirement only.

:class:`CaptionCorpus` holds the tokenized references and gives each metric as a function of
segment indices with repeats, recomputed on them as a corpus (document frequencies and all), for
bootstrap intervals over slides (``stats.add_intervals``).

VQA: multiple-choice accuracy by option letter and by option text, per category, beside the
accuracy of always answering one letter (the bar a model must clearly beat: benchmarks often
have skewed answer letters); open-ended exact match and token F1 with SQuAD's normalisation.
"""

from __future__ import annotations

import collections
import functools
import importlib.util
import math
import os
import re
import shutil
import string
import subprocess
import threading
import unicodedata
from typing import Callable, Mapping, Sequence

import numpy as np
from scipy import sparse

# ------------------------------------------------------------------------------ PTB tokenizer
#
# A port of the lexer of edu.stanford.nlp.process.PTBTokenizer as the COCO caption evaluation
# runs it (CoreNLP 3.4.1, ``-preserveLines -lowerCase``, default options), for English text:
# the same rules with JFlex's semantics (longest match, trailing context counted in the length,
# ties to the earlier rule; literals caseless, character classes not). Left out: the combining
# marks of non-Latin scripts that the lexer counts as letters inside words. When written it gave
# the Java tokenizer's output on 7,000 test strings (captions, questions, fuzzed punctuation).

_LETTER_EXTRA = "\u00ad\u0237-\u024f\u02c2-\u02c5\u02d2-\u02df\u02e5-\u02ff\u0300-\u036f"


def _class_of(categories: tuple[str, ...]) -> str:
  """The body of a character class of the BMP characters in Unicode ``categories``."""
  ranges, start = [], None
  for code in range(0x10001):
    inside = code < 0x10000 and unicodedata.category(chr(code)) in categories
    if inside and start is None:
      start = code
    if not inside and start is not None:
      ranges.append((start, code - 1))
      start = None
  return "".join(f"\\u{a:04x}" if a == b else f"\\u{a:04x}-\\u{b:04x}" for a, b in ranges)


_PAREN = {"(": "-LRB-", ")": "-RRB-", "{": "-LCB-", "}": "-RCB-", "[": "-LSB-", "]": "-RSB-"}


def _quotes(token: str, probably_left: bool) -> str:
  """PTBLexer's latexQuotes: ASCII quotes by the side they are on, curly ones by their shape."""
  single, double = ("`", "``") if probably_left else ("'", "''")
  token = re.sub(r"&apos;|'", single, token)
  token = re.sub(r'"|&quot;', double, token)
  for pattern, value in (("[\u0091\u2018\u201b\u2039]", "`"), ("[\u0092\u2019\u203a]", "'"),
                         ("[\u0093\u201c\u00ab]", "``"), ("[\u0094\u201d\u00bb]", "''")):
    token = re.sub(pattern, value, token)
  return token


def _currency(token: str) -> str:
  return re.sub("[\u0080\u00a4\u20a0\u20ac]", "$",
                token.replace("\u00a2", "cents").replace("\u00a3", "#"))


def _fraction(token: str) -> str:
  for char, value in (("\u00bc", "1/4"), ("\u00bd", "1/2"), ("\u00be", "3/4"),
                      ("\u2153", "1/3"), ("\u2154", "2/3")):
    token = token.replace(char, value)
  return token


def _no_soft_hyphens(token: str) -> str:
  return token.replace("\u00ad", "") or "-"


@functools.cache
def _ptb_rules() -> list[tuple[re.Pattern, Callable[[str], tuple[list[str], int]]]]:
  """(pattern whose group 1 is the token and the rest its trailing context, action), in the
  lexer's rule order. An action maps the token to (tokens emitted, characters consumed)."""
  # JFlex's [:letter:] is Java's Character.isLetter (Unicode L*); Python's \\w would also take
  # other digits (superscripts), so the classes are spelled out.
  letters = _class_of(("Lu", "Ll", "Lt", "Lm", "Lo"))
  letter = f"[{letters}]"                                 # [:letter:]
  LETTER = f"[{letters}{_LETTER_EXTRA}]"                  # the lexer's LETTER
  upper = f"[{_class_of(('Lu',))}]"
  space = "[ \\t\u00a0\u2000-\u200a\u3000]"
  newline = "(?:\\r\\n|[\\r\\n\u2028\u2029\\x0b\\x0c\\x85])"
  spacenl = f"(?:{space}|{newline})"
  sgml_name = "[A-Za-z][A-Za-z0-9_:.-]*"
  sgml = (f"<(?:[!?][A-Za-z-][^>\\r\\n]*|{sgml_name}(?:[ ]+(?:{sgml_name}[ ]*=[ ]*"
          f"(?:'[^']*'|\"[^\"]*\")|{sgml_name}))*[ ]*/?|/{sgml_name})[ ]*>")
  sentend = f"{spacenl}(?:{spacenl}|{upper}|{sgml})"
  num = "\\d*(?:[.:,\u00ad\u066b\u066c]\\d+)+|\\d+"
  apos = "(?:['\u0092\u2019]|&apos;)"
  aposetc = f"(?:{apos}|[`\u0091\u2018\u201b])"
  alnum = f"(?:{letter}|\\d)"
  word = f"{LETTER}(?:{LETTER}|\\d)*(?:[.!?]{LETTER}(?:{LETTER}|\\d)*)*"
  acro = ("(?:(?i:canada|korean|japan|sino|non|eu)-(?i:u)\\.(?i:s)|(?i:u\\.s\\.-)"
          "(?:(?i:u\\.s\\.s\\.r)|(?i:u\\.k))|[A-Za-z](?:\\.[A-Za-z])*)")
  acro2 = acro.replace("(?:\\.[A-Za-z])*", "(?:\\.[A-Za-z])+")
  abmonth = "(?i:sept|jan|feb|mar|apr|jun|jul|aug|sep|oct|nov|dec)"
  abdays = "(?i:tues|thurs|mon|tue|wed|thu|fri)"
  abstate = ("(?:(?i:ariz|calif|colo|conn|kans|mich|minn|mont|okla|penn|tenn|wisc|ala|dak|fla"
             "|ind|kan|neb|nev|wis|wyo|ct|ga|ky|md|mo|va|vt)|A(?i:rk|z)|D(?i:el)|I(?i:ll)"
             "|L(?i:a)|M(?i:ass|iss)|O(?i:re)|P(?i:a)|T(?i:ex)|W(?i:ash))")
  abcomp = "(?:(?i:bancorp|assn|corp|intl|univ|bhd|cos|inc|ltd|plc|sys|co|rt)|(?i:pp?t)[ye](?i:s)?)"
  abnum = "(?i:tel|est|ext|sq)"
  abptit = "(?i:blvd|bros|esq|jr|sr|rd|(?:ed|ph)\\.d)"
  abbrev1 = f"(?:{abmonth}|{abdays}|{abstate}|{abcomp}|{abnum}|{abptit}|(?i:bldg|etc|seq|al))\\."
  abtitle = ("(?:(?i:messrs|lieut|assoc|attys|capt|brig|comdr|govs|insp|mlle|msgr|pres|profs"
             "|reps|sens|supts|adj|adm|adv|asst|atty|ave|col|cpl|det|drs|ens|gen|gov|hon|maj"
             "|mdr|mme|mrs|pfc|prof|pvt|rep|rev|sen|sfc|sgt|spc|ste|supt|dr|ft|lt|mr|ms|mt|st)"
             "|M(?i:iss))")
  abcomp2 = "(?:(?i:invt|elec|natl|dept)|(?i:m)[ft](?i:g))"
  abbrev4 = f"(?:{abtitle}|(?i:a\\.k\\.a|treas|alex|cie|jos|vs|wm|cf|ph)|{acro}|{abcomp2})"
  sentence_words = "|".join(
      w[0] + (f"(?i:{w[1:]})" if len(w) > 1 else "") for w in sorted(
          ["About", "According", "Additionally", "After", "An", "A", "As", "At", "But",
           "Earlier", "He", "Her", "Here", "However", "If", "In", "It", "Last", "Many", "More",
           "Mr.", "Ms.", "Now", "Once", "One", "Other", "Our", "She", "Since", "So", "Some",
           "Such", "That", "The", "Their", "Then", "There", "These", "They", "This", "We",
           "When", "While", "What", "Yet", "You"], key=len, reverse=True))
  sentence_words = sentence_words.replace(".", "\\.")
  hyphen = "[-_\u058a\u2010\u2011]"
  thing_part = f"(?:[dDoOlL]{aposetc}{alnum})?{alnum}+"
  thing = f"{thing_part}(?:{hyphen}{thing_part})*"
  hthing = f"[A-Za-z0-9][A-Za-z0-9.,\u00ad]*(?:-(?:{acro2}\\.|[A-Za-z0-9\u00ad]+))+"
  thinga = "[A-Z]+(?:(?:[+&]|(?i:&amp;))[A-Z]+)+"
  thing3 = "[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}"
  redaux = f"{apos}(?:[msdMSD]|(?i:re|ve|ll))"
  sword = "[A-Za-z\u00ad]*[A-MO-Za-mo-z]\u00ad*"
  sredaux = f"[nN]{aposetc}[tT]"
  apoword = (f"(?:{apos}[nN]{apos}?|[lLdDjJ]{apos}|(?i:dunkin|somethin|ol){apos}|{apos}(?i:em)"
             f"|[A-HJ-XZn]{aposetc}{letter}{{2}}{letter}*|{apos}[2-9]0(?i:s)|{apos}(?i:till?)"
             f"|{letter}{letter}*[aeiouyAEIOUY]{aposetc}[aeiouA-Z]{letter}*|{apos}(?i:cause)"
             "|(?i:cont'd\\.?|'twas|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l)"
             f"|(?i:o){aposetc}(?i:o))")
  url_end = "[^ \\t\\n\\f\\r\"<>|.!?(){},-]"
  full_url = f"(?i:https?)://[^ \\t\\n\\f\\r\"<>|(){{}}]+{url_end}"
  likely_url = ("(?:(?:(?i:www)\\.(?:[^ \\t\\n\\f\\r\"<>|.!?(){},]+\\.)+[a-zA-Z]{2,4})"
                "|(?:(?:[^ \\t\\n\\f\\r\"`'<>|.!?(){},-_$]+\\.)+(?i:com|net|org|edu)))"
                f"(?:/[^ \\t\\n\\f\\r\"<>|()]+{url_end})?")
  email = ("(?:(?i:&lt;)|<)?[a-zA-Z0-9][^ \\t\\n\\f\\r\"<>|()\u00a0{}]*@"
           "(?:[^ \\t\\n\\f\\r\"<>|(){}.\u00a0]+\\.)*[^ \\t\\n\\f\\r\"<>|(){}.\u00a0]+"
           "(?:(?i:&gt;)|>)?")
  filename = (f"(?:{LETTER}|\\d)+(?:\\.(?:{LETTER}|\\d)+)*\\.(?i:docx|html|java|jpeg|class|bat"
              "|bmp|cgi|cpp|dll|doc|exe|gif|htm|jar|jpg|mov|mp3|pdf|php|png|ppt|sql|tar|txt"
              "|wav|xml|zip|gz|pl|ps|py|c|h|x)")
  phone = ("(?:(?:\\([0-9]{2,3}\\)[ \u00a0]?|(?:\\+\\+?)?(?:[0-9]{2,4}[- \u00a0])?[0-9]{2,4}"
           "[- \u00a0])[0-9]{3,4}[- \u00a0]?[0-9]{3,5}|(?:(?:\\+\\+?)?[0-9]{2,4}\\.)?[0-9]{2,4}"
           "\\.[0-9]{3,4}\\.[0-9]{3,5})")
  misc = ("[+%&~^|\\\\\u00a6\u00a7\u00a8\u00a9\u00ac\u00ae\u00af\u00b0-\u00ba\u00d7\u00f7"
          "\u2016\u2017\u2020-\u2023\u2030-\u2038\u203b\u203e-\u2042\u2044\u207a-\u207f"
          "\u208a-\u208e\u2100-\u214f\u2190-\u21ff\u2200-\u2bff\u3012\u30fb\uff01-\uff0f"
          "\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65]")
  # Longest alternative first: Python takes the first that matches, JFlex the longest.
  quotes = ("(?:[`\u2018\u2019\u201a\u201b\u201c\u201d\u0091\u0092\u0093\u0094\u201e\u201f"
            f"\u2039\u203a\u00ab\u00bb]{{1,2}}|''|{apos})")
  asian_smiley = ("[\\^x=~<>]\\.\\[\\^x=~<>\\]|[-^x=~<>']_[-^x=~<>']"
                  "|\\([-^x=~<>'][_.]?[-^x=~<>']\\)|\\([\\^x=~<>']-[\\^x=~<>'`]\\)")
  insentp = "[,;:\u3001]"

  def keep(fn=None):
    return lambda t: ([fn(t) if fn else t], len(t))

  def pushback(k):
    return lambda t: ([t[:-k]], len(t) - k)

  def period_next(t):       # the token with its period, and the period again as a token
    return [t], len(t) - 1

  def acronym_before_sentence(t):
    # "I." before "The": the letter, then a period; "U.S.": the token and a period.
    return ([t[:-1]] if len(t) == 2 else [t]), len(t) - 1

  def parens(t):
    return [t.replace("(", "-LRB-").replace(")", "-RRB-")], len(t)

  def skip(t):
    return [], len(t)

  rules = [
      ("(?i:c\\+\\+|[cf]#)", None, keep()),
      # Tags count as one token (spaces inside kept as non-breaking ones).
      (sgml, None, keep(lambda t: t.replace(" ", "\u00a0"))),
      ("(?i:cannot)", None, pushback(3)),
      ("(?i:'twas)", None, pushback(3)),
      ("(?i:'tis)", None, pushback(2)),
      ("(?i:gonna|gotta|lemme|gimme|wanna)", None, pushback(2)),
      ("(?i:&(?:md|mdash|ndash);)|[\u0096\u0097\u2013\u2014\u2015]", None, keep(lambda t: "--")),
      ("(?i:&amp;)", None, keep(lambda t: "&")),
      ("(?i:&(?:ht|tl|ur|lr|qc|ql|qr|odq|cdq|#[0-9]+);)", None, keep()),
      (word, redaux, keep(_no_soft_hyphens)),
      (sword, sredaux, keep(_no_soft_hyphens)),
      (word, None, keep(_no_soft_hyphens)),
      (apoword, None, keep()),
      ("[yY]" + apos, letter, keep()),
      (full_url, None, keep()),
      (likely_url, None, keep()),
      (email, None, keep()),
      (f"@[a-zA-Z_][a-zA-Z_0-9]*|#{LETTER}+", None, keep()),
      (redaux, "[^A-Za-z]", keep(lambda t: _quotes(t, False))),
      (sredaux, "[^A-Za-z]", keep(lambda t: _quotes(t, False))),
      ("\\d{1,2}[-/]\\d{1,2}[-/]\\d{2,4}", None, keep()),
      (f"[-+]?(?:{num})", None, keep(_no_soft_hyphens)),
      ("[\u207a\u207b\u208a\u208b]?(?:[\u2070\u00b9\u00b2\u00b3\u2074-\u2079]+|[\u2080-\u2089]+)",
       None, keep()),
      ("(?:\\d{1,4}[- \u00a0])?\\d{1,4}(?:\\\\?/|\u2044)\\d{1,4}", None,
       keep(lambda t: t.replace(" ", "\u00a0"))),
      ("[\u00bc\u00bd\u00be\u2153-\u215e]", None, keep(_fraction)),
      ("-(?i:rrb|lrb|rcb|lcb|rsb|lsb)-|(?i:c\\.d\\.s|pro-|anti-|s(?:&|&amp;)p-500|s(?:&|&amp;)ls"
       f"|cap{apos}n|c{apos}est)", None, keep(lambda t: re.sub("(?i:&amp;)", "&", t))),
      (thing3, None, keep()),
      ("[A-Z]*\\$|#", None, keep()),
      ("[\u00a2\u00a3\u00a4\u00a5\u0080\u20a0\u20ac\u060b\u0e3f\u20a4\uffe0\uffe1\uffe5\uffe6]",
       None, keep(_currency)),
      (f"{acro}\\.", f"{spacenl}+(?:{sentence_words}|{sgml}){spacenl}", acronym_before_sentence),
      ("(?i:ca|figs?|prop|nos?|art|bldg|pp|op)\\.", f"{spacenl}?\\d", keep()),
      ("(?i:pt[ey]|co)\\.", f"{space}(?i:ltd|lim)", keep()),
      (abbrev1, sentend, period_next),
      (abbrev1, "[\\s\\S]{2}", keep()),
      (abbrev1, None, period_next),
      (f"{abbrev4}\\.", None, keep()),
      (abbrev4, space, keep()),
      (acro, spacenl, keep()),
      (f"{apos}[0-9][0-9]", spacenl, keep()),
      (filename, f"{spacenl}|[.?!,]", keep()),
      (f"{word}\\.", insentp, keep(_no_soft_hyphens)),
      (phone, None, keep(lambda t: t.replace(" ", "\u00a0").replace("(", "-LRB-")
                         .replace(")", "-RRB-"))),
      ('(?:"|(?i:&quot;))', "[A-Za-z0-9$]", keep(lambda t: _quotes(t, True))),
      ('(?:"|(?i:&quot;))', None, keep(lambda t: _quotes(t, False))),
      ("\\x7f", None, skip),
      ("<|(?i:&lt;)", None, keep(lambda t: "<")),
      (">|(?i:&gt;)", None, keep(lambda t: ">")),
      ("[<>]?[:;=][-o*']?[()DPdpO\\\\{@|\\[\\]]", "[^A-Za-z0-9]", parens),
      (asian_smiley, None, parens),
      ("[{}\\[\\]()]", None, keep(lambda t: _PAREN[t])),
      ("-+", None, keep(lambda t: "--" if 3 <= len(t) <= 4 else t)),
      ("\\.{3,5}|(?:\\.[ \u00a0]){2,4}\\.|[\u0085\u2026]", None, keep(lambda t: "...")),
      ("@+|#+|_+", None, keep()),
      ("\\*+|(?:\\\\\\*){1,3}", None, keep()),
      (insentp, None, keep()),
      ("[?!]+", None, keep()),
      ("[.\u00a1\u00bf\u037e\u0589\u061f\u06d4\u0700-\u0702\u07fa\u3002]", None, keep()),
      ("=", None, keep()),
      ("/", None, keep()),
      (f"{hthing}\\.", insentp, keep(_no_soft_hyphens)),
      (hthing, None, keep(_no_soft_hyphens)),
      (f"{thing}\\.", insentp, keep()),
      (thing, None, keep()),
      (f"{thinga}\\.", insentp, keep(lambda t: re.sub("(?i:&amp;)", "&", t))),
      (thinga, None, keep(lambda t: re.sub("(?i:&amp;)", "&", t))),
      ("'", "[A-Za-z][^ \\t\\n\\r\u00a0]", keep(lambda t: _quotes(t, True))),
      (redaux, None, keep(lambda t: _quotes(t, False))),
      (sredaux, None, keep(lambda t: _quotes(t, False))),
      (quotes, None, keep(lambda t: _quotes(t, False))),
      ("<<|>>", None, keep()),
      (misc, None, keep()),
      (f"\\x00|{space}+|[\u200b\u200e\u200f\ufeff]|(?i:&nbsp;)", None, skip),
      (newline, None, lambda t: (["\n"], len(t))),
  ]
  return [(re.compile(f"({main})(?:{trail})" if trail else f"({main})"), action)
          for main, trail, action in rules]


# Where no rule can match longer than these (a shortcut for most of a text, about 5x faster):
# blanks, and a run of ASCII letters before a blank, unless it is one of the words the lexer
# splits ("cannot" -> "can not").
_BLANKS = re.compile("[ \t]+")
_PLAIN_WORD = re.compile("[A-Za-z]+(?= )")
_SPLIT_WORDS = frozenset(["cannot", "gonna", "gotta", "lemme", "gimme", "wanna"])


def _ptb_lex(text: str) -> list[str]:
  """PTBTokenizer's tokens of ``text`` (newlines as "\\n" tokens), before lower-casing."""
  rules = _ptb_rules()
  tokens: list[str] = []
  pos = 0
  while pos < len(text):
    match = _BLANKS.match(text, pos)
    if match:
      pos = match.end()
      continue
    match = _PLAIN_WORD.match(text, pos)
    if match and match.group().lower() not in _SPLIT_WORDS:
      tokens.append(match.group())
      pos = match.end()
      continue
    best, best_end = None, pos
    for pattern, action in rules:
      match = pattern.match(text, pos)
      if match is not None and match.end() > best_end:
        best, best_end = (match, action), match.end()
    if best is None:
      pos += 1        # untokenizable (an emoji): deleted, as the lexer's default does
      continue
    match, action = best
    emitted, consumed = action(match.group(1))
    tokens.extend(emitted)
    pos += consumed
  return tokens


# The tokens COCO's wrapper drops after tokenizing (its list is upper case, so the lower-cased
# brackets "-lrb-" and "-rrb-" stay, as they do in every published COCO-style number).
PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!",
                         ",", ":", "-", "--", "...", ";"])
_NEWLINES = re.compile("\r\n|[\r\n\u2028\u2029\x0b\x0c\x85]")


def coco_tokenize(texts: Sequence[str]) -> list[list[str]]:
  """The tokens of each text as pycocoevalcap's PTBTokenizer gives them.

  The texts are tokenized as one stream, one text per line (as COCO's wrapper does, so a rule
  that looks past the end of a line sees the next text), lower-cased, and the punctuation tokens
  of :data:`PUNCTUATION` are dropped: "Carcinoma (grade 2)." gives ``["carcinoma", "-lrb-",
  "grade", "2", "-rrb-"]``; decimals ("0.4"), hyphenated words ("ki-67") and "and/or" stay whole.
  """
  if isinstance(texts, str):
    raise TypeError("coco_tokenize takes a sequence of texts, not one str")
  lines: list[list[str]] = [[]]
  for token in _ptb_lex("\n".join(_NEWLINES.sub(" ", str(t)) for t in texts)):
    if token == "\n":
      lines.append([])
    else:
      lines[-1].append(token.lower())
  out = []
  for line in lines[:len(texts)]:
    if line:      # the wrapper strips each line's end (a URL can end in a non-breaking space)
      line[-1] = line[-1].rstrip()
    out.append([t for t in line if t and t not in PUNCTUATION])
  return out


def tokenize(text: str) -> list[str]:
  """The COCO tokens of one text (:func:`coco_tokenize`)."""
  return coco_tokenize([text])[0]


# ------------------------------------------------------------------------------ caption metrics

CAPTION_METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider_d")
_CIDER_ORDER, _CIDER_SIGMA = 4, 6.0

Metric = Callable[[np.ndarray], dict[str, float]]   # segment indices (with repeats) -> metrics


def _check_pair(name_a: str, a: Sequence, name_b: str, b: Sequence) -> None:
  if len(a) == 0:
    raise ValueError(f"{name_a} is empty")
  if len(a) != len(b):
    raise ValueError(f"{name_a} and {name_b} differ in length: {len(a)} vs {len(b)}")


def _check_references(references: Sequence[Sequence[str]]) -> None:
  for i, refs in enumerate(references):
    # A bare string would be iterated as one reference per character.
    if isinstance(refs, str) or len(refs) == 0:
      raise ValueError(f"references[{i}] must be a non-empty list of strings, got {refs!r}")


def _ngrams(words: Sequence[str], n: int) -> collections.Counter:
  return collections.Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def _words(tokens: Sequence[str]) -> list[str]:
  # pycocoevalcap's BLEU and CIDEr split the tokenized line on any white space (a fraction
  # "1 1/2" is one token with a non-breaking space), its ROUGE-L on " " only.
  return " ".join(tokens).split()


def _bleu_stats(hyp: Sequence[str], refs: Sequence[Sequence[str]], max_order: int) -> np.ndarray:
  """One segment's clipped matches and n-gram counts per order, its length and the length of
  the reference closest to it (ties to the shorter): [2 * max_order + 2]."""
  hyp, refs = _words(hyp), [_words(r) for r in refs]
  out = np.zeros(2 * max_order + 2)
  for n in range(1, max_order + 1):
    counts = _ngrams(hyp, n)
    most = collections.Counter()
    for r in refs:
      most |= _ngrams(r, n)
    out[n - 1] = sum(min(c, most[g]) for g, c in counts.items())
    out[max_order + n - 1] = max(len(hyp) - n + 1, 0)
  out[-2] = len(hyp)
  out[-1] = min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
  return out


def _bleu(sums: np.ndarray, max_order: int) -> np.ndarray:
  """Corpus BLEU-1..max_order from summed segment statistics [..., 2 * max_order + 2]: no
  smoothing (an order without a match gives 0 for it and every higher one; pycocoevalcap's
  1e-15 in the numerator makes those about 1e-5 instead)."""
  matches, totals = sums[..., :max_order], sums[..., max_order:2 * max_order]
  hyp_len, ref_len = sums[..., -2], sums[..., -1]
  with np.errstate(divide="ignore", invalid="ignore"):
    log_precision = np.where(matches > 0, np.log(matches) - np.log(np.maximum(totals, 1)),
                             -np.inf)
    brevity = np.where(hyp_len >= ref_len, 0.0, 1.0 - ref_len / hyp_len)
    mean_log = np.cumsum(log_precision, axis=-1) / np.arange(1, max_order + 1)
    out = np.exp(mean_log + brevity[..., None])
  return np.where(hyp_len[..., None] > 0, np.nan_to_num(out), 0.0)


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
  """Length of the longest common subsequence, bit-parallel (Hyyro 2004): bit j of ``v`` is 0
  where the LCS of the prefix of ``a`` and ``b[:j + 1]`` grows at j."""
  masks: dict[str, int] = {}
  for j, y in enumerate(b):
    masks[y] = masks.get(y, 0) | (1 << j)
  full = (1 << len(b)) - 1
  v = full
  for x in a:
    u = v & masks.get(x, 0)
    v = ((v + u) | (v - u)) & full
  return len(b) - bin(v).count("1")


def _rouge_l_segment(hyp: Sequence[str], refs: Sequence[Sequence[str]], beta: float = 1.2
                     ) -> float:
  """ROUGE-L F of one segment: LCS precision and recall, each the best over the references."""
  hyp = " ".join(hyp).split(" ")
  refs = [" ".join(r).split(" ") for r in refs]
  lcs = [_lcs_length(hyp, r) for r in refs]
  precision = max(l / len(hyp) for l in lcs)
  recall = max(l / len(r) for l, r in zip(lcs, refs))
  if precision == 0 or recall == 0:
    return 0.0
  return (1 + beta**2) * precision * recall / (recall + beta**2 * precision)


class _Cider:
  """CIDEr-D of hypotheses against fixed references, on any resample of the segments.

  A resample changes the document frequencies (segments drawn twice count twice, as in the
  corpus of the drawn segments), so every n-gram weight is recomputed: with ``idf2`` the
  squared idf of each reference n-gram, a cosine's three sums (hypothesis . reference, and the
  two norms) are sparse matrix products with ``idf2``; n-grams of no reference have idf log N.
  """

  def __init__(self, references: Sequence[Sequence[Sequence[str]]]):
    self.n = len(references)
    self.vocab: dict[tuple[str, ...], int] = {}
    self.ref_counts = []            # per reference: per order, {ngram id: count}
    self.ref_segment, self.ref_len = [], []
    incidence = set()
    for i, refs in enumerate(references):
      for ref in refs:
        words = _words(ref)
        per_order = []
        for n in range(1, _CIDER_ORDER + 1):
          counts = {self.vocab.setdefault(g, len(self.vocab)): c
                    for g, c in _ngrams(words, n).items()}
          per_order.append(counts)
          incidence.update((i, g) for g in counts)
        self.ref_counts.append(per_order)
        self.ref_segment.append(i)
        # pycocoevalcap's length for the penalty counts bigrams (words - 1, and 0 for none).
        self.ref_len.append(max(len(words) - 1, 0))
    self.ref_segment = np.array(self.ref_segment)
    self.ref_len = np.array(self.ref_len, np.float64)
    self.refs_per_segment = np.bincount(self.ref_segment, minlength=self.n).astype(np.float64)
    rows, cols = zip(*sorted(incidence)) if incidence else ((), ())
    # [G, n]: which segments' references hold each n-gram (for the document frequencies).
    self.segments_of = sparse.csr_matrix((np.ones(len(rows)), (cols, rows)),
                                         shape=(len(self.vocab), self.n))
    self.ref_norm = self._matrix([{g: c * c for g, c in counts.items()}
                                  for per_order in self.ref_counts for counts in per_order])

  def _matrix(self, rows: list[dict[int, float]]) -> sparse.csr_matrix:
    indptr = np.cumsum([0] + [len(r) for r in rows])
    indices = np.fromiter((g for r in rows for g in r), np.int64, int(indptr[-1]))
    data = np.fromiter((v for r in rows for v in r.values()), np.float64, int(indptr[-1]))
    return sparse.csr_matrix((data, indices, indptr), shape=(len(rows), len(self.vocab)))

  def scorer(self, hypothesis_sets: Sequence[Sequence[Sequence[str]]]
             ) -> Callable[[np.ndarray], np.ndarray]:
    """indices -> [sets, n] CIDEr-D of every segment of each hypothesis set (each a list of n
    tokenized hypotheses), with the document frequencies of the segments drawn."""
    sets, k, refs = len(hypothesis_sets), _CIDER_ORDER, len(self.ref_segment)
    hyp_norm, dot, unseen, hyp_len = [], [], [], []
    for hypotheses in hypothesis_sets:
      hyp_counts = []
      for words in map(_words, hypotheses):
        hyp_len.append(max(len(words) - 1, 0))
        for n in range(1, k + 1):
          counts = _ngrams(words, n)
          seen = {self.vocab[g]: c for g, c in counts.items() if g in self.vocab}
          hyp_counts.append(seen)
          hyp_norm.append({g: c * c for g, c in seen.items()})
          unseen.append(sum(c * c for g, c in counts.items() if g not in self.vocab))
      for r, per_order in enumerate(self.ref_counts):
        for n, counts in enumerate(per_order):
          hyp = hyp_counts[self.ref_segment[r] * k + n]
          # The clipped dot product min(h, r) * r, before the idf^2 weights.
          dot.append({g: min(hyp[g], c) * c for g, c in counts.items() if g in hyp})
    hyp_norm_m, dot_m = self._matrix(hyp_norm), self._matrix(dot)
    unseen = np.array(unseen, np.float64).reshape(sets, self.n, k)
    hyp_len = np.array(hyp_len, np.float64).reshape(sets, self.n)
    penalty = np.exp(-(hyp_len[:, self.ref_segment] - self.ref_len)**2
                     / (2 * _CIDER_SIGMA**2))                                 # [sets, refs]

    def per_segment(idx: np.ndarray) -> np.ndarray:
      weight = np.bincount(idx, minlength=self.n).astype(np.float64)
      log_n = math.log(len(idx))
      idf2 = (log_n - np.log(np.maximum(1.0, self.segments_of @ weight)))**2
      hh = (hyp_norm_m @ idf2).reshape(sets, self.n, k) + unseen * log_n**2
      rr = (self.ref_norm @ idf2).reshape(refs, k)
      hr = (dot_m @ idf2).reshape(sets, refs, k)
      denominator = np.sqrt(hh[:, self.ref_segment] * rr)
      with np.errstate(divide="ignore", invalid="ignore"):
        cosine = np.where(denominator > 0, hr / denominator, 0.0)
      per_ref = cosine.mean(-1) * penalty                                      # [sets, refs]
      summed = np.stack([np.bincount(self.ref_segment, p, minlength=self.n) for p in per_ref])
      return 10.0 * summed / self.refs_per_segment

    return per_segment


class Meteor:
  """METEOR 1.5 through the jar in the pycocoevalcap wheel (``-l en -norm``, as COCO runs it).

  :meth:`stats` aligns each hypothesis with its references in one Java process (about 8 s to
  start, then some 15 ms a segment on one core) and returns their sufficient statistics;
  :func:`meteor_from_stats` turns summed statistics into the corpus score as the jar's
  ``EVAL`` does (checked in the tests), so resamples need no Java. ``key`` names the setting
  that asked for it, for the errors.
  """

  def __init__(self, key: str = "meteor"):
    spec = importlib.util.find_spec("pycocoevalcap")
    folder = None
    for location in (spec.submodule_search_locations or []) if spec else []:
      if os.path.exists(os.path.join(location, "meteor", "meteor-1.5.jar")):
        folder = os.path.join(location, "meteor")
    if folder is None:
      raise RuntimeError(f"{key}: METEOR runs the jar of the pycocoevalcap package, which is "
                         "not installed (pip install pycocoevalcap==1.2, a test requirement)")
    if not os.path.exists(os.path.join(folder, "data", "paraphrase-en.gz")):
      raise RuntimeError(f"{key}: {folder}/data/paraphrase-en.gz is missing (METEOR's "
                         "paraphrase table ships in the pycocoevalcap wheel)")
    self.java = shutil.which("java")
    if self.java is None:
      raise RuntimeError(f"{key}: METEOR needs a Java runtime (java on PATH)")
    self.folder = folder

  def stats(self, hypotheses: Sequence[Sequence[str]],
            references: Sequence[Sequence[Sequence[str]]]) -> np.ndarray:
    """[segments, 23] statistics of tokenized hypotheses against their tokenized references."""
    _check_pair("hypotheses", hypotheses, "references", references)
    lines = []
    for hyp, refs in zip(hypotheses, references):
      # "|||" separates the fields of the jar's protocol (pycocoevalcap removes it likewise).
      texts = [" ".join(t).replace("|||", "").replace("  ", " ") for t in [*refs, hyp]]
      lines.append("SCORE ||| " + " ||| ".join(texts) + "\n")
    process = subprocess.Popen(
        [self.java, "-jar", "-Xmx2G", "meteor-1.5.jar", "-", "-", "-stdio", "-l", "en", "-norm"],
        cwd=self.folder, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True, encoding="utf-8")

    def write():
      # From a thread: the jar answers while it reads, and both pipes would fill otherwise.
      try:
        process.stdin.writelines(lines)
        process.stdin.close()
      except (BrokenPipeError, ValueError):
        pass

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
      out = [process.stdout.readline() for _ in lines]
    finally:
      process.kill()
      process.wait()
      writer.join()
    try:
      return np.array([[float(v) for v in line.split()] for line in out]).reshape(len(lines), 23)
    except ValueError:
      raise RuntimeError(f"METEOR ({self.folder}/meteor-1.5.jar) ended without statistics "
                         f"(exit status {process.returncode})") from None


# METEOR 1.5's English parameters (alpha, beta, gamma, delta) and module weights (exact, stem,
# synonym, paraphrase), as the jar's default task uses them.
_METEOR_PARAMETERS = (0.85, 0.2, 0.6, 0.75)
_METEOR_WEIGHTS = np.array([1.0, 0.6, 0.8, 0.6])


def meteor_segment_stats(stats: np.ndarray) -> np.ndarray:
  """Segment statistics [s, 23] -> what the corpus score sums [s, 24]: the 23 columns and the
  chunks that count (a segment matched whole in one chunk adds none, as in the jar)."""
  stats = np.asarray(stats, np.float64)
  test_matches = stats[:, [4, 6, 8, 10, 12, 14, 16, 18]].sum(1)
  ref_matches = stats[:, [5, 7, 9, 11, 13, 15, 17, 19]].sum(1)
  perfect = (test_matches == stats[:, 0]) & (ref_matches == stats[:, 1]) & (stats[:, 20] == 1)
  return np.concatenate([stats, np.where(perfect, 0.0, stats[:, 20])[:, None]], axis=1)


def meteor_from_stats(sums: np.ndarray) -> np.ndarray:
  """Corpus METEOR of summed :func:`meteor_segment_stats` rows [..., 24]."""
  alpha, beta, gamma, delta = _METEOR_PARAMETERS
  s = np.asarray(sums, np.float64)
  test_len, ref_len, test_function, ref_function = (s[..., i] for i in range(4))
  stage = s[..., 4:20].reshape(s.shape[:-1] + (4, 4))     # per module: tc, rc, tf, rf
  test_matches = stage[..., 0].sum(-1) + stage[..., 2].sum(-1)
  ref_matches = stage[..., 1].sum(-1) + stage[..., 3].sum(-1)
  with np.errstate(divide="ignore", invalid="ignore"):
    precision = (((stage[..., 0] * delta + stage[..., 2] * (1 - delta)) * _METEOR_WEIGHTS).sum(-1)
                 / (delta * (test_len - test_function) + (1 - delta) * test_function))
    recall = (((stage[..., 1] * delta + stage[..., 3] * (1 - delta)) * _METEOR_WEIGHTS).sum(-1)
              / (delta * (ref_len - ref_function) + (1 - delta) * ref_function))
    f_mean = 1.0 / ((1 - alpha) / precision + alpha / recall)
    chunks = s[..., 23]
    perfect = (test_matches == test_len) & (ref_matches == ref_len) & (chunks == 1)
    fragmentation = np.where(perfect, 0.0, chunks / ((test_matches + ref_matches) / 2))
    score = f_mean * (1 - gamma * fragmentation**beta)
  return np.where(np.isnan(score), 0.0, np.maximum(score, 0.0))


def _tokenized_references(references: Sequence[Sequence[str]]) -> list[list[list[str]]]:
  """Each segment's references as COCO tokens (all references tokenized as one stream, as the
  COCO evaluation does)."""
  if len(references) == 0:
    raise ValueError("references is empty")
  _check_references(references)
  flat = coco_tokenize([r for refs in references for r in refs])
  ends = np.cumsum([len(refs) for refs in references])
  return [flat[e - len(refs):e] for e, refs in zip(ends, references)]


class CaptionCorpus:
  """The references of ``n`` segments (slides), tokenized once, and the corpus metrics of
  hypotheses against them on all segments or any resample of them.

  ``metrics({name: hypothesis sets})`` gives, per name, the dict metric of segment indices
  (with repeats) -> BLEU-1..4, ROUGE-L, CIDEr-D (and METEOR with ``meteor``), each recomputed as
  a corpus on those segments; several hypothesis sets under one name (random draws of a
  baseline) give the mean of their metrics. ``meteor`` (a :class:`Meteor`) is run once per
  call for all the sets together.
  """

  def __init__(self, references: Sequence[Sequence[str]], meteor: Meteor | None = None):
    self.references = _tokenized_references(references)
    self.n = len(references)
    self.meteor = meteor
    self._cider = _Cider(self.references)

  def metrics(self, hypothesis_sets: Mapping[str, Sequence[Sequence[str]]]
              ) -> dict[str, Metric]:
    """Per name, the dict metric of its hypothesis sets (each a list of n captions)."""
    tokenized = {}
    for name, sets in hypothesis_sets.items():
      if not sets or isinstance(sets[0], str):
        raise ValueError(f"hypothesis_sets[{name!r}] must be a list of caption lists")
      for hypotheses in sets:
        _check_pair(f"hypothesis_sets[{name!r}]", hypotheses, "references", self.references)
      tokenized[name] = [coco_tokenize(list(h)) for h in sets]
    meteor = {}
    if self.meteor is not None:
      # One Java process for every set (it takes seconds to start).
      hypotheses = [h for sets in tokenized.values() for hyps in sets for h in hyps]
      stats = meteor_segment_stats(self.meteor.stats(
          hypotheses, self.references * (len(hypotheses) // self.n)))
      start = 0
      for name, sets in tokenized.items():
        meteor[name] = stats[start:start + len(sets) * self.n].reshape(len(sets), self.n, 24)
        start += len(sets) * self.n
    return {name: self._metric(sets, meteor.get(name)) for name, sets in tokenized.items()}

  def _metric(self, sets: list[list[list[str]]], meteor: np.ndarray | None) -> Metric:
    bleu = np.stack([[_bleu_stats(h, r, 4) for h, r in zip(hyps, self.references)]
                     for hyps in sets])                                  # [sets, n, 10]
    rouge = np.array([[_rouge_l_segment(h, r) for h, r in zip(hyps, self.references)]
                      for hyps in sets])                                 # [sets, n]
    cider = self._cider.scorer(sets)

    def metric(idx: np.ndarray) -> dict[str, float]:
      idx = np.asarray(idx, np.int64)
      out = dict(zip(CAPTION_METRICS[:4], _bleu(bleu[:, idx].sum(1), 4).mean(0)))
      out["rouge_l"] = rouge[:, idx].mean(1).mean()
      out["cider_d"] = (cider(idx) @ np.bincount(idx, minlength=self.n)).mean() / len(idx)
      if meteor is not None:
        out["meteor"] = meteor_from_stats(meteor[:, idx].sum(1)).mean()
      return {k: float(v) for k, v in out.items()}

    return metric

  def segment_scores(self, hypotheses: Sequence[str]) -> dict[str, np.ndarray]:
    """Per segment ROUGE-L and CIDEr-D (document frequencies of all segments): the per-slide
    values for an evaluator's rows."""
    tokens = coco_tokenize(list(hypotheses))
    _check_pair("hypotheses", tokens, "references", self.references)
    return {"rouge_l": np.array([_rouge_l_segment(h, r)
                                 for h, r in zip(tokens, self.references)]),
            "cider_d": self._cider.scorer([tokens])(np.arange(self.n))[0]}


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
                max_order: int = 4) -> dict[str, float]:
  """Corpus BLEU-1..``max_order`` (keys ``bleu_<n>``) of COCO-tokenized captions, in [0, 1]."""
  if max_order < 1:
    raise ValueError(f"max_order must be >= 1, got {max_order}")
  _check_pair("hypotheses", hypotheses, "references", references)
  hyps = coco_tokenize(list(hypotheses))
  refs = _tokenized_references(references)
  sums = np.sum([_bleu_stats(h, r, max_order) for h, r in zip(hyps, refs)], axis=0)
  return {f"bleu_{n}": float(v) for n, v in enumerate(_bleu(sums, max_order), start=1)}


def rouge_l(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
  """ROUGE-L F-measure (beta 1.2) averaged over segments, LCS precision and recall each
  maximised over a segment's references (the COCO scorer's rule)."""
  _check_pair("hypotheses", hypotheses, "references", references)
  return caption_metrics(hypotheses, references)["rouge_l"]


def cider_d(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
  """CIDEr-D as the COCO caption evaluation computes it (document frequencies from these
  references; a corpus of one segment scores 0: every n-gram is in every segment)."""
  _check_pair("hypotheses", hypotheses, "references", references)
  return caption_metrics(hypotheses, references)["cider_d"]


def caption_metrics(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
                    meteor: Meteor | None = None) -> dict[str, float]:
  """BLEU-1..4, ROUGE-L, CIDEr-D (and METEOR with ``meteor``) of generated captions against
  their references (a list of strings per caption), and ``num_captions``."""
  _check_pair("hypotheses", hypotheses, "references", references)
  corpus = CaptionCorpus(references, meteor)
  result = corpus.metrics({"": [list(hypotheses)]})[""](np.arange(len(hypotheses)))
  result["num_captions"] = len(hypotheses)
  return result


# ------------------------------------------------------------------------------ VQA


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


def open_ended_scores(predictions: Sequence[str | None],
                      answers: Sequence[str | Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
  """SQuAD-style exact match and token F1 of each free-text answer: two arrays [n].

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
  return np.array(exact), np.array(f1)


def open_ended_metrics(predictions: Sequence[str | None],
                       answers: Sequence[str | Sequence[str]]) -> dict[str, float]:
  """Mean ``exact_match`` and token ``f1`` (:func:`open_ended_scores`), ``num_questions``."""
  exact, f1 = open_ended_scores(predictions, answers)
  return {"exact_match": float(np.mean(exact)), "f1": float(np.mean(f1)),
          "num_questions": len(predictions)}
