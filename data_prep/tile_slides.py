r"""Tiles slides into tissue patches: an Apache Beam job writing ArrayRecord patch shards.

  python -m data_prep.tile_slides --manifest slides.jsonl --output_dir runs/patches \
      [--target_mpp 0.5] [--patch_size 256] [--config configs/tiling.py:arg] \
      [beam pipeline options, e.g. --direct_num_workers 8 or --runner FlinkRunner ...]

One slide is one unit of planning (open, choose the level by mpp, detect tissue, lay out the
grid); its patches are then split into batches that are spread over workers, so a huge slide does
not sit on one worker. Batches are staged under ``_staging/`` as they finish; a slide's batches
are packed into a shard when all are done. A shard is committed by an atomic rename after its
slide rows are written to ``_state/shards/``, so

* a killed run leaves no ``patches-*.array_record`` that is incomplete, and a re-run picks up the
  staged batches and the shards that were committed;
* a re-run over the same output directory skips slides already in a committed shard (it never
  duplicates a record) and retries slides that failed;
* a slide that cannot be tiled (missing, truncated, not a slide, no mpp, no tissue) is written to
  ``failures.jsonl`` with its reason, and every other slide is still tiled.

Outputs (see WORKSPACE.md): ``patches-XXXXX-of-YYYYY.array_record``, ``slides.jsonl``,
``failures.jsonl``, ``thumbnails/<slide>.png`` (patch grid and tissue outline drawn) and
``tissue/<slide>.geojson`` (QuPath annotations, level-0 pixels).

Object stores: the manifest, the slides and ``--output_dir`` may be URLs (``s3://``, ``gs://``),
read and written through ``pathflip_jax.storage`` by the launcher and by every Beam worker
(each worker needs the store's credentials). A slide is read from a copy in the worker's
local cache (size-limited: ``PATHFLIP_CACHE_GB``); a file the job writes to the store is
uploaded whole, so "committed by a rename" becomes "committed by its upload": a shard is
uploaded after its slides' rows, and is whole or absent.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import io
import json
import logging
import os
import re
import sys
import threading
import time
import traceback
from typing import Any, Iterable, Sequence

class _DropApitoolsNotice(logging.Filter):
  """apache_beam's import warns that the optional GCP client libraries are absent."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "apitools not found" not in record.getMessage()


logging.getLogger().addFilter(_DropApitoolsNotice())

import apache_beam as beam  # noqa: E402
import numpy as np  # noqa: E402
from apache_beam.options.pipeline_options import PipelineOptions

from pathflip_jax import config_args
from pathflip_jax import progress as progress_lib
from pathflip_jax import storage
from pathflip_jax.data import manifest as manifest_lib
from pathflip_jax.data import patch_shards, records, slides, tiling

STATE_DIR = "_state"
STAGING_DIR = "_staging"
THUMBNAIL_DIR = "thumbnails"
TISSUE_DIR = "tissue"
CONFIG_FILE = "tiling.json"
# Columns the job writes into slides.jsonl; a manifest may not use them for its own data.
RESERVED_COLUMNS = ("status", "reason", "error", "shard", "shard_offset", "num_patches", "grid",
                    "thumbnail", "tissue_geojson", "width", "height", "level", "patch_mpp",
                    "patch_size", "patch_size_level0")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def slide_key(slide_id: str) -> str:
  """A file-name-safe, collision-free name for a slide id."""
  safe = _UNSAFE.sub("_", slide_id)[:80]
  if safe == slide_id and not safe.startswith("."):
    return safe
  return f"{safe}-{hashlib.sha1(slide_id.encode()).hexdigest()[:8]}"


@dataclasses.dataclass(frozen=True)
class SlideTask:
  """One manifest row, with the shard it is planned into."""

  row: dict[str, Any]
  shard: str
  position: int                      # order of the slide inside its shard

  @property
  def slide_id(self) -> str:
    return self.row["slide_id"]

  @property
  def key(self) -> str:
    return slide_key(self.slide_id)


@dataclasses.dataclass(frozen=True)
class Failure:
  slide_id: str
  path: str
  reason: str
  error: str


