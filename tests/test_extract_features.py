"""The feature extraction job: records per slide, values, corrupt slides, resume after a kill."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from flax import nnx

from data_prep import extract_features
from pathflip_jax import config_args
from pathflip_jax.data import feature_shards, patch_shards, records, tiling
from pathflip_jax.models import vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATCH = 64  # vit_tiny_test's input size
CONFIG = os.path.join(ROOT, "configs", "extract_features.py")


def _config(extra: str = "") -> str:
  return f"{CONFIG}:variant=vit_tiny_test,num_workers=0,batch_size=8,slides_per_shard=2{extra}"


def write_patch_dir(directory, counts, corrupt=(), seed=0):
  """A tiling output directory with ``counts[i]`` patches for slide i (random-texture JPEGs)."""
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  rows, offset = [], 0
  shard = patch_shards.shard_name(0, 1)
  with patch_shards.ShardWriter(os.path.join(directory, shard)) as writer:
    for i, count in enumerate(counts):
      slide_id = f"slide{i}"
      for j in range(count):
        image = rng.integers(0, 255, (PATCH, PATCH, 3), dtype=np.uint8)
        jpeg = tiling.encode_jpeg(image, 90)
        if (slide_id, j) in corrupt:
          jpeg = jpeg[:20] + b"\x00" * 40  # header kept, entropy-coded data gone
        writer.write(records.encode({
            "schema_version": 1, "slide_id": slide_id, "x": 128 * j, "y": 128 * i,
            "col": j, "row": 0, "patch_size": PATCH, "patch_size_level0": 128, "mpp": 0.25,
            "patch_mpp": 0.5, "jpeg": jpeg, "tissue_fraction": 1.0}, records.PATCH))
      rows.append({"slide_id": slide_id, "path": f"/slides/{slide_id}.tif", "status": "ok",
                   "patch_size": PATCH, "patch_size_level0": 128, "mpp": 0.25,
                   "patch_mpp": 0.5, "shard": shard, "shard_offset": offset,
                   "num_patches": count, "diagnosis": f"dx{i % 2}"})
      offset += count
  patch_shards.write_jsonl(os.path.join(directory, patch_shards.SLIDES_FILE), rows)
  return rows


def _reference_features(patches_dir, slide_id):
  """The encoder run directly, unsharded, on the slide's decoded patches."""
  config = config_args.load_config(_config())
  encoder = extract_features.build_encoder(config, PATCH)
  source = patch_shards.PatchShards(patches_dir)
  start, stop = source.slide_range(slide_id)
  images = np.stack([tiling.decode_jpeg(source[i]["jpeg"]) for i in range(start, stop)])
  forward = nnx.jit(lambda model, x: model(vit.normalize(x, encoder.mean, encoder.std,
                                                          np.float32)))
  return np.asarray(forward(encoder.model, images))


def test_one_record_per_slide_with_values_coords_and_labels(tmp_path):
  patches = tmp_path / "patches"
  write_patch_dir(patches, [5, 11, 3])
  out = tmp_path / "features"
  summary = extract_features.run(["--patches", str(patches), "--output_dir", str(out),
                                  "--config", _config(), "--progress_interval", "0"])
  assert summary["slides_written"] == 3 and summary["patches"] == 19
  shards = feature_shards.FeatureShards(str(out))
  assert sorted(shards.slide_ids) == ["slide0", "slide1", "slide2"]
  # slides_per_shard=2: two shards, committed in order
  assert len(feature_shards.list_shards(str(out))) == 2
  record = shards.get("slide1")
  assert record["features"].dtype == np.float16 and record["features"].shape == (11, 32)
  np.testing.assert_array_equal(record["coords"], [(128 * j, 128) for j in range(11)])
  assert record["patch_size_level0"] == 128 and record["mpp"] == 0.25
  assert record["encoder"] == "vit_tiny_test-random-seed0" and len(record["weights_hash"]) == 64
  reference = _reference_features(str(patches), "slide1")
  np.testing.assert_allclose(record["features"].astype(np.float32), reference,
                             rtol=2e-3, atol=2e-3)
  row = next(r for r in shards.rows if r["slide_id"] == "slide1")
  assert row["diagnosis"] == "dx1" and row["num_patches"] == 11 and row["feature_dim"] == 32
  identity = json.load(open(out / feature_shards.CONFIG_FILE))
  assert identity["encoder"] == record["encoder"] and identity["feature_dim"] == 32
  # What inference on a new slide rebuilds the encoder from (the same weights hash).
  assert identity["encoder_config"]["variant"] == "vit_tiny_test"
  assert identity["encoder_config"]["seed"] == 0 and identity["encoder_config"]["checkpoint"] == ""


