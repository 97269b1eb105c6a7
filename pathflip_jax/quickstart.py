r"""The whole demo in one command: cohort -> tiles -> patch encoder -> features -> PathFLIP ->
decoder -> evaluation -> REPORT.md.

  python -m pathflip_jax.quickstart --workdir runs/quickstart [--size demo|test] [--seed 0]

Stages, each skipped when its outputs are complete (so a re-run after an interruption carries
on; the training stages also resume from their last checkpoint):

  1 cohort     data_prep.make_demo_cohort          W/cohort (slides, masks, captions, questions)
  2 tiles      data_prep.tile_slides (Apache Beam) W/patches
  3 patch_clip configs/patch_clip_demo.py          W/patch_clip (the patch encoder)
  4 features   data_prep.extract_features          W/features
  5 align      configs/pathflip_demo.py            W/align (zero-shot, retrieval, localization,
                                                   biomarker probe on the test split)
  6 instruct   configs/pathflip_instruct_demo.py   W/instruct (captioning, VQA on the test split)
  7 heatmaps   pathflip_jax.infer on test slides   W/examples/<slide>/ (heatmaps, caption, page)
  8 report     W/REPORT.md: every metric beside its chance baseline, sample captions, heatmaps;
                                                   the VQA ceiling (data_prep.demo_vqa_oracle)

W/run.json records the command, date, machine and git commit: ``python docs/results.py W``
writes docs/results.md from it and the stages' outputs.

``--size test`` runs the same stages with a 12-slide cohort, tiny models and 4-step runs (what
the test suite runs); its numbers mean nothing. ``--seed`` makes another cohort and trains every
stage with that seed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable, Sequence

# size: (cohort slides, the config arg of every training stage's config)
SIZES = {"demo": (48, ""), "test": (12, "size=test")}
EXAMPLE_QUERIES = ("invasive carcinoma with large pleomorphic hyperchromatic nuclei and "
                   "prominent nucleoli",
                   "tumour necrosis with pale eosinophilic debris and scattered nuclear fragments",
                   "benign glands with round lumina and regularly spaced basal nuclei")
EXAMPLE_QUESTIONS = ("What is the most likely diagnosis for this slide?",
                     "Which tissue types are present on the slide?")


def _log(message: str) -> None:
  print(f"[quickstart] {message}", file=sys.stderr, flush=True)


def _config(name: str, args: str, overrides: dict[str, Any]):
  from pathflip_jax import config_args  # pylint: disable=import-outside-toplevel
  path = os.path.join(_configs_dir(), f"{name}.py")
  return config_args.load_config(f"{path}:{args}" if args else path, overrides)


def _configs_dir() -> str:
  return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _args(*parts: str) -> str:
  return ",".join(p for p in parts if p)


def _results(workdir: str) -> dict[str, Any] | None:
  path = os.path.join(workdir, "results.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


class Quickstart:
  """The stages over one workdir; ``run()`` does what is not done yet."""

  def __init__(self, workdir: str, size: str = "demo", seed: int = 0, num_examples: int = 3):
    if size not in SIZES:
      raise ValueError(f"--size {size!r}: expected one of {sorted(SIZES)}")
    self.workdir = os.path.abspath(workdir)
    self.size, self.seed, self.num_examples = size, seed, num_examples
    self.num_slides, self.size_arg = SIZES[size]
    self.paths = {name: os.path.join(self.workdir, name) for name in
                  ("cohort", "patches", "patch_clip", "features", "align", "instruct",
                   "examples")}
    self.stages: list[tuple[str, Callable[[], bool], Callable[[], None]]] = [
        ("cohort", self._cohort_done, self._cohort),
        ("tiles", self._tiles_done, self._tiles),
        ("patch_clip", lambda: _results(self.paths["patch_clip"]) is not None, self._patch_clip),
        ("features", self._features_done, self._features),
        ("align", lambda: _results(self.paths["align"]) is not None, self._align),
        ("instruct", lambda: _results(self.paths["instruct"]) is not None, self._instruct),
        ("heatmaps", self._examples_done, self._examples),
        ("report", lambda: False, self._report),
    ]

  # ---------------------------------------------------------------------------- stages
  def _manifest_rows(self) -> list[dict[str, Any]]:
    with open(os.path.join(self.paths["cohort"], "manifest.jsonl")) as f:
      return [json.loads(line) for line in f if line.strip()]

  def _cohort_done(self) -> bool:
    path = os.path.join(self.paths["cohort"], "cohort.json")
    if not os.path.exists(path):
      return False
    with open(path) as f:
      summary = json.load(f)
    return summary.get("num_slides") == self.num_slides and summary.get("seed") == self.seed

  def _cohort(self) -> None:
    from data_prep import make_demo_cohort  # pylint: disable=import-outside-toplevel
    make_demo_cohort.run(["--output_dir", self.paths["cohort"], "--num_slides",
                          str(self.num_slides), "--seed", str(self.seed)])

  def _tiles_done(self) -> bool:
    from pathflip_jax.data import patch_shards  # pylint: disable=import-outside-toplevel
    if not os.path.exists(os.path.join(self.paths["patches"], "slides.jsonl")):
      return False
    done = patch_shards.read_slide_index(self.paths["patches"], include_failed=True)
    return len(done) >= len(self._manifest_rows())

  def _tiles(self) -> None:
    from data_prep import tile_slides  # pylint: disable=import-outside-toplevel
    tile_slides.run(["--manifest", os.path.join(self.paths["cohort"], "manifest.jsonl"),
                     "--output_dir", self.paths["patches"], "--direct_running_mode=in_memory",
                     "--direct_num_workers=1", "--progress_interval=10"])

  def _train(self, name: str, args: str, workdir: str) -> None:
    from pathflip_jax import train  # pylint: disable=import-outside-toplevel
    train.train_and_evaluate(_config(name, _args(args, self.size_arg), {"seed": self.seed}),
                             workdir)

  def _patch_clip(self) -> None:
    self._train("patch_clip_demo", _args(f"cohort_dir={self.paths['cohort']}",
                                         f"patches_dir={self.paths['patches']}"),
                self.paths["patch_clip"])

  def _features_done(self) -> bool:
    from pathflip_jax.data import feature_shards, patch_shards  # pylint: disable=import-outside-toplevel
    try:
      done = feature_shards.committed_rows(self.paths["features"])
    except FileNotFoundError:
      return False
    tiled = patch_shards.read_slide_index(self.paths["patches"])
    return bool(done) and all(r["slide_id"] in done for r in tiled)

  def _features(self) -> None:
    from data_prep import extract_features  # pylint: disable=import-outside-toplevel
    extract_features.run(["--patches", self.paths["patches"], "--output_dir",
                          self.paths["features"], "--config",
                          os.path.join(_configs_dir(), "extract_features.py")
                          + f":checkpoint={self.paths['patch_clip']}",
                          "--progress_interval", "10"])

  def align_config_args(self) -> str:
    return _args(f"features_dir={self.paths['features']}", f"cohort_dir={self.paths['cohort']}",
                 f"reference={self.paths['patch_clip']}", "probe_label=biomarker")

  def _align(self) -> None:
    self._train("pathflip_demo", self.align_config_args(), self.paths["align"])

  def _instruct(self) -> None:
    self._train("pathflip_instruct_demo",
                _args(f"align_workdir={self.paths['align']}",
                      f"questions={os.path.join(self.paths['cohort'], 'questions.csv')}"),
                self.paths["instruct"])

  def example_slides(self) -> list[dict[str, Any]]:
    """A few test slides for the pictures: one per diagnosis with a lesion first, among those
    the tiling job tiled (a slide it skipped, e.g. for no tissue, has nothing to show)."""
    from pathflip_jax.data import patch_shards  # pylint: disable=import-outside-toplevel
    tiled = {r["slide_id"] for r in patch_shards.read_slide_index(self.paths["patches"])}
    rows = [r for r in self._manifest_rows() if r["split"] == "test" and r["slide_id"] in tiled]
    rows.sort(key=lambda r: (r["diagnosis"] == "benign", r["diagnosis"], r["slide_id"]))
    picked, seen = [], set()
    for row in rows:
      if row["diagnosis"] not in seen:
        picked.append(row)
        seen.add(row["diagnosis"])
    return picked[:self.num_examples]

  def _examples_done(self) -> bool:
    return all(os.path.exists(os.path.join(self.paths["examples"], r["slide_id"],
                                           "summary.json")) for r in self.example_slides())

  def _examples(self) -> None:
    from pathflip_jax import infer  # pylint: disable=import-outside-toplevel
    for row in self.example_slides():
      path = row["path"]
      if not os.path.isabs(path):
        path = os.path.join(self.paths["cohort"], path)
      infer.infer(self.paths["instruct"], path, os.path.join(self.paths["examples"],
                                                              row["slide_id"]),
                  queries=EXAMPLE_QUERIES, questions=EXAMPLE_QUESTIONS)

  def _report(self) -> None:
    from data_prep import demo_vqa_oracle  # pylint: disable=import-outside-toplevel
    from pathflip_jax import report  # pylint: disable=import-outside-toplevel
    predictions = os.path.join(self.paths["instruct"], "eval", "vqa_test.jsonl")
    oracle = None
    if os.path.exists(predictions):
      oracle = demo_vqa_oracle.evaluate(self.paths["cohort"], self.paths["patches"], "test",
                                        predictions, features_dir=self.paths["features"])
      with open(os.path.join(self.paths["instruct"], "eval", "vqa_oracle_test.json"), "w",
                encoding="utf-8") as f:
        json.dump(oracle, f, indent=1, sort_keys=True)
    text = report.render(self.workdir, self.example_slides(), oracle)
    path = os.path.join(self.workdir, "REPORT.md")
    with open(path, "w", encoding="utf-8") as f:
      f.write(text)
    _log(f"report -> {path}")

  # ------------------------------------------------------------------------------- run
  def run(self, command: Sequence[str] = ()) -> str:
    """Runs every stage not done yet; returns REPORT.md's path. ``command``: how it was started,
    recorded in W/run.json (each invocation, the last one first)."""
    from pathflip_jax import provenance  # pylint: disable=import-outside-toplevel
    os.makedirs(self.workdir, exist_ok=True)
    start = time.time()
    record_path = os.path.join(self.workdir, "run.json")
    record = provenance.run_record(command or ["Quickstart", self.workdir])
    record.update(size=self.size, seed=self.seed)
    earlier = []
    if os.path.exists(record_path):
      with open(record_path) as f:
        previous = json.load(f)
      earlier = ([{k: v for k, v in previous.items() if k != "earlier"}]
                 + previous.get("earlier", []))
    with open(record_path, "w") as f:
      json.dump({**record, "earlier": earlier}, f, indent=1)
    path = os.path.join(self.workdir, "timings.json")
    # Stages skipped as complete keep the time they took when they ran.
    timings = {}
    if os.path.exists(path):
      with open(path) as f:
        timings = dict(json.load(f).get("seconds", {}))
    for i, (name, done, stage) in enumerate(self.stages, start=1):
      if done():
        _log(f"stage {i}/{len(self.stages)} {name}: already complete, skipped")
        continue
      _log(f"stage {i}/{len(self.stages)} {name} ...")
      t0 = time.time()
      stage()
      timings[name] = round(time.time() - t0, 1)
      _log(f"stage {i}/{len(self.stages)} {name}: done in {timings[name]:.0f}s "
           f"({time.time() - start:.0f}s in all)")
      # Written after every stage: the report stage shows the times of those before it.
      with open(path, "w") as f:
        json.dump({"size": self.size, "seconds": timings,
                   "total_seconds": round(sum(timings.values()), 1)}, f, indent=1)
    return os.path.join(self.workdir, "REPORT.md")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", default="runs/quickstart")
  parser.add_argument("--size", default="demo", choices=sorted(SIZES))
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--examples", type=int, default=3,
                      help="test slides to draw heatmaps, captions and answers for")
  args = parser.parse_args(argv)
  from pathflip_jax import compilation_cache  # pylint: disable=import-outside-toplevel
  compilation_cache.enable()
  workdir = os.path.abspath(args.workdir)
  report_path = Quickstart(workdir, args.size, args.seed, args.examples).run(
      command=["python", "-m", "pathflip_jax.quickstart"] + list(
          sys.argv[1:] if argv is None else argv))
  print(report_path)


if __name__ == "__main__":
  main()