@dataclasses.dataclass(frozen=True)
class BatchDone:
  index: int
  path: str
  count: int


@dataclasses.dataclass(frozen=True)
class JobConfig:
  output_dir: str
  params: tiling.TilingParams
  fallback_mpp: float | None


# --------------------------------------------------------------------------- paths and state


def _state(output_dir: str, *parts: str) -> str:
  return storage.join(output_dir, STATE_DIR, *parts)


def _staging(output_dir: str, key: str, *parts: str) -> str:
  return storage.join(output_dir, STAGING_DIR, key, *parts)


def _write_json(path: str, value: Any) -> None:
  storage.write_text(path, json.dumps(value, indent=1))


def _read_json(path: str) -> Any:
  return json.loads(storage.read_text(path))


def _failure_path(output_dir: str, key: str) -> str:
  return _state(output_dir, "failures", f"{key}.json")


def _record_failure(config: JobConfig, task: SlideTask, failure: Failure) -> None:
  _write_json(_failure_path(config.output_dir, task.key), {
      "slide_id": failure.slide_id, "path": failure.path, "reason": failure.reason,
      "error": failure.error})
  storage.remove(_staging(config.output_dir, task.key))


def _failure_from(task: SlideTask, error: BaseException) -> Failure:
  if isinstance(error, slides.SlideError):
    return Failure(task.slide_id, task.row["path"], error.reason, error.message)
  # Anything else is a bug or an unforeseen file problem: keep the job going, keep the trace.
  trace = "".join(traceback.format_exception_only(type(error), error)).strip()
  return Failure(task.slide_id, task.row["path"], "error", f"{task.row['path']}: {trace}")


# --------------------------------------------------------------------------- Beam transforms


class _SlideCache:
  """Keeps a few slides open per worker: consecutive batches often come from the same slide."""

  def __init__(self, size: int = 4):
    self._size = size
    self._open: dict[str, slides.Slide] = {}

  def get(self, path: str, mpp: float | None, fallback_mpp: float | None) -> slides.Slide:
    key = f"{path}|{mpp}|{fallback_mpp}"
    if key not in self._open:
      if len(self._open) >= self._size:
        self._open.pop(next(iter(self._open))).close()
      self._open[key] = slides.Slide(path, mpp=mpp, fallback_mpp=fallback_mpp)
    return self._open[key]


class PlanSlideFn(beam.DoFn):
  """Slide -> its plan (main output) and one element per batch of patches (``batches``)."""

  def __init__(self, config: JobConfig):
    self._config = config

  def process(self, task: SlideTask) -> Iterable[Any]:
    config = self._config
    try:
      with slides.Slide(task.row["path"], mpp=task.row.get("mpp"),
                        fallback_mpp=config.fallback_mpp) as slide:
        plan, pictures = tiling.plan_slide(slide, task.slide_id, config.params)
      digest = tiling.plan_digest(plan)
      png = io.BytesIO()
      tiling.render_thumbnail(plan, pictures).save(png, format="PNG", compress_level=3)
      storage.write_bytes(storage.join(config.output_dir, THUMBNAIL_DIR, f"{task.key}.png"),
                          png.getvalue())
      storage.write_text(storage.join(config.output_dir, TISSUE_DIR, f"{task.key}.geojson"),
                         json.dumps(tiling.tissue_feature_collection(plan, pictures)))
      plan_dir = _staging(config.output_dir, task.key, digest)
      _write_json(storage.join(plan_dir, "plan.json"),
                  {"num_patches": plan.num_patches, "num_batches": plan.num_batches})
    except Exception as e:  # noqa: BLE001 - every failure is reported per slide
      yield task.key, (task, _failure_from(task, e))
      return
    yield task.key, (task, (plan.summary(), plan.num_batches, digest))
    for index in range(plan.num_batches):
      yield beam.pvalue.TaggedOutput("batches", (task, _batch_plan(plan, index), index, digest))


def _batch_plan(plan: tiling.SlidePlan, index: int) -> tiling.SlidePlan:
  """The plan restricted to one batch: what a worker needs to cut it, and no more."""
  cells, fractions = plan.batch_cells(index)
  return dataclasses.replace(plan, cells=cells, fractions=fractions,
                             batch_starts=np.array([0, len(cells)]))


