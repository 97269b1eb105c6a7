"""The progress line of every long job (training, tiling, feature extraction, imports ...):

  [prefix] done/total unit | extra fields | rate unit/s | ETA 1m02s | 12s elapsed

printed to stderr at most every ``interval_s`` seconds, and once more when ``done`` reaches
``total``. Jobs whose first unit pays for compilation or worker start-up pass ``skip_first`` so
that the rate (and so the ETA) is measured from the first update on, not from the start.
"""

from __future__ import annotations

import math
import numbers
import sys
import time
from typing import Any, Callable, TextIO


def duration(seconds: float | None) -> str:
  """``45s``, ``1m02s``, ``2h05m09s``; ``?`` when unknown (None, nan, inf, negative)."""
  if seconds is None or not math.isfinite(seconds) or seconds < 0:
    return "?"
  seconds = int(seconds)
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m{secs:02d}s"
  return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _rate_text(rate: float | None) -> str:
  # Digits where they matter: 2.04 steps/s, 45.3 slides/s, 1,234 patches/s.
  if rate is None:
    return "?"
  if rate >= 100:
    return f"{rate:,.0f}"
  return f"{rate:.1f}" if rate >= 10 else f"{rate:.2f}"


def _field_text(value: Any) -> str:
  # Counts with separators, measurements (a loss, also as a numpy or jax scalar) to 4 decimals.
  if isinstance(value, (bool, str)):
    return str(value)
  if isinstance(value, numbers.Integral):
    return f"{int(value):,}"
  if hasattr(value, "__float__"):
    return f"{float(value):.4f}"
  return str(value)


class Progress:
  """Counts a job's units and prints its progress line; :meth:`rate` serves summaries and metrics.

  Args:
    total: units the job will do (None while unknown: no ETA); may be changed later.
    unit: what is counted, plural (``steps``, ``patches``, ``slides``).
    prefix: the job's log prefix, without brackets.
    interval_s: at most one line per this many seconds (0: every update; None: never print,
      only count).
    start: units already done when the job starts (a resumed run); they are not in the rate.
    skip_first: measure the rate from the first update, which is otherwise slowed by
      compilation or start-up; that update prints no line unless it completes the job.
    clock: seconds, monotonic (tests inject a fake one).
    stream: where lines go (default: the current sys.stderr).
  """

  def __init__(self, total: int | None, unit: str, prefix: str, interval_s: float | None = 5.0,
               *, start: int = 0, skip_first: bool = False,
               clock: Callable[[], float] = time.monotonic, stream: TextIO | None = None):
    self.total, self.unit, self.prefix, self.interval_s = total, unit, prefix, interval_s
    self._clock, self._stream = clock, stream
    self.done = self.start = start
    self.t0 = self._last_line = self._t = clock()
    # Where the rate is measured from: the start, or (skip_first) the first update.
    self._base: tuple[float, int] | None = None if skip_first else (self.t0, start)
    self._completed = False

  def update(self, done: int, *, force: bool = False, **fields: Any) -> bool:
    """Records ``done`` units in all; prints the line (with ``fields``, e.g. ``loss=4.2``) when
    ``interval_s`` has passed, when the job completes, or when forced. Says whether it printed."""
    now = self._clock()
    self.done, self._t = done, now
    first = self._base is None
    if first:
      self._base = (now, done)
    complete = self.total is not None and done >= self.total and not self._completed
    due = (not first and self.interval_s is not None
           and now - self._last_line >= self.interval_s)
    if self.interval_s is None or not (force or complete or due):
      return False
    self._completed = self._completed or complete
    self._last_line = now
    print(self.line(**fields), file=self._stream or sys.stderr, flush=True)
    return True

  def rate(self, include_first: bool = False) -> float | None:
    """Units per second as of the latest update, measured from the first update with
    ``skip_first`` (from the start with ``include_first``); None until a unit is measured."""
    base = (self.t0, self.start) if include_first else self._base
    if base is None or self.done <= base[1] or self._t <= base[0]:
      return None
    return (self.done - base[1]) / (self._t - base[0])

  def eta_s(self) -> float | None:
    """Seconds left at the current rate; None when the total or the rate is unknown."""
    rate = self.rate()
    if self.total is None or rate is None:
      return None
    return max(self.total - self.done, 0) / rate

  def line(self, **fields: Any) -> str:
    """The progress line as of the latest update."""
    total = f"/{self.total:,}" if self.total is not None else ""
    parts = [f"[{self.prefix}] {self.done:,}{total} {self.unit}"]
    parts += [f"{k} {_field_text(v)}" for k, v in fields.items()]
    parts += [f"{_rate_text(self.rate())} {self.unit}/s", f"ETA {duration(self.eta_s())}",
              f"{duration(self._t - self.t0)} elapsed"]
    return " | ".join(parts)
