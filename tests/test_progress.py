"""pathflip_jax.progress: rate, ETA, throttling and the first-update exclusion, on a fake clock."""

import io

import numpy as np
import pytest

from pathflip_jax import progress as progress_lib


class FakeClock:
  def __init__(self, now: float = 100.0):
    self.now = now

  def __call__(self) -> float:
    return self.now


def _progress(total, clock, **kw):
  out = io.StringIO()
  kw.setdefault("interval_s", 10.0)
  p = progress_lib.Progress(total, kw.pop("unit", "patches"), kw.pop("prefix", "job"),
                            clock=clock, stream=out, **kw)
  return p, out


def _lines(out):
  return out.getvalue().splitlines()


@pytest.mark.parametrize("seconds, text", [
    (0, "0s"), (45.9, "45s"), (62, "1m02s"), (600, "10m00s"), (3600 + 125, "1h02m05s"),
    (None, "?"), (float("nan"), "?"), (float("inf"), "?"), (-1, "?")])
def test_duration(seconds, text):
  assert progress_lib.duration(seconds) == text


def test_rate_eta_and_line():
  clock = FakeClock()
  p, out = _progress(1000, clock, prefix="extract_features")
  assert p.rate() is None and p.eta_s() is None
  clock.now += 4
  assert not p.update(200, slides="1/5")           # 4s < interval: no line
  assert p.rate() == pytest.approx(50.0)
  assert p.eta_s() == pytest.approx(16.0)
  clock.now += 6
  assert p.update(500, slides="2/5")                # 10s since the start: a line
  assert _lines(out) == ["[extract_features] 500/1,000 patches | slides 2/5 | 50.0 patches/s | "
                         "ETA 10s | 10s elapsed"]


def test_throttle_counts_from_the_last_line():
  clock = FakeClock()
  p, out = _progress(10_000, clock, interval_s=5.0)
  printed = []
  for _ in range(20):                               # an update every 2s for 40s
    clock.now += 2
    printed.append(p.update(p.done + 10))
  # Lines at 6s, 12s, 18s ... (the first update 5s or more after the previous line).
  assert [i for i, x in enumerate(printed) if x] == [2, 5, 8, 11, 14, 17]
  assert len(_lines(out)) == 6
  assert p.update(p.done, force=True) and len(_lines(out)) == 7


def test_final_line_once_on_completion():
  clock = FakeClock()
  p, out = _progress(30, clock, unit="slides", interval_s=600.0)
  clock.now += 1
  assert not p.update(10)
  clock.now += 1
  assert p.update(30)                               # complete: printed despite the interval
  assert not p.update(30)                           # ... once
  assert _lines(out) == ["[job] 30/30 slides | 15.0 slides/s | ETA 0s | 2s elapsed"]


def test_skip_first_excludes_the_first_update():
  clock = FakeClock()
  p, out = _progress(240, clock, unit="steps", prefix="train", interval_s=0.0, skip_first=True)
  clock.now += 30                                   # step 1: compilation
  assert not p.update(1, loss=5.0)                  # the baseline prints nothing
  assert p.rate() is None
  clock.now += 0.5
  assert p.update(2, loss=4.20694)
  assert p.rate() == pytest.approx(2.0)             # 1 step in 0.5s, not 2 steps in 30.5s
  assert p.rate(include_first=True) == pytest.approx(2 / 30.5)
  assert p.eta_s() == pytest.approx(119.0)
  assert _lines(out) == ["[train] 2/240 steps | loss 4.2069 | 2.00 steps/s | ETA 1m59s | "
                         "30s elapsed"]


def test_field_formatting():
  clock = FakeClock()
  p, _ = _progress(10, clock)
  clock.now += 1
  p.update(5)
  line = p.line(loss=np.float32(0.5), patches=np.int64(12345), note="ok", n=7)
  assert " | loss 0.5000 | patches 12,345 | note ok | n 7 | " in line


def test_resumed_start_is_not_in_the_rate():
  clock = FakeClock()
  p, _ = _progress(1000, clock, unit="steps", start=400)
  clock.now += 10
  p.update(420)
  assert p.rate() == pytest.approx(2.0)
  assert p.eta_s() == pytest.approx(290.0)


def test_unknown_total_and_silent_mode():
  clock = FakeClock()
  p, out = _progress(None, clock, interval_s=1.0)
  clock.now += 2
  assert p.update(1234)
  assert _lines(out) == ["[job] 1,234 patches | 617 patches/s | ETA ? | 2s elapsed"]
  p.total = 2468                                    # an estimate arrives later
  assert p.eta_s() == pytest.approx(2.0)

  quiet, out = _progress(10, clock, interval_s=None)
  clock.now += 5
  assert not quiet.update(10, force=True)           # interval None: counts, never prints
  assert out.getvalue() == "" and quiet.rate() == pytest.approx(2.0)