class TileBatchFn(beam.DoFn):
  """Cuts one batch of patches and stages it as an ArrayRecord file (skipped if staged)."""

  def __init__(self, config: JobConfig):
    self._config = config
    self._cache = None

  def setup(self) -> None:
    self._cache = _SlideCache()

  def process(self, element) -> Iterable[Any]:
    task, plan, index, digest = element
    config = self._config
    path = _staging(config.output_dir, task.key, digest,
                    f"batch-{index:05d}-n{plan.num_patches:05d}.array_record")
    if storage.exists(path):  # staged by an earlier, interrupted run
      yield task.key, BatchDone(index, path, plan.num_patches)
      return
    try:
      slide = None
      if not plan.passthrough:
        slide = self._cache.get(task.row["path"], task.row.get("mpp"), config.fallback_mpp)
      patches = tiling.read_batch(slide, plan, 0, config.params)
      with patch_shards.ShardWriter(path) as writer:
        for patch in patches:
          writer.write(records.encode(patch, records.PATCH))
    except Exception as e:  # noqa: BLE001
      yield task.key, _failure_from(task, e)
      return
    yield task.key, BatchDone(index, path, len(patches))


class FinalizeSlideFn(beam.DoFn):
  """Joins a slide's plan with its batches: a complete slide goes on to its shard, a slide with
  any failure is recorded in the failure state."""

  def __init__(self, config: JobConfig):
    self._config = config

  def process(self, element) -> Iterable[Any]:
    key, grouped = element
    (task, outcome), = grouped["plan"]
    if isinstance(outcome, Failure):
      _record_failure(self._config, task, outcome)
      return
    summary, num_batches, _ = outcome
    batches = list(grouped["batches"])
    failures = [b for b in batches if isinstance(b, Failure)]
    if failures:
      _record_failure(self._config, task, failures[0])
      return
    done = sorted({b.index: b for b in batches}.values(), key=lambda b: b.index)
    if [b.index for b in done] != list(range(num_batches)):
      _record_failure(self._config, task, Failure(
          task.slide_id, task.row["path"], "error",
          f"{task.row['path']}: {len(done)} of {num_batches} batches came back"))
      return
    yield task.shard, (task, summary, [b.path for b in done], sum(b.count for b in done))


class WriteShardFn(beam.DoFn):
  """Packs the staged batches of a shard's slides into the shard, then commits it."""

  def __init__(self, config: JobConfig):
    self._config = config

  def process(self, element) -> Iterable[int]:
    shard, slides_done = element
    out_dir = self._config.output_dir
    final = storage.join(out_dir, shard)
    sidecar = _state(out_dir, "shards", f"{shard}.jsonl")
    if storage.exists(final):  # a retried bundle: already committed
      return
    rows = []
    with patch_shards.ShardWriter(final) as writer:
      for task, summary, batch_paths, count in sorted(slides_done, key=lambda s: s[0].position):
        offset = writer.count
        for batch_path in batch_paths:
          for data in patch_shards.read_records(batch_path):
            writer.write(data)
        if writer.count - offset != count:
          raise RuntimeError(f"{shard}: slide {task.slide_id} staged {writer.count - offset} "
                             f"records, expected {count}")
        rows.append(_slide_row(task, summary, shard, offset))
      patch_shards.write_jsonl(sidecar, rows)
    # The shard is committed (renamed, or uploaded); its slides' staging and old failures can go.
    for task, *_ in slides_done:
      storage.remove(_staging(out_dir, task.key))
      storage.remove(_failure_path(out_dir, task.key))
    yield len(rows)


def _slide_row(task: SlideTask, summary: dict[str, Any], shard: str, offset: int) -> dict:
  passthrough = {k: v for k, v in task.row.items() if k not in ("slide_id", "path", "mpp")}
  return {"slide_id": task.slide_id, "path": task.row["path"], "status": "ok", **summary,
          "shard": shard, "shard_offset": offset,
          "thumbnail": f"{THUMBNAIL_DIR}/{task.key}.png",
          "tissue_geojson": f"{TISSUE_DIR}/{task.key}.geojson", **passthrough}


