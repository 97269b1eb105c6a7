"""The tiling job end to end: real slides, real Beam, real ArrayRecord shards."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from data_prep import tile_slides
from pathflip_jax.data import patch_shards, slides, tiling

IN_MEMORY = ["--direct_running_mode=in_memory", "--direct_num_workers=1",
             "--progress_interval=0"]


def _manifest(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def _snapshot(directory):
  """Names and bytes of everything a reader sees."""
  out = {}
  for name in sorted(os.listdir(directory)):
    if name.endswith(".array_record") or name.endswith(".jsonl"):
      out[name] = (directory / name).read_bytes()
  return out


@pytest.fixture
def acceptance_inputs(tmp_path, cmu_slide, slide_dir):
  """The real Aperio slide, a truncated copy, a text file named .svs and an all-white TIFF."""
  shutil.copy(cmu_slide, tmp_path / "cmu.svs")
  data = cmu_slide.read_bytes()
  (tmp_path / "cmu_truncated.svs").write_bytes(data[:len(data) // 2])
  (tmp_path / "report.svs").write_text("Final diagnosis: benign.\n")
  shutil.copy(slide_dir / "white.tif", tmp_path / "white.tif")
  return _manifest(tmp_path / "manifest.jsonl", [
      {"slide_id": "cmu", "path": "cmu.svs", "caption": "Skin.", "split": "test"},
      {"slide_id": "cmu_truncated", "path": "cmu_truncated.svs"},
      {"slide_id": "report", "path": "report.svs"},
      {"slide_id": "white", "path": "white.tif"},
  ])


@pytest.mark.slow
def test_acceptance_real_slide_failures_and_rerun(tmp_path, acceptance_inputs, cmu_slide):
  out = tmp_path / "out"
  # The default runner: DirectRunner in multi-processing mode.
  summary = tile_slides.run(["--manifest", str(acceptance_inputs), "--output_dir", str(out),
                             "--direct_num_workers=2", "--progress_interval=1"])
  assert summary["slides_ok"] == 1 and summary["slides_failed"] == 3

  rows = {r["slide_id"]: r for r in patch_shards.read_slide_index(str(out), include_failed=True)}
  cmu = rows["cmu"]
  with slides.Slide(cmu_slide) as slide:
    plan, _ = tiling.plan_slide(slide, "cmu", tiling.TilingParams())
  assert cmu["num_patches"] == cmu["grid"]["tissue_cells"] == plan.num_patches
  assert cmu["caption"] == "Skin." and cmu["split"] == "test"   # passthrough columns

  source = patch_shards.PatchShards(str(out))
  assert len(source) == cmu["num_patches"]
  start, stop = source.slide_range("cmu")
  got = {(source[i]["x"], source[i]["y"]) for i in range(start, stop)}
  assert got == {tuple(xy) for xy in plan.coords_level0().tolist()}

  failures = patch_shards.read_jsonl(str(out / "failures.jsonl"))
  reasons = {f["slide_id"]: f["reason"] for f in failures}
  assert reasons == {"cmu_truncated": "corrupt_slide", "report": "not_a_slide",
                     "white": "no_tissue"}
  assert all(f["error"] for f in failures)
  assert (out / "thumbnails" / "cmu.png").exists()
  geojson = json.loads((out / "tissue" / "cmu.geojson").read_text())
  xs = [x for f in geojson["features"] for x, _ in f["geometry"]["coordinates"][0]]
  assert 0 <= min(xs) and max(xs) <= 2220  # level-0 pixels

  before = _snapshot(out)
  again = tile_slides.run(["--manifest", str(acceptance_inputs), "--output_dir", str(out),
                           *IN_MEMORY])
  assert _snapshot(out) == before          # the second run adds nothing
  assert again["patches"] == summary["patches"]


def test_csv_manifest_passthrough_and_shards(tmp_path, slide_dir):
  manifest = tmp_path / "m.csv"
  manifest.write_text(
      "slide_id,path,diagnosis,mpp\n"
      f"a,{slide_dir / 'slide20x.tif'},benign,\n"
      f"b,{slide_dir / 'slide40x.tif'},carcinoma,\n"
      f"c,{slide_dir / 'nompp.tif'},benign,0.5\n")
  out = tmp_path / "out"
  summary = tile_slides.run(["--manifest", str(manifest), "--output_dir", str(out),
                             "--slides_per_shard=2", *IN_MEMORY])
  assert summary["slides_ok"] == 3 and summary["shards"] == 2
  assert sorted(os.listdir(out)) == sorted([
      "_state", "failures.jsonl", "patches-00000-of-00002.array_record",
      "patches-00001-of-00002.array_record", "slides.jsonl", "thumbnails", "tiling.json",
      "tissue"])
  index = patch_shards.read_slide_index(str(out))
  assert [r["diagnosis"] for r in index] == ["benign", "carcinoma", "benign"]
  assert index[1]["patch_size_level0"] == 512 and index[1]["level"] == 1
  assert index[2]["mpp_source"] == "manifest"
  assert index[0]["passthrough"] is True

  source = patch_shards.PatchShards(str(out))
  assert len(source) == sum(r["num_patches"] for r in index)
  for row in index:
    start, stop = source.slide_range(row["slide_id"])
    for i in (start, stop - 1):
      patch = source[i]
      assert patch["slide_id"] == row["slide_id"]
      assert patch["patch_size_level0"] == row["patch_size_level0"]
      assert tiling.decode_jpeg(patch["jpeg"]).shape == (256, 256, 3)


def test_interrupted_run_resumes_from_staged_batches(tmp_path, slide_dir, monkeypatch):
  manifest = _manifest(tmp_path / "m.jsonl", [
      {"slide_id": "a", "path": str(slide_dir / "slide20x.tif")},
      {"slide_id": "b", "path": str(slide_dir / "slide40x.tif")}])
  out = tmp_path / "out"
  small_batches = ["--config", "configs/tiling.py:block_patches=2,batch_patches=4"]
  args = ["--manifest", str(manifest), "--output_dir", str(out), *small_batches,
          "--no_passthrough", *IN_MEMORY]

  def crash(self, element):
    raise RuntimeError("killed while packing")
  with monkeypatch.context() as patch:
    patch.setattr(tile_slides.WriteShardFn, "process", crash)
    with pytest.raises(Exception, match="killed while packing"):
      tile_slides.run(args)
  assert patch_shards.list_shards(str(out)) == []      # nothing half-written is visible
  staged = list((out / "_staging").glob("*/*/batch-*.array_record"))
  assert len(staged) > 2
  # A leftover temporary shard, as a kill during the rename window would leave.
  (out / ".patches-00000-of-00001.array_record.inprogress-123").write_bytes(b"partial")

  calls = []
  real_read_batch = tiling.read_batch
  monkeypatch.setattr(tiling, "read_batch",
                      lambda *a, **k: calls.append(1) or real_read_batch(*a, **k))
  summary = tile_slides.run(args)
  assert calls == []                                   # every batch came from staging
  assert summary["slides_ok"] == 2
  assert not (out / ".patches-00000-of-00001.array_record.inprogress-123").exists()
  assert not list((out / "_staging").glob("*/*"))

  fresh = tmp_path / "fresh"
  tile_slides.run(["--manifest", str(manifest), "--output_dir", str(fresh), *small_batches,
                   "--no_passthrough", *IN_MEMORY])
  assert _snapshot(out)["patches-00000-of-00001.array_record"] == \
      _snapshot(fresh)["patches-00000-of-00001.array_record"]


def test_new_slides_and_fixed_failures_go_to_a_new_generation(tmp_path, slide_dir):
  broken = tmp_path / "later.tif"
  broken.write_text("not yet")
  manifest = _manifest(tmp_path / "m.jsonl", [
      {"slide_id": "a", "path": str(slide_dir / "slide20x.tif")},
      {"slide_id": "later", "path": str(broken)}])
  out = tmp_path / "out"
  args = ["--manifest", str(manifest), "--output_dir", str(out), *IN_MEMORY]
  first = tile_slides.run(args)
  assert (first["slides_ok"], first["slides_failed"]) == (1, 1)
  shard0 = (out / "patches-00000-of-00001.array_record").read_bytes()

  shutil.copy(slide_dir / "pen.tif", broken)           # the user fixes the file
  _manifest(manifest, [
      {"slide_id": "a", "path": str(slide_dir / "slide20x.tif")},
      {"slide_id": "later", "path": str(broken)},
      {"slide_id": "new", "path": str(slide_dir / "slide40x.tif")}])
  second = tile_slides.run(args)
  assert (second["slides_ok"], second["slides_failed"]) == (3, 0)
  assert (out / "patches-00000-of-00001.array_record").read_bytes() == shard0
  assert (out / "patches-g001-00000-of-00001.array_record").exists()
  assert patch_shards.read_jsonl(str(out / "failures.jsonl")) == []
  source = patch_shards.PatchShards(str(out))
  ids = [source[i]["slide_id"] for i in range(len(source))]
  assert len(ids) == second["patches"]
  assert sorted(set(ids)) == ["a", "later", "new"]     # no slide twice, none lost
  for slide_id in ("a", "later", "new"):
    start, stop = source.slide_range(slide_id)
    assert set(ids[start:stop]) == {slide_id}


def test_bad_manifest_and_changed_parameters_are_clear_errors(tmp_path, slide_dir):
  manifest = _manifest(tmp_path / "m.jsonl", [{"slide_id": "a"}])
  with pytest.raises(SystemExit, match="m.jsonl:1: missing required column 'path'"):
    tile_slides.run(["--manifest", str(manifest), "--output_dir", str(tmp_path / "o")])
  _manifest(manifest, [{"slide_id": "a", "path": "x.tif"}, {"slide_id": "a", "path": "y.tif"}])
  with pytest.raises(SystemExit, match="m.jsonl:2: slide_id 'a' already used on line 1"):
    tile_slides.run(["--manifest", str(manifest), "--output_dir", str(tmp_path / "o")])
  _manifest(manifest, [{"slide_id": "a", "path": "x.tif", "status": "done"}])
  with pytest.raises(SystemExit, match="column 'status' is written by the job"):
    tile_slides.run(["--manifest", str(manifest), "--output_dir", str(tmp_path / "o")])

  _manifest(manifest, [{"slide_id": "a", "path": str(slide_dir / "slide20x.tif")}])
  out = tmp_path / "out"
  tile_slides.run(["--manifest", str(manifest), "--output_dir", str(out), *IN_MEMORY])
  with pytest.raises(SystemExit, match="target_mpp"):
    tile_slides.run(["--manifest", str(manifest), "--output_dir", str(out),
                     "--target_mpp=1.0", *IN_MEMORY])


def test_grain_workers_read_shards_in_a_fresh_process(tmp_path, slide_dir):
  """grain worker processes crash on unparsed absl flags unless the library handles it; this
  runs in a fresh interpreter without the test suite's setup."""
  manifest = _manifest(tmp_path / "m.jsonl",
                       [{"slide_id": "a", "path": str(slide_dir / "slide20x.tif")}])
  out = tmp_path / "out"
  summary = tile_slides.run(["--manifest", str(manifest), "--output_dir", str(out), *IN_MEMORY])
  script = tmp_path / "read_with_grain.py"
  script.write_text(textwrap.dedent("""
      import sys
      import grain.python as grain
      from pathflip_jax.data import patch_shards, tiling

      class Decode(grain.MapTransform):
        def map(self, record):
          return {"mean": tiling.decode_jpeg(record["jpeg"]).mean(), "x": record["x"]}

      if __name__ == "__main__":
        source = patch_shards.PatchShards(sys.argv[1])
        sampler = grain.IndexSampler(len(source), shard_options=grain.NoSharding(),
                                     shuffle=True, seed=0, num_epochs=1)
        loader = grain.DataLoader(data_source=source, sampler=sampler, operations=[Decode()],
                                  worker_count=2)
        items = list(loader)
        print(len(items), len({i["x"] for i in items}) > 1)
      """))
  result = subprocess.run([sys.executable, str(script), str(out)], capture_output=True,
                          text=True, timeout=300, cwd=str(tmp_path))
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split() == [str(summary["patches"]), "True"]


