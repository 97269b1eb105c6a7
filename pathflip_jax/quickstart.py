r"""The whole demo in one command: cohort -> tiles -> patch encoder -> features -> PathFLIP ->
decoder -> evaluation -> REPORT.md.

  python -m pathflip_jax.quickstart --workdir runs/quickstart [--size demo|study|test]
      [--seed 0] [--ablation_seeds 3]

Stages, each skipped when its outputs are complete (so a re-run after an interruption carries
on; the training stages also resume from their last checkpoint):

  1  cohort        data_prep.make_demo_cohort          W/cohort (slides, masks, captions)
  2  tiles         data_prep.tile_slides (Apache Beam) W/patches
  3  questions     data_prep.demo_questions            W/cohort/questions.csv (answers defined
                                                       on the tiled patch grid's regions)
  4  patch_clip    configs/patch_clip_demo.py          W/patch_clip (the patch encoder)
  5  features      data_prep.extract_features          W/features
  6  align         configs/pathflip_demo.py            W/align (zero-shot, retrieval,
                                                       localization, probes, MIL reference)
  7  question_only configs/pathflip_instruct_demo.py   W/instruct_question_only (the decoder
                   with data.visual_tokens=none        without visual tokens: a VQA baseline)
  8  instruct      configs/pathflip_instruct_demo.py   W/instruct (captioning, VQA)
  9  heatmaps      pathflip_jax.infer on test slides   W/examples/<slide>/
  (10 ablations    with --ablation_seeds N: the model and the paper's five ablations, N seeds
                   each, W/ablations/<name>/seed<k>, evaluated once at the end)
  11 report        W/REPORT.md: every metric with its 95% interval beside its baselines, paired
                   differences, the ablation table, the VQA ceiling (data_prep.demo_vqa_oracle)

Every evaluation is on the test split. W/run.json records the command, date, machine and git
commit: ``python docs/results.py W`` writes docs/results.md from it and the stages' outputs.

Sizes: ``demo`` (48 slides, small models: shows every output, decides nothing), ``study`` (the
measuring instrument: 420 slides of 2.3-3.2 mm in 4-8 tissue regions each, split by patient
45/15/40; claims about the method are decided there, with ``--ablation_seeds 3``) and ``test``
(12 slides, tiny models and 4-step runs: what the test suite runs; its numbers mean nothing).
``--seed`` makes another cohort and trains every stage with that seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable, Sequence



@dataclasses.dataclass(frozen=True)
class Size:
  slides: int          # cohort slides
  cohort: str          # make_demo_cohort --size
  config_arg: str      # the config arg of every training stage's config
  tile_workers: int    # Beam workers of the tiling job


SIZES = {"demo": Size(48, "small", "", 1), "test": Size(12, "small", "size=test", 1),
         "study": Size(420, "study", "size=study", 2)}
# The paper's five ablations (DESIGN.md section 2.7): align config fields set to False.
ABLATIONS = {"no_slide_loss": "slide_loss", "no_region_loss": "region_loss",
             "no_region_attention": "region_attention", "no_region_qformer": "region_qformer",
             "no_slide_qformer": "slide_qformer"}
# Regions of R x R patches: the align config's data.region_patches, which the questions'
# region answers follow.
REGION_PATCHES = 2
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

  def __init__(self, workdir: str, size: str = "demo", seed: int = 0, num_examples: int = 3,
               ablation_seeds: int = 0):
    if size not in SIZES:
      raise ValueError(f"--size {size!r}: expected one of {sorted(SIZES)}")
    if ablation_seeds < 0:
      raise ValueError(f"--ablation_seeds {ablation_seeds}: expected >= 0")
    self.workdir = os.path.abspath(workdir)
    self.size, self.seed, self.num_examples = size, seed, num_examples
    self.spec = SIZES[size]
    self.size_arg = self.spec.config_arg
    self.ablation_seeds = ablation_seeds
    self.paths = {name: os.path.join(self.workdir, name) for name in
                  ("cohort", "patches", "patch_clip", "features", "align", "instruct",
                   "instruct_question_only", "examples", "ablations")}
    self.paths["questions"] = os.path.join(self.paths["cohort"], "questions.csv")
    self.stages: list[tuple[str, Callable[[], bool], Callable[[], None]]] = [
        ("cohort", self._cohort_done, self._cohort),
        ("tiles", self._tiles_done, self._tiles),
        ("questions", self._questions_done, self._questions),
        ("patch_clip", lambda: _results(self.paths["patch_clip"]) is not None, self._patch_clip),
        ("features", self._features_done, self._features),
        ("align", lambda: _results(self.paths["align"]) is not None, self._align),
        ("question_only", lambda: _results(self.paths["instruct_question_only"]) is not None,
         self._instruct_question_only),
        ("instruct", lambda: _results(self.paths["instruct"]) is not None, self._instruct),
        ("heatmaps", self._examples_done, self._examples),
    ]
    if ablation_seeds:
      self.stages.append(("ablations", self._ablations_done, self._ablations))
    self.stages.append(("report", lambda: False, self._report))

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
    return summary.get("num_slides") == self.spec.slides and summary.get("seed") == self.seed

  def _cohort(self) -> None:
    from data_prep import make_demo_cohort  # pylint: disable=import-outside-toplevel
    make_demo_cohort.run(["--output_dir", self.paths["cohort"], "--num_slides",
                          str(self.spec.slides), "--size", self.spec.cohort,
                          "--seed", str(self.seed)])

  def _tiles_done(self) -> bool:
    from pathflip_jax.data import patch_shards  # pylint: disable=import-outside-toplevel
    if not os.path.exists(os.path.join(self.paths["patches"], "slides.jsonl")):
      return False
    done = patch_shards.read_slide_index(self.paths["patches"], include_failed=True)
    return len(done) >= len(self._manifest_rows())

  def _tiles(self) -> None:
    from data_prep import tile_slides  # pylint: disable=import-outside-toplevel
    workers = self.spec.tile_workers
    mode = "in_memory" if workers == 1 else "multi_processing"
    tile_slides.run(["--manifest", os.path.join(self.paths["cohort"], "manifest.jsonl"),
                     "--output_dir", self.paths["patches"], f"--direct_running_mode={mode}",
                     f"--direct_num_workers={workers}", "--progress_interval=10"])

  def _questions_done(self) -> bool:
    return os.path.exists(os.path.splitext(self.paths["questions"])[0] + ".json")

  def _questions(self) -> None:
    from data_prep import demo_questions  # pylint: disable=import-outside-toplevel
    demo_questions.run(["--cohort_dir", self.paths["cohort"], "--patches", self.paths["patches"],
                        "--region_patches", str(REGION_PATCHES), "--output",
                        self.paths["questions"], "--seed", str(self.seed)])

  def _train(self, name: str, args: str, workdir: str,
             overrides: dict[str, Any] | None = None) -> None:
    from pathflip_jax import train  # pylint: disable=import-outside-toplevel
    overrides = {"seed": self.seed, **(overrides or {})}
    train.train_and_evaluate(_config(name, _args(args, self.size_arg), overrides), workdir)

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

  def _instruct_args(self) -> str:
    return _args(f"align_workdir={self.paths['align']}", f"questions={self.paths['questions']}")

  def _instruct_question_only(self) -> None:
    """The question-only baseline: the same decoder trained and evaluated without visual
    tokens (what the questions and options alone answer)."""
    self._train("pathflip_instruct_demo", self._instruct_args(),
                self.paths["instruct_question_only"], {"data.visual_tokens": "none"})

  def _instruct(self) -> None:
    self._train("pathflip_instruct_demo",
                _args(self._instruct_args(),
                      f"question_only={self.paths['instruct_question_only']}"),
                self.paths["instruct"])

  def ablation_runs(self) -> dict[str, list[str]]:
    """{"model" or an ABLATIONS name: its workdirs, one per seed}; the model's first seed is
    W/align, every other run lives under W/ablations/<name>/seed<k>."""
    seeds = [self.seed + k for k in range(self.ablation_seeds)]
    runs = {name: [os.path.join(self.paths["ablations"], name, f"seed{s}") for s in seeds]
            for name in ("model", *ABLATIONS)}
    runs["model"][0] = self.paths["align"]
    return runs

  def ablation_summary(self) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]] | None]:
    """The ablation table's paired differences averaged over seeds and each configuration's
    spread over its seeds (``pathflip_jax.compare``); (None, None) without ablations."""
    if not self.ablation_seeds:
      return None, None
    from pathflip_jax import compare  # pylint: disable=import-outside-toplevel
    runs = self.ablation_runs()
    comparison = compare.compare_over_seeds(runs["model"],
                                            {n: d for n, d in runs.items() if n != "model"})
    return comparison, {name: compare.seed_summary(dirs) for name, dirs in runs.items()}

  def _ablations_done(self) -> bool:
    return all(_results(d) is not None for dirs in self.ablation_runs().values() for d in dirs)

  def _ablations(self) -> None:
    """The model with more seeds and each ablation with every seed, on the same features;
    evaluated once, at the end, on what the ablation table compares (no references)."""
    args = _args(f"features_dir={self.paths['features']}", f"cohort_dir={self.paths['cohort']}")
    for name, dirs in self.ablation_runs().items():
      for k, workdir in enumerate(dirs):
        if _results(workdir) is not None:
          continue
        overrides = {"seed": self.seed + k}
        if name != "model":
          overrides[ABLATIONS[name]] = False
        config = _config("pathflip_demo", _args(args, self.size_arg), overrides)
        with config.unlocked():
          config.log_steps = config.total_steps   # one evaluation, at the end
        _log(f"ablation {name}, seed {self.seed + k} -> {workdir}")
        from pathflip_jax import train  # pylint: disable=import-outside-toplevel
        train.train_and_evaluate(config, workdir)

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
                                        predictions, features_dir=self.paths["features"],
                                        align_workdir=self.paths["align"])
      with open(os.path.join(self.paths["instruct"], "eval", "vqa_oracle_test.json"), "w",
                encoding="utf-8") as f:
        json.dump(oracle, f, indent=1, sort_keys=True)
    comparison, seeds = self.ablation_summary()
    text = report.render(self.workdir, self.example_slides(), oracle, comparison=comparison,
                         seeds=seeds)
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
    record.update(size=self.size, seed=self.seed, ablation_seeds=self.ablation_seeds)
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
  parser.add_argument("--ablation_seeds", type=int, default=0,
                      help="N > 0: also train the paper's five ablations and the model with N "
                           "seeds each on the same features (W/ablations/) and add the ablation "
                           "table: paired differences averaged over seeds, with intervals")
  args = parser.parse_args(argv)
  from pathflip_jax import compilation_cache  # pylint: disable=import-outside-toplevel
  compilation_cache.enable()
  workdir = os.path.abspath(args.workdir)
  report_path = Quickstart(workdir, args.size, args.seed, args.examples,
                           args.ablation_seeds).run(
      command=["python", "-m", "pathflip_jax.quickstart"] + list(
          sys.argv[1:] if argv is None else argv))
  print(report_path)


if __name__ == "__main__":
  main()