def build_pipeline(pipeline: beam.Pipeline, tasks: Sequence[SlideTask], config: JobConfig):
  """The tiling graph: plan slides, cut batches, join per slide, pack per shard."""
  planned = (
      pipeline
      | "Slides" >> beam.Create(tasks)
      | "SpreadSlides" >> beam.Reshuffle()
      | "Plan" >> beam.ParDo(PlanSlideFn(config)).with_outputs("batches", main="plans"))
  batches = (
      planned.batches
      | "SpreadBatches" >> beam.Reshuffle()
      | "Tile" >> beam.ParDo(TileBatchFn(config)))
  return (
      {"plan": planned.plans, "batches": batches}
      | "JoinSlide" >> beam.CoGroupByKey()
      | "Finalize" >> beam.ParDo(FinalizeSlideFn(config))
      | "GroupShard" >> beam.GroupByKey()
      | "WriteShard" >> beam.ParDo(WriteShardFn(config)))


# --------------------------------------------------------------------------- planning runs


def _check_output_config(output_dir: str, params: tiling.TilingParams) -> None:
  """A directory holds patches of one set of parameters; a mismatch is an error, not a mix."""
  path = storage.join(output_dir, CONFIG_FILE)
  wanted = {"schema_version": records.SCHEMA_VERSION, "params": params.fingerprint()}
  if storage.exists(path):
    existing = _read_json(path)
    if existing != json.loads(json.dumps(wanted)):
      diff = {k: (existing.get("params", {}).get(k), v) for k, v in wanted["params"].items()
              if existing.get("params", {}).get(k) != v}
      raise SystemExit(f"{output_dir} was tiled with other parameters (existing, requested): "
                       f"{diff}; use another --output_dir")
  else:
    _write_json(path, wanted)


def _clean_interrupted(output_dir: str) -> None:
  """Removes what a killed run can leave: temporary shards (local; an upload is whole or absent)
  and orphaned shard sidecars."""
  if not storage.is_url(output_dir):
    for tmp in glob.glob(os.path.join(output_dir, ".patches-*.inprogress-*")):
      os.remove(tmp)
    for tmp in glob.glob(os.path.join(output_dir, STAGING_DIR, "*", "*",
                                      ".batch-*.inprogress-*")):
      os.remove(tmp)
  present = set(storage.listdir(output_dir))
  for name in storage.listdir(_state(output_dir, "shards")):
    if name.endswith(".jsonl") and name[:-len(".jsonl")] not in present:
      storage.remove(_state(output_dir, "shards", name))


def _row_key(row: dict) -> str:
  return slide_key(row["slide_id"])


def _committed_rows(output_dir: str) -> dict[str, dict]:
  rows = {}
  for name in storage.listdir(_state(output_dir, "shards")):
    if name.endswith(".jsonl"):
      for row in patch_shards.read_jsonl(_state(output_dir, "shards", name)):
        rows[row["slide_id"]] = row
  return rows