def test_corrupt_patch_fails_its_slide_only_and_is_retried(tmp_path):
  patches = tmp_path / "patches"
  write_patch_dir(patches, [4, 6, 4], corrupt={("slide1", 2)})
  out = tmp_path / "features"
  args = ["--patches", str(patches), "--output_dir", str(out), "--config", _config(),
          "--progress_interval", "0"]
  summary = extract_features.run(args)
  assert summary["slides_written"] == 2 and summary["slides_failed"] == 1
  failures = patch_shards.read_jsonl(str(out / feature_shards.FAILURES_FILE))
  assert [f["slide_id"] for f in failures] == ["slide1"]
  assert failures[0]["reason"] == "corrupt_patches" and "patch 6" in failures[0]["error"]
  index = {r["slide_id"]: r for r in patch_shards.read_jsonl(str(out / "slides.jsonl"))}
  assert index["slide1"]["status"] == "failed" and index["slide0"]["status"] == "ok"
  # Fix the patch shard; the re-run does only the failed slide.
  write_patch_dir(patches, [4, 6, 4])
  again = extract_features.run(args)
  assert again["slides_written"] == 1 and again["slides_skipped"] == 2
  assert sorted(feature_shards.FeatureShards(str(out)).slide_ids) == ["slide0", "slide1",
                                                                       "slide2"]
  assert patch_shards.read_jsonl(str(out / feature_shards.FAILURES_FILE)) == []


def test_partial_run_then_rest_equals_one_run(tmp_path):
  patches = tmp_path / "patches"
  write_patch_dir(patches, [3, 9, 5, 2])
  base = ["--patches", str(patches), "--config", _config(), "--progress_interval", "0"]
  whole = extract_features.run(base + ["--output_dir", str(tmp_path / "whole")])
  first = extract_features.run(base + ["--output_dir", str(tmp_path / "parts"),
                                       "--limit_slides", "3"])
  rest = extract_features.run(base + ["--output_dir", str(tmp_path / "parts")])
  assert (whole["slides_written"], first["slides_written"], rest["slides_written"]) == (4, 3, 1)
  a = feature_shards.FeatureShards(str(tmp_path / "whole"))
  b = feature_shards.FeatureShards(str(tmp_path / "parts"))
  assert sorted(a.slide_ids) == sorted(b.slide_ids)
  for slide_id in a.slide_ids:
    np.testing.assert_allclose(a.get(slide_id)["features"].astype(np.float32),
                               b.get(slide_id)["features"].astype(np.float32), atol=2e-3)
  # The second run wrote a new generation of shards; nothing of the first was rewritten.
  names = sorted(os.path.basename(p) for p in feature_shards.list_shards(str(tmp_path / "parts")))
  assert names == ["features-g000-00000.array_record", "features-g000-00001.array_record",
                   "features-g001-00000.array_record"]


def test_other_encoder_into_same_directory_is_refused(tmp_path):
  patches = tmp_path / "patches"
  write_patch_dir(patches, [2])
  out = str(tmp_path / "features")
  base = ["--patches", str(patches), "--output_dir", out, "--progress_interval", "0"]
  extract_features.run(base + ["--config", _config()])
  with pytest.raises(SystemExit, match="another encoder"):
    extract_features.run(base + ["--config", _config(",seed=1")])


@pytest.mark.slow
def test_killed_run_resumes_without_duplicates(tmp_path):
  """SIGKILL of the job (and its grain decode workers) mid-run, then a re-run."""
  patches = tmp_path / "patches"
  # 64 one-slide shards: after the first shard appears the job still has about a second of
  # work (measured ~20 ms a slide; its start-up, not the model, dominates each run).
  counts = [8] * 64
  write_patch_dir(patches, counts)
  out = tmp_path / "features"
  command = [sys.executable, "-m", "data_prep.extract_features", "--patches", str(patches),
             "--output_dir", str(out), "--progress_interval", "0", "--config",
             f"{CONFIG}:variant=vit_tiny_test,num_workers=2,batch_size=8,slides_per_shard=1"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  process = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  # Generous: the loop ends at the first shard; a loaded 2-core CI box can take minutes to get
  # there (interpreter start, imports, compiling ViT-S).
  deadline = time.time() + 300
  while time.time() < deadline and process.poll() is None:
    if feature_shards.list_shards(str(out)):
      break
    time.sleep(0.05)
  assert process.poll() is None, process.stderr.read().decode()[-2000:]
  os.killpg(process.pid, signal.SIGKILL)
  process.wait()
  done_before = len(feature_shards.list_shards(str(out)))
  assert 1 <= done_before < len(counts)

  result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert f"{done_before} already done" in result.stderr
  shards = feature_shards.FeatureShards(str(out))
  assert sorted(shards.slide_ids) == sorted(f"slide{i}" for i in range(len(counts)))
  seen = [records.decode(r)["slide_id"] for p in feature_shards.list_shards(str(out))
          for r in patch_shards.read_records(p)]
  assert len(seen) == len(set(seen)) == len(counts)  # no duplicates anywhere on disk
  assert not [n for n in os.listdir(out) if "inprogress" in n]
