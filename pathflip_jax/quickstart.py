r"""The whole demo in one command: cohort -> tiles -> patch encoder -> features -> PathFLIP ->
decoder -> evaluation -> REPORT.md.

  python -m pathflip_jax.quickstart --workdir runs/quickstart [--size demo|test] [--seed 0]
      [--joint]

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

``--joint`` adds four stages (W/joint/) for the opt-in joint-space recipe. It is not the paper's
model: slide and region tokens start in the joint image-text space of the patch encoder trained 8x
longer, named negatives drop a subcaption whose tissue the slide's own caption names, regions are
single patches, and the text-conditioned attention adds, to its value path (value projection random,
output projection 0 at the start), the identity path behind a per-head gate that starts at 0. It
starts the attention in that joint space: the Q-Former's text branch is the encoder's text tower,
frozen (``lock_text``); the attention has one head whose query and key projections start at the
identity (``identity_qk``; the region loss trains them, ``hold_match=False``), and it reads each
region's own patches before the slide context (``local_attention``). The heatmap reads each
region's contribution to the match of a text and its text-conditioned embedding. A slide's own
subcaptions that name disjoint tissues are negatives for each other (``within_negatives=1``). That
patch encoder does not count another sentence of the same tissue type as a negative
(``tissue_negatives=False``) (docs/experiments/localization.md, "Starting from the patch encoder's
joint space" to "The match trained again, read by contribution"):

  8  joint_patch_clip  the patch encoder trained 8x longer     W/joint/patch_clip
  9  joint_features    its features                            W/joint/features
  10 joint_align       the recipe (evaluators as stage 5)      W/joint/align
  11 joint_ablation    the same with region_loss=False         W/joint/align_no_region_loss

The report, then stage 12, adds a table: the recipe beside its no-region-loss ablation and the
paper's model, on the same test slides. Only the region loss trains the value path, its gate and
the match, so without it the text-conditioned embedding stays empty and the ablation's heatmap is
flat (0.500). Stage 10's model is its checkpoint that localizes best on the val split's label
maps, scored every 50 steps (``select_split=val``), so the test split chooses nothing. Measured
(mean lesion AUROC, test splits, stages 1-2 and 8-11 of this command, 16 cohort seeds on 2-core
machines, 2026-12-03 and 04; README, "The opt-in joint-space recipe", has the table): the recipe
scores 0.851-0.975 (mean 0.926), at least 0.85 on all 16, two of them cohorts made to check it
after it was chosen (0.934, 0.975); with lr 1e-4 and the last step, what this ran before,
0.802-0.974 and 13 of 16. The patch encoder's own alignment scores higher on 11 of them (mean
0.941). Zero-shot diagnosis (chance 0.25) is 0.17-0.88 from 10-14 test slides; ``--joint`` is for
localization. The 1920-step encoder takes 14-49 min of the command on 2 cores.

``--size test`` runs the same stages with a 12-slide cohort and tiny models in about a minute
(what the test suite and the quickstart Colab run); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable

SIZES = {
    # size: (cohort slides, patch_clip args, align args, instruct args)
    "demo": (48, "", "", ""),
    "test": (12, "size=test,total_steps=4,batch_size=16,log_steps=4",
             "size=test,total_steps=4,log_steps=4",
             "size=test,total_steps=4,log_steps=4,caption_tokens=16,answer_tokens=4"),
}
# The joint-space recipe's align args, the same at every size.
JOINT_RECIPE = ("feature_shortcut=True,named_negatives=True,slide_weight=2,region_patches=1,"
                "value_gate=True,zero_output=True,lock_text=True,identity_qk=True,"
                "hold_match=False,local_attention=True,within_negatives=1")
# Per size: (patch_clip args, align args beside the size's own and JOINT_RECIPE). The run's
# model is its checkpoint that localizes best on the val split (select_split).
JOINT = {
    "demo": ("total_steps=1920,tissue_negatives=False", "lr=5e-5,select_split=val"),
    "test": ("size=test,total_steps=8,batch_size=16,log_steps=8,tissue_negatives=False",
             "select_split=val,select_every=2"),
}
EXAMPLE_QUERIES = ("invasive carcinoma with large pleomorphic hyperchromatic nuclei and "
                   "prominent nucleoli",
                   "tumour necrosis with pale eosinophilic debris and scattered nuclear fragments",
                   "benign glands with round lumina and regularly spaced basal nuclei")
EXAMPLE_QUESTIONS = ("What is the most likely diagnosis for this slide?",
                     "Which tissue types are present on the slide?")


def _log(message: str) -> None:
  print(f"[quickstart] {message}", file=sys.stderr, flush=True)


def _config(name: str, args: str):
  from pathflip_jax import config_args  # pylint: disable=import-outside-toplevel
  path = os.path.join(_configs_dir(), f"{name}.py")
  return config_args.load_config(f"{path}:{args}" if args else path)


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
               joint: bool = False):
    if size not in SIZES:
      raise ValueError(f"--size {size!r}: expected one of {sorted(SIZES)}")
    self.workdir = os.path.abspath(workdir)
    self.size, self.seed, self.num_examples = size, seed, num_examples
    self.num_slides, self.patch_args, self.align_args, self.instruct_args = SIZES[size]
    self.paths = {name: os.path.join(self.workdir, name) for name in
                  ("cohort", "patches", "patch_clip", "features", "align", "instruct",
                   "examples")}
    self.paths.update({f"joint_{name}": os.path.join(self.workdir, "joint", name) for name in
                       ("patch_clip", "features", "align", "align_no_region_loss")})
    self.stages: list[tuple[str, Callable[[], bool], Callable[[], None]]] = [
        ("cohort", self._cohort_done, self._cohort),
        ("tiles", self._tiles_done, self._tiles),
        ("patch_clip", lambda: _results(self.paths["patch_clip"]) is not None,
         lambda: self._patch_clip(self.patch_args, self.paths["patch_clip"])),
        ("features", lambda: self._features_done(self.paths["features"]),
         lambda: self._features(self.paths["patch_clip"], self.paths["features"])),
        ("align", lambda: _results(self.paths["align"]) is not None, self._align),
        ("instruct", lambda: _results(self.paths["instruct"]) is not None, self._instruct),
        ("heatmaps", self._examples_done, self._examples),
    ]
    if joint:
      self.stages += [
          ("joint_patch_clip", lambda: _results(self.paths["joint_patch_clip"]) is not None,
           lambda: self._patch_clip(JOINT[size][0], self.paths["joint_patch_clip"])),
          ("joint_features", lambda: self._features_done(self.paths["joint_features"]),
           lambda: self._features(self.paths["joint_patch_clip"], self.paths["joint_features"])),
          ("joint_align", lambda: _results(self.paths["joint_align"]) is not None,
           lambda: self._joint_align(region_loss=True)),
          ("joint_ablation", lambda: _results(self.paths["joint_align_no_region_loss"]) is not None,
           lambda: self._joint_align(region_loss=False)),
      ]
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
    train.train_and_evaluate(_config(name, args), workdir)

  def _patch_clip(self, args: str, workdir: str) -> None:
    self._train("patch_clip_demo", _args(f"cohort_dir={self.paths['cohort']}",
                                         f"patches_dir={self.paths['patches']}",
                                         f"seed={self.seed}", args), workdir)

  def _features_done(self, features_dir: str) -> bool:
    from pathflip_jax.data import feature_shards, patch_shards  # pylint: disable=import-outside-toplevel
    try:
      done = feature_shards.committed_rows(features_dir)
    except FileNotFoundError:
      return False
    tiled = patch_shards.read_slide_index(self.paths["patches"])
    return bool(done) and all(r["slide_id"] in done for r in tiled)

  def _features(self, patch_clip_dir: str, features_dir: str) -> None:
    from data_prep import extract_features  # pylint: disable=import-outside-toplevel
    extract_features.run(["--patches", self.paths["patches"], "--output_dir", features_dir,
                          "--config", os.path.join(_configs_dir(), "extract_features.py")
                          + f":checkpoint={patch_clip_dir}",
                          "--progress_interval", "10"])

  def align_config_args(self) -> str:
    return _args(f"features_dir={self.paths['features']}", f"cohort_dir={self.paths['cohort']}",
                 f"reference={self.paths['patch_clip']}", "probe_label=biomarker",
                 f"seed={self.seed}", self.align_args)

  def _align(self) -> None:
    self._train("pathflip_demo", self.align_config_args(), self.paths["align"])

  def _joint_align(self, region_loss: bool) -> None:
    patch_clip = self.paths["joint_patch_clip"]
    args = _args(f"features_dir={self.paths['joint_features']}",
                 f"cohort_dir={self.paths['cohort']}", f"reference={patch_clip}",
                 f"text_init={patch_clip}", f"seed={self.seed}", self.align_args,
                 JOINT_RECIPE, JOINT[self.size][1],
                 "" if region_loss else "region_loss=False")
    self._train("pathflip_demo", args, self.paths["joint_align" if region_loss
                                                  else "joint_align_no_region_loss"])

  def _instruct(self) -> None:
    self._train("pathflip_instruct_demo",
                _args(f"align_workdir={self.paths['align']}",
                      f"questions={os.path.join(self.paths['cohort'], 'questions.csv')}",
                      f"seed={self.seed}", self.instruct_args),
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
  def run(self) -> str:
    os.makedirs(self.workdir, exist_ok=True)
    start = time.time()
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
  parser.add_argument("--joint", action="store_true",
                      help="also train the opt-in joint-space recipe and its no-region-loss "
                           "ablation (W/joint/; about an hour more on 2 CPU cores, most of it "
                           "the 1920-step patch encoder)")
  args = parser.parse_args(argv)
  from pathflip_jax import compilation_cache  # pylint: disable=import-outside-toplevel
  compilation_cache.enable()
  workdir = os.path.abspath(args.workdir)
  report_path = Quickstart(workdir, args.size, args.seed, args.examples,
                           joint=args.joint).run()
  print(report_path)


if __name__ == "__main__":
  main()