def plan_run(output_dir: str, rows: Sequence[dict], slides_per_shard: int) -> list[SlideTask]:
  """Decides what this run must do and which shard each slide goes to.

  A slide's home is the newest generation plan that lists it. If that plan's shard is committed
  and holds the slide, the slide is done; if the shard is not committed yet (an interrupted run),
  the slide is redone into that same shard; if the shard was committed without it (it failed),
  the slide is retried in a new generation, as are slides no plan lists.
  """
  plans = {}
  for name in storage.listdir(_state(output_dir)):
    if name.startswith("plan-g") and name.endswith(".json"):
      plan = _read_json(_state(output_dir, name))
      plans[plan["generation"]] = plan
  home: dict[str, tuple[str, int]] = {}
  for generation in sorted(plans):
    for shard, slide_ids in plans[generation]["shards"].items():
      for position, slide_id in enumerate(slide_ids):
        home[slide_id] = (shard, position)
  committed = _committed_rows(output_dir)
  present = set(storage.listdir(output_dir))
  tasks, fresh = [], []
  for row in rows:
    slide_id = row["slide_id"]
    if slide_id in committed:
      continue
    placed = home.get(slide_id)
    if placed and placed[0] not in present:
      tasks.append(SlideTask(row, *placed))
    else:
      fresh.append(row)
  if fresh:
    generation = max(plans, default=-1) + 1
    count = -(-len(fresh) // slides_per_shard)
    shards: dict[str, list[str]] = {}
    for index in range(count):
      name = patch_shards.shard_name(index, count, generation)
      members = fresh[index * slides_per_shard:(index + 1) * slides_per_shard]
      shards[name] = [r["slide_id"] for r in members]
      tasks += [SlideTask(r, name, p) for p, r in enumerate(members)]
    _write_json(_state(output_dir, f"plan-g{generation:03d}.json"),
                {"generation": generation, "shards": shards})
  return tasks


def write_indexes(output_dir: str, rows: Sequence[dict]) -> tuple[list[dict], list[dict]]:
  """Rebuilds slides.jsonl and failures.jsonl from the committed shards and failure state."""
  committed = _committed_rows(output_dir)
  failed = set(storage.listdir(_state(output_dir, "failures")))
  slide_rows, failure_rows = [], []
  listed = set()
  for row in rows:
    slide_id = row["slide_id"]
    listed.add(slide_id)
    if slide_id in committed:
      slide_rows.append(committed[slide_id])
      continue
    failure_path = _failure_path(output_dir, slide_key(slide_id))
    extra = {k: v for k, v in row.items() if k not in ("slide_id", "path", "mpp")}
    if f"{slide_key(slide_id)}.json" in failed:
      failure = _read_json(failure_path)
      failure_rows.append(failure)
      slide_rows.append({"slide_id": slide_id, "path": row["path"], "status": "failed",
                         "reason": failure["reason"], "error": failure["error"], **extra})
    else:
      slide_rows.append({"slide_id": slide_id, "path": row["path"], "status": "pending", **extra})
  # Slides tiled by earlier runs but no longer in the manifest keep their rows: their records are
  # still in the shards.
  slide_rows += [r for s, r in committed.items() if s not in listed]
  patch_shards.write_jsonl(storage.join(output_dir, patch_shards.SLIDES_FILE), slide_rows)
  patch_shards.write_jsonl(storage.join(output_dir, patch_shards.FAILURES_FILE), failure_rows)
  return slide_rows, failure_rows


# --------------------------------------------------------------------------- progress


class Progress(threading.Thread):
  """Prints patches cut / estimated total, slides done, patches/s and ETA by watching the output
  directory, which works whatever runner executes the pipeline, as long as the directory is
  shared."""

  def __init__(self, output_dir: str, tasks: Sequence[SlideTask], interval: float = 5.0,
               stream=None):
    super().__init__(daemon=True)
    self._dir = output_dir
    self._keys = {t.key for t in tasks}
    self._interval = interval
    self._stop = threading.Event()
    self._start = time.time()
    self._failed_before = set(storage.listdir(_state(output_dir, "failures")))
    # Patches of slides staged by an interrupted run are not this run's work: not in the rate.
    self._progress = progress_lib.Progress(None, "patches", "tile_slides", interval,
                                           start=self._count()[1], stream=stream)

  def _count(self) -> tuple[int, int, int, int]:
    """(slides done, patches cut, patches planned, slides planned or failed) for this run."""
    done = cut = planned = planned_slides = 0
    committed = {_row_key(r): r["num_patches"]
                 for r in _committed_rows(self._dir).values()} if self._keys else {}
    failed = set(storage.listdir(_state(self._dir, "failures")))
    for key in self._keys:
      if key in committed:
        done += 1
        cut += committed[key]
        planned += committed[key]
        planned_slides += 1
        continue
      if f"{key}.json" in failed and self._failed_now(key):
        done += 1
        planned_slides += 1
        continue
      for digest in storage.listdir(_staging(self._dir, key)):
        try:
          plan = _read_json(_staging(self._dir, key, digest, "plan.json"))
          names = storage.listdir(_staging(self._dir, key, digest))
        except (OSError, ValueError):
          continue  # not planned yet, or committed and cleaned up meanwhile
        planned += plan["num_patches"]
        planned_slides += 1
        counts = [int(n.split("-n")[1].split(".")[0]) for n in names
                  if n.startswith("batch-") and n.endswith(".array_record")]
        cut += sum(counts)
        done += len(counts) == plan["num_batches"]
    return done, cut, planned, planned_slides

  def _failed_now(self, key: str) -> bool:
    """Whether a slide's failure record is this run's (locally by its time; on a store, one
    that was not there when the run started)."""
    failure = _failure_path(self._dir, key)
    if storage.is_url(self._dir):
      return f"{key}.json" not in self._failed_before
    return os.path.exists(failure) and os.path.getmtime(failure) >= self._start

  def report(self) -> None:
    """Counts what is on disk now and prints the line."""
    done, cut, planned, planned_slides = self._count()
    # Slides not planned yet are guessed at the mean of the planned ones.
    self._progress.total = round(planned + (len(self._keys) - planned_slides) * (
        planned / planned_slides)) if planned_slides else None
    self._progress.update(cut, force=True, slides=f"{done}/{len(self._keys)}")

  def run(self) -> None:
    while not self._stop.wait(self._interval):
      self.report()

  def stop(self) -> None:
    self._stop.set()


# --------------------------------------------------------------------------- entry point


def _parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  parser = argparse.ArgumentParser(
      prog="python -m data_prep.tile_slides", description=__doc__.split("\n\n")[0],
      epilog="Other arguments are Apache Beam pipeline options (--runner, --direct_num_workers, "
             "--direct_running_mode, Dataflow/Flink/Spark options).")
  parser.add_argument("--manifest", required=True, help="JSONL or CSV with slide_id and path")
  parser.add_argument("--output_dir", required=True)
  parser.add_argument("--config", default=None,
                      help="configs/tiling.py[:key=value,...]; flags below override it")
  parser.add_argument("--target_mpp", type=float)
  parser.add_argument("--patch_size", type=int)
  parser.add_argument("--min_tissue_fraction", type=float)
  parser.add_argument("--mpp_tolerance", type=float)
  parser.add_argument("--jpeg_quality", type=int)
  parser.add_argument("--batch_patches", type=int)
  parser.add_argument("--slides_per_shard", type=int)
  parser.add_argument("--no_passthrough", action="store_true",
                      help="always decode and re-encode, never copy native JPEG tiles")
  parser.add_argument("--fallback_mpp", type=float,
                      help="µm/px for slides whose files have none (and no manifest mpp)")
  parser.add_argument("--progress_interval", type=float, default=5.0,
                      help="seconds between progress lines (0 turns them off)")
  return parser.parse_known_args(argv)


def _resolve_params(args: argparse.Namespace) -> tuple[tiling.TilingParams, int]:
  if args.config:
    config = config_args.load_config(args.config)
  else:
    import configs.tiling as default_config  # noqa: PLC0415 - repo-root package
    config = default_config.get_config()
  values = dict(config.to_dict())
  for key in list(values):
    flag = getattr(args, key, None)
    if flag is not None:
      values[key] = flag
  if args.no_passthrough:
    values["passthrough"] = False
  slides_per_shard = int(values.pop("slides_per_shard"))
  if slides_per_shard < 1:
    raise SystemExit("--slides_per_shard must be >= 1")
  unknown = set(values) - {f.name for f in dataclasses.fields(tiling.TilingParams)}
  if unknown:
    raise SystemExit(f"config keys not understood by the tiling job: {sorted(unknown)}")
  params = tiling.TilingParams(**values)
  try:
    params.validate()
  except ValueError as e:
    raise SystemExit(f"invalid tiling parameters: {e}") from None
  return params, slides_per_shard


def _pipeline_options(beam_args: list[str]) -> PipelineOptions:
  """Beam options from the command line; the local default is the DirectRunner in
  multi-processing mode with one worker per core."""
  given = PipelineOptions(beam_args).get_all_options()
  defaults = {}
  if given.get("runner") in (None, "DirectRunner"):
    if not any(a.startswith("--direct_running_mode") for a in beam_args):
      defaults["direct_running_mode"] = "multi_processing"
    if not any(a.startswith("--direct_num_workers") for a in beam_args):
      defaults["direct_num_workers"] = os.cpu_count() or 1
  if not any(a.startswith("--default_sdk_harness_log_level") for a in beam_args):
    # Failures are reported per slide by the job itself; worker chatter below ERROR is noise.
    defaults["default_sdk_harness_log_level"] = "ERROR"
  return PipelineOptions(beam_args, **defaults)


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the job; returns a summary (slides ok / failed / pending, patches, seconds)."""
  args, beam_args = _parse_args(sys.argv[1:] if argv is None else argv)
  params, slides_per_shard = _resolve_params(args)
  try:
    storage.check_reachable(args.manifest, "--manifest", must_exist=True)
    storage.check_reachable(args.output_dir, "--output_dir")
    rows = manifest_lib.read_manifest(args.manifest, reserved=RESERVED_COLUMNS)
  except manifest_lib.ManifestError as e:
    raise SystemExit(f"manifest error: {e}") from None
  except (storage.StorageError, FileNotFoundError) as e:
    raise SystemExit(f"[tile_slides] {e}") from None
  output_dir = storage.absolute(args.output_dir)
  storage.check_reachable(output_dir, "--output_dir")
  storage.makedirs(output_dir)
  _check_output_config(output_dir, params)
  _clean_interrupted(output_dir)
  tasks = plan_run(output_dir, rows, slides_per_shard)
  config = JobConfig(output_dir=output_dir, params=params, fallback_mpp=args.fallback_mpp)
  start = time.time()
  print(f"[tile_slides] {len(rows)} slides in the manifest, {len(rows) - len(tasks)} already "
        f"tiled, {len(tasks)} to do -> {output_dir}", file=sys.stderr, flush=True)
  if tasks:
    progress = None
    if args.progress_interval > 0:
      progress = Progress(output_dir, tasks, args.progress_interval)
      progress.start()
    try:
      with beam.Pipeline(options=_pipeline_options(beam_args)) as pipeline:
        build_pipeline(pipeline, tasks, config)
    finally:
      if progress:
        progress.stop()
        progress.report()
  slide_rows, failure_rows = write_indexes(output_dir, rows)
  staging = os.path.join(output_dir, STAGING_DIR)
  if not storage.is_url(output_dir) and os.path.isdir(staging) and not os.listdir(staging):
    os.rmdir(staging)
  ok = [r for r in slide_rows if r["status"] == "ok"]
  summary = {
      "output_dir": output_dir, "slides_ok": len(ok), "slides_failed": len(failure_rows),
      "slides_pending": sum(r["status"] == "pending" for r in slide_rows),
      "patches": sum(r["num_patches"] for r in ok),
      "shards": len(patch_shards.list_shards(output_dir)), "seconds": round(time.time() - start, 1)}
  print(f"[tile_slides] done in {summary['seconds']}s: {summary['slides_ok']} slides tiled "
        f"({summary['patches']:,} patches in {summary['shards']} shards), "
        f"{summary['slides_failed']} failed -> {output_dir}", file=sys.stderr)
  for failure in failure_rows:
    print(f"[tile_slides]   failed {failure['slide_id']}: {failure['reason']}: "
          f"{failure['error']}", file=sys.stderr)
  print(f"[tile_slides] outputs: {output_dir}/patches-*.array_record, slides.jsonl, "
        f"failures.jsonl, {THUMBNAIL_DIR}/<slide>.png, {TISSUE_DIR}/<slide>.geojson",
        file=sys.stderr)
  return summary


def main() -> None:
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s:%(name)s:%(message)s")
  # The local job service re-logs every worker message at WARNING; the job reports per slide.
  logging.getLogger("apache_beam").setLevel(logging.ERROR)
  run()


if __name__ == "__main__":
  # Run through the importable module, not __main__: Beam pickles this module's classes by
  # reference, and worker processes must find them as data_prep.tile_slides.*.
  from data_prep import tile_slides
  tile_slides.main()