@pytest.mark.slow
def test_killed_job_resumes_to_the_same_records(tmp_path, slide_dir):
  """SIGKILL the whole job (launcher and Beam worker processes) mid-run, then run it again: the
  result holds exactly the records of an uninterrupted run, and nothing before that is partial."""
  rows = [{"slide_id": name, "path": str(slide_dir / f"{name}.tif")}
          for name in ("slide20x", "slide40x", "pen", "slide40x_flat")]
  manifest = _manifest(tmp_path / "m.jsonl", rows)
  args = ["--config", "configs/tiling.py:block_patches=1,batch_patches=2,slides_per_shard=1",
          "--no_passthrough", "--direct_num_workers=2", "--progress_interval=0"]
  out = tmp_path / "out"
  command = [sys.executable, "-m", "data_prep.tile_slides", "--manifest", str(manifest),
             "--output_dir", str(out), *args]
  process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, cwd=os.getcwd())
  deadline = time.time() + 240
  while time.time() < deadline and process.poll() is None:
    if len(list(out.glob("_staging/*/*/batch-*.array_record"))) >= 3:
      break
    time.sleep(0.05)
  assert process.poll() is None, "the job finished before it could be killed"
  os.killpg(process.pid, signal.SIGKILL)
  process.wait()

  for shard in patch_shards.list_shards(str(out)):   # whatever was committed is whole
    assert sum(1 for _ in patch_shards.read_records(shard)) > 0
  tile_slides.run(["--manifest", str(manifest), "--output_dir", str(out), *args])
  fresh = tmp_path / "fresh"
  tile_slides.run(["--manifest", str(manifest), "--output_dir", str(fresh), *args])

  def records_by_slide(directory):
    source = patch_shards.PatchShards(str(directory))
    out = {}
    for i in range(len(source)):
      patch = source[i]
      out.setdefault(patch["slide_id"], []).append((patch["x"], patch["y"], patch["jpeg"]))
    return out
  resumed, clean = records_by_slide(out), records_by_slide(fresh)
  assert resumed.keys() == clean.keys() == {r["slide_id"] for r in rows}
  for slide_id in clean:
    assert resumed[slide_id] == clean[slide_id], slide_id
