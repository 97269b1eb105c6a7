"""Where a run's numbers came from: the command, date, machine and code version.

``quickstart`` writes this record as ``W/run.json``; ``docs/results.py`` puts it at the top of
docs/results.md, so every number there names the run that measured it.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from typing import Any, Sequence

import jax


def _git(*args: str) -> str:
  """The output of a git command in this package's checkout ("" outside one)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10,
                          check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return ""


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
  try:
    return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1)
  except (ValueError, OSError, AttributeError):
    return None


def run_record(command: Sequence[str]) -> dict[str, Any]:
  """The provenance of a run started now with ``command``."""
  devices = jax.devices()
  return {
      "command": " ".join(command),
      "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "git_commit": _git("rev-parse", "HEAD"),
      # Uncommitted changes to tracked files: the commit alone does not name the code.
      "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
      "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "memory_gib": _memory_gib(),
                  "platform": platform.platform()},
      "jax": {"version": jax.__version__, "backend": jax.default_backend(),
              "devices": len(devices), "device_kind": devices[0].device_kind},
  }
