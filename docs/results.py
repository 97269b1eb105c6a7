"""Writes docs/results.md, the one page of measured numbers, from named quickstart runs.

  python -m pathflip_jax.quickstart --size study --ablation_seeds 3 --workdir runs/study
  python -m pathflip_jax.quickstart --workdir runs/quickstart
  python docs/results.py runs/study runs/quickstart

Each run gets a section that names it (command, date, machine, git commit, from W/run.json)
and holds every table of its REPORT.md (``pathflip_jax.report``: each metric beside its
baselines, the paper's claims, the ablations when it ran them), and the stage times; the first
run also gives one strip of example heatmaps (docs/results/heatmaps.jpg). README, configs and
docstrings point here instead of quoting numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from PIL import Image

DOCS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(DOCS)
STRIP_WIDTH = 420   # pixels per heatmap in the strip: small enough to commit


def _load(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def provenance(record: dict) -> list[str]:
  """Lines naming the run: command, date, machine, code version."""
  if not record:
    raise SystemExit("the workdir has no run.json: run python -m pathflip_jax.quickstart there "
                     "(it records the command, date, machine and git commit)")
  machine, jax_info = record.get("machine", {}), record.get("jax", {})
  commit = record.get("git_commit") or "unknown"
  if record.get("git_dirty"):
    commit += " with uncommitted changes"
  lines = ["Every number below comes from one run of the quickstart:", "",
           f"- command: `{record.get('command')}`",
           f"- started: {record.get('started')}",
           f"- code: git {commit}",
           f"- machine: {machine.get('cpu')}, {machine.get('cores')} cores, "
           f"{machine.get('memory_gib')} GiB; {machine.get('platform')}",
           f"- JAX {jax_info.get('version')} on {jax_info.get('backend')} "
           f"({jax_info.get('devices')} x {jax_info.get('device_kind')})"]
  earlier = record.get("earlier") or []
  if earlier:
    # Stages finished by an earlier invocation keep its numbers: name each one's code.
    lines.append(f"- resumed: {len(earlier)} earlier invocation(s) ran some stages first:")
    for run in reversed(earlier):
      dirty = " with uncommitted changes" if run.get("git_dirty") else ""
      lines.append(f"  - started {run.get('started')}, git {run.get('git_commit')}{dirty}")
  return lines + [""]


def heatmap_strip(workdir: str, out_path: str) -> str | None:
  """The first example slide's heatmaps side by side, scaled down, as a JPEG; its caption."""
  examples = os.path.join(workdir, "examples")
  if not os.path.isdir(examples):
    return None
  for slide_id in sorted(os.listdir(examples)):
    summary = _load(os.path.join(examples, slide_id, "summary.json"))
    if not summary.get("heatmaps"):
      continue
    pictures = [Image.open(h["png"]).convert("RGB") for h in summary["heatmaps"]]
    pictures = [p.resize((STRIP_WIDTH, round(p.height * STRIP_WIDTH / p.width)), Image.LANCZOS)
                for p in pictures]
    strip = Image.new("RGB", (STRIP_WIDTH * len(pictures), max(p.height for p in pictures)),
                      "white")
    for i, picture in enumerate(pictures):
      strip.paste(picture, (i * STRIP_WIDTH, 0))
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    strip.save(out_path, quality=80)
    queries = "; ".join(f"\"{h['query']}\"" for h in summary["heatmaps"])
    truth = summary.get("zero_shot", {}).get("prediction", "?")
    return (f"Test slide {slide_id} (zero-shot: {truth}), text-prompted heatmaps of {queries} "
            "(PathFlip.patch_heatmap; the colour bar is min-max over the slide).")
  return None


def _run_section(workdir: str) -> list[str]:
  """One run's section: what ran, then its report one heading level down."""
  from pathflip_jax import quickstart, report  # pylint: disable=import-outside-toplevel
  record = _load(os.path.join(workdir, "run.json"))
  lines = provenance(record)
  oracle = _load(os.path.join(workdir, "instruct", "eval", "vqa_oracle_test.json")) or None
  comparison, seeds = quickstart.Quickstart(
      workdir, size=record.get("size", "demo"), seed=record.get("seed", 0),
      ablation_seeds=record.get("ablation_seeds", 0)).ablation_summary()
  text = report.render(workdir, examples=[], vqa_oracle=oracle, title="",
                       comparison=comparison, seeds=seeds)
  lines += [("#" + line) if line.startswith("#") else line for line in text.splitlines()]
  return lines


def render(workdirs: list[str] | str) -> str:
  """docs/results.md's text for the quickstart runs in ``workdirs`` (also writes the strip of
  the first run's heatmaps)."""
  workdirs = [workdirs] if isinstance(workdirs, str) else list(workdirs)
  lines = ["# Results", "",
           "<!-- Written by docs/results.py from quickstart workdirs; rerun it after a new run. "
           "-->", ""]
  for workdir in workdirs:
    record = _load(os.path.join(workdir, "run.json"))
    lines += [f"## The `{record.get('size', 'demo')}` cohort", ""] + _run_section(workdir)
  caption = heatmap_strip(workdirs[0], os.path.join(DOCS, "results", "heatmaps.jpg"))
  if caption:
    lines += ["## Example heatmaps", "", caption, "", "![example heatmaps](results/heatmaps.jpg)",
              ""]
  return "\n".join(lines).rstrip() + "\n"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("workdirs", nargs="+", help="finished quickstart workdirs (the first gives "
                      "the heatmap strip)")
  parser.add_argument("--output", default=os.path.join(DOCS, "results.md"))
  args = parser.parse_args()
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  text = render([os.path.abspath(w) for w in args.workdirs])
  with open(args.output, "w", encoding="utf-8") as f:
    f.write(text)
  print(f"wrote {args.output}")


if __name__ == "__main__":
  main()
