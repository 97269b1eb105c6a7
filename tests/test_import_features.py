"""data_prep.import_features: TRIDENT / CLAM / SlideChat files in their real layouts -> shards."""

import csv
import json
import os

import h5py
import numpy as np
import pytest

from data_prep import import_features
from pathflip_jax.data import feature_shards

D = 8


def _features(n, seed=0, scale=3.0):
  return (np.random.default_rng(seed).standard_normal((n, D)) * scale).astype(np.float32)


def _trident_attrs(name):
  # What trident.IO.coords_to_h5 puts on 'coords' (20x, 256 px patches of a 40x scan).
  return {"patch_size": 256, "patch_size_level0": 512, "level0_magnification": 40,
          "target_magnification": 20, "overlap": 0, "name": name, "savetodir": "/job/20x",
          "level0_width": 40000, "level0_height": 30000}


def write_h5(path, features, coords, coords_attrs=None, features_attrs=None, chunks=1):
  """save_h5 / save_hdf5 layout: resizable datasets, attributes on the datasets."""
  with h5py.File(path, "w") as f:
    fd = f.create_dataset("features", data=features, maxshape=(None,) + features.shape[1:],
                          chunks=(chunks,) + features.shape[1:])
    cd = f.create_dataset("coords", data=coords, maxshape=(None,) + coords.shape[1:],
                          chunks=(chunks,) + coords.shape[1:])
    for key, value in (coords_attrs or {}).items():
      cd.attrs[key] = value
    for key, value in (features_attrs or {}).items():
      fd.attrs[key] = value
  return path


def write_trident(folder, name, n=5, seed=0, **kw):
  coords = (np.stack([np.arange(n), np.arange(n) % 3], axis=1) * 512 + 1000).astype(np.int64)
  feats = _features(n, seed)
  write_h5(folder / f"{name}.h5", feats, coords, kw.pop("coords_attrs", _trident_attrs(name)),
           {"name": name, "savetodir": str(folder)}, **kw)
  return feats, coords


def write_clam(folder, name, n=6, seed=1):
  coords = (np.stack([np.arange(n) * 256, np.full(n, 768)], axis=1)).astype(np.int32)
  feats = _features(n, seed)
  write_h5(folder / f"{name}.h5", feats, coords, chunks=32)  # extract_features_fp: no attrs
  return feats, coords


def write_slidechat(path, n=7, seed=2, names=True, cells=None):
  """SlideChat's release: header 0..D-1,patch_name; 4-decimal features; <col>_<row>.jpeg."""
  feats = np.round(_features(n, seed), 4)
  grid = np.stack([np.arange(n) + 100, np.arange(n) % 2 + 53], axis=1)
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow([str(i) for i in range(D)] + (["patch_name"] if names else []))
    for k in range(n):
      row = [f"{v:.4f}" for v in feats[k]] + ([f"{grid[k, 0]}_{grid[k, 1]}.jpeg"] if names else [])
      for (r, c), value in (cells or {}).items():
        if r == k:
          row[c] = value
      w.writerow(row)
  return feats, grid


def run(out, *args):
  return import_features.run([*map(str, args), "--output_dir", str(out),
                              "--progress_interval", "0"])


def assert_features(record, feats):
  assert record["features"].dtype == np.float16 and record["features"].shape == feats.shape
  np.testing.assert_allclose(record["features"].astype(np.float32), feats, rtol=1e-3, atol=1e-4)


def shard_bytes(out):
  return {p: open(p, "rb").read() for p in feature_shards.list_shards(str(out))}


# --------------------------------------------------------------------------- formats


def test_trident_attrs_give_footprint_and_mpp(tmp_path):
  inp = tmp_path / "20x_256px_0px_overlap" / "features_uni_v1"
  inp.mkdir(parents=True)
  fa, ca = write_trident(inp, "TCGA-A", n=5, seed=0)
  fb, cb = write_trident(inp, "TCGA-B", n=3, seed=1)
  manifest = tmp_path / "labels.csv"
  manifest.write_text("slide_id,mpp,diagnosis\nTCGA-B,0.2631,carcinoma\n")
  out = tmp_path / "feats"
  summary = run(out, "--format", "trident", "--input", inp, "--encoder", "uni_v1")
  assert summary["slides_written"] == 2 and summary["slides_failed"] == 0
  assert summary["feature_dim"] == D and summary["patches"] == 8

  shards = feature_shards.FeatureShards(str(out))
  assert shards.identity == {"source": "trident", "encoder": "uni_v1", "feature_dim": D}
  a = shards.get("TCGA-A")
  assert_features(a, fa)
  np.testing.assert_array_equal(a["coords"], ca)
  assert a["coords"].dtype == np.int64
  assert a["patch_size_level0"] == 512 and a["patch_size"] == 256
  assert a["mpp"] == pytest.approx(0.25) and a["mpp_source"] == "magnification"
  assert a["patch_mpp"] == pytest.approx(0.5) and a["magnification"] == 20.0
  assert a["source"] == "trident" and a["encoder"] == "uni_v1" and a["weights_hash"] == ""
  assert a["source_path"] == str(inp / "TCGA-A.h5")

  # A manifest restricts to its slides, gives mpp, and its labels reach slides.jsonl.
  out2 = tmp_path / "feats2"
  summary = run(out2, "--format", "trident", "--input", inp, "--encoder", "uni_v1",
                "--manifest", manifest)
  assert summary["slides_written"] == 1 and summary["not_in_manifest"] == 1
  shards = feature_shards.FeatureShards(str(out2))
  b = shards.get("TCGA-B")
  assert_features(b, fb)
  assert b["mpp"] == pytest.approx(0.2631) and b["mpp_source"] == "manifest"
  row, = shards.rows
  assert row["diagnosis"] == "carcinoma" and row["mpp"] == pytest.approx(0.2631)
  assert row["coords_source"] == "h5" and row["patch_size_level0"] == 512


def test_trident_leading_batch_dim_and_clam_style_coords_attrs(tmp_path):
  # TRIDENT run on CLAM coords: coords carry patch_size + patch_level (+ downsample).
  feats = _features(4)
  coords = np.array([[0, 0], [256, 0], [0, 256], [256, 256]], np.int64)
  write_h5(tmp_path / "s1.h5", feats[None], coords[None], {"patch_size": 256, "patch_level": 0})
  write_h5(tmp_path / "s2.h5", feats, coords,
           {"patch_size": 256, "patch_level": 1, "downsample": np.array([4.0, 4.0])})
  out = tmp_path / "out"
  summary = run(out, "--format", "trident", "--input", str(tmp_path / "*.h5"),
                "--encoder", "conch_v1", "--mpp", "0.5")
  assert summary["slides_written"] == 2, summary["failures"]
  shards = feature_shards.FeatureShards(str(out))
  s1, s2 = shards.get("s1"), shards.get("s2")
  assert_features(s1, feats)
  np.testing.assert_array_equal(s1["coords"], coords)
  assert s1["patch_size_level0"] == 256 and s2["patch_size_level0"] == 1024
  assert s1["mpp"] == 0.5 and s1["mpp_source"] == "flag"
  assert "magnification" not in s1


def test_clam_needs_footprint_flag_then_imports(tmp_path):
  feat_dir = tmp_path / "clam_feats"
  (feat_dir / "h5_files").mkdir(parents=True)
  (feat_dir / "pt_files").mkdir()
  fa, ca = write_clam(feat_dir / "h5_files", "slide_1")
  out = tmp_path / "out"
  summary = run(out, "--format", "clam", "--input", feat_dir, "--encoder", "resnet50_trunc",
                "--mpp", "0.25")
  assert summary["slides_written"] == 0 and summary["slides_failed"] == 1
  failure, = summary["failures"]
  assert failure["reason"] == "no_patch_size"
  assert "slide_1.h5" in failure["error"] and "--patch_size_level0" in failure["error"]
  assert "patch_size_level0" in failure["error"] and "--patches_dir" in failure["error"]

  summary = run(out, "--format", "clam", "--input", feat_dir, "--encoder", "resnet50_trunc",
                "--mpp", "0.25", "--patch_size_level0", "256")
  assert summary["slides_written"] == 1 and summary["slides_failed"] == 0
  record = feature_shards.FeatureShards(str(out)).get("slide_1")
  assert_features(record, fa)
  np.testing.assert_array_equal(record["coords"], ca)
  assert record["patch_size_level0"] == 256 and record["source"] == "clam"
  assert record["mpp"] == 0.25 and record["mpp_source"] == "flag"
  assert "patch_size" not in record
  failures = [json.loads(line) for line in open(out / "failures.jsonl")]
  assert failures == []


def test_clam_footprint_from_patching_output(tmp_path):
  h5_files, patches = tmp_path / "h5_files", tmp_path / "patches"
  h5_files.mkdir()
  patches.mkdir()
  feats, coords = write_clam(h5_files, "slide_2", n=6)
  # create_patches_fp.py output: coords with the patching attributes (level 1 of a 4x pyramid).
  write_h5(patches / "slide_2.h5", np.zeros((6, 1), np.float32), coords,
           {"patch_size": 256, "patch_level": 1, "downsample": np.array([4.0, 4.0]),
            "downsampled_level_dim": np.array([1000, 800]), "level_dim": np.array([1000, 800]),
            "name": "slide_2", "save_path": str(patches)})
  out = tmp_path / "out"
  summary = run(out, "--format", "clam", "--input", h5_files, "--encoder", "uni_v1",
                "--mpp", "0.25", "--patches_dir", patches, "--patch_size_level0", "999")
  assert summary["slides_written"] == 1, summary["failures"]
  shards = feature_shards.FeatureShards(str(out))
  record = shards.get("slide_2")
  assert record["patch_size_level0"] == 1024  # the patching attributes win over the fallback
  assert shards.rows[0]["patch_size_level0_source"] == "patches_dir"
  assert record["patch_size"] == 256 and record["patch_mpp"] == pytest.approx(1.0)


def test_slidechat_csv_grid_names(tmp_path):
  inp = tmp_path / "BRCA"
  inp.mkdir()
  feats, grid = write_slidechat(inp / "TCGA-AR-A255-01Z-00-DX1.csv")
  manifest = tmp_path / "m.jsonl"
  manifest.write_text(json.dumps({"slide_id": "TCGA-AR-A255-01Z-00-DX1", "mpp": 0.2527,
                                  "patch_size_level0": 448, "caption": "Ductal carcinoma."}) + "\n")
  out = tmp_path / "out"
  summary = run(out, "--format", "slidechat", "--input", inp, "--encoder", "conch_v1",
                "--manifest", manifest)
  assert summary["slides_written"] == 1, summary["failures"]
  shards = feature_shards.FeatureShards(str(out))
  record = shards.get("TCGA-AR-A255-01Z-00-DX1")
  assert_features(record, feats)
  np.testing.assert_array_equal(record["coords"], grid * 448)
  assert record["patch_size_level0"] == 448 and record["patch_size"] == 224
  assert record["mpp"] == pytest.approx(0.2527) and record["mpp_source"] == "manifest"
  assert record["source"] == "slidechat"
  row, = shards.rows
  assert row["coords_source"] == "patch_name" and row["caption"] == "Ductal carcinoma."


def test_slidechat_names_as_level0_pixels(tmp_path):
  feats, grid = write_slidechat(tmp_path / "s.csv")
  out = tmp_path / "out"
  summary = run(out, "--format", "slidechat", "--input", tmp_path / "s.csv", "--encoder", "conch",
                "--mpp", "0.5", "--patch_size_level0", "224", "--patch_names", "level0")
  assert summary["slides_written"] == 1
  np.testing.assert_array_equal(feature_shards.FeatureShards(str(out)).get("s")["coords"], grid)


def test_slidechat_without_patch_name_needs_placeholder_flag(tmp_path):
  inp = tmp_path / "csv"
  inp.mkdir()
  feats, _ = write_slidechat(inp / "dsmil.csv", n=5, names=False)
  out = tmp_path / "out"
  args = ["--format", "slidechat", "--input", inp, "--encoder", "conch", "--mpp", "0.5",
          "--patch_size_level0", "448"]
  summary = run(out, *args)
  failure, = summary["failures"]
  assert failure["reason"] == "bad_file"
  assert "dsmil.csv" in failure["error"] and "'patch_name'" in failure["error"]
  assert "--placeholder_coords" in failure["error"]

  summary = run(out, *args, "--placeholder_coords")
  assert summary["slides_written"] == 1
  shards = feature_shards.FeatureShards(str(out))
  record = shards.get("dsmil")
  assert_features(record, feats)
  # 5 patches on a 3-wide row-major grid, cells of 448 level-0 pixels.
  np.testing.assert_array_equal(record["coords"] // 448,
                                [[0, 0], [1, 0], [2, 0], [0, 1], [1, 1]])
  assert shards.rows[0]["coords_source"] == "placeholder_grid"


# --------------------------------------------------------------------------- errors


def _no_features(folder):
  with h5py.File(folder / "bad.h5", "w") as f:  # a TRIDENT patching file, not features
    f.create_dataset("coords", data=np.zeros((3, 2), np.int64))


def _no_coords(folder):
  with h5py.File(folder / "bad.h5", "w") as f:
    f.create_dataset("features", data=_features(3))


def _n_mismatch(folder):
  write_h5(folder / "bad.h5", _features(4), np.zeros((3, 2), np.int64), _trident_attrs("bad"))


def _wrong_ndim(folder):
  write_h5(folder / "bad.h5", _features(4).reshape(2, 2, D), np.zeros((4, 2), np.int64),
           _trident_attrs("bad"))


def _coords_not_pairs(folder):
  write_h5(folder / "bad.h5", _features(4), np.zeros((4, 3), np.int64), _trident_attrs("bad"))


def _other_dim(folder):
  write_h5(folder / "bad.h5", np.ones((4, D + 4), np.float32), np.zeros((4, 2), np.int64),
           _trident_attrs("bad"))


def _overflow(folder):
  feats = _features(4)
  feats[2, 1] = 1e6
  write_h5(folder / "bad.h5", feats, np.zeros((4, 2), np.int64), _trident_attrs("bad"))


def _not_hdf5(folder):
  (folder / "bad.h5").write_text("not an HDF5 file\n")


def _no_mpp(folder):
  attrs = {"patch_size": 256, "patch_size_level0": 512}  # no magnification either
  write_h5(folder / "bad.h5", _features(4), np.zeros((4, 2), np.int64), attrs)


def _empty(folder):
  write_h5(folder / "bad.h5", np.zeros((0, D), np.float32), np.zeros((0, 2), np.int64),
           _trident_attrs("bad"))


H5_ERRORS = {
    "missing features": (_no_features, "bad_file", ["'features'", "coordinates file"]),
    "missing coords": (_no_coords, "bad_file", ["'coords'"]),
    "N mismatch": (_n_mismatch, "bad_file", ["'features' has 4 rows", "'coords' has 3"]),
    "features ndim": (_wrong_ndim, "bad_file", ["'features' must be [N, D]", "[2, 2, 8]"]),
    "coords shape": (_coords_not_pairs, "bad_file", ["'coords' must be [N, 2]"]),
    "feature dim": (_other_dim, "feature_dim_mismatch", ["12-d", "8-d"]),
    "float16 overflow": (_overflow, "bad_file", ["'features'", "float16", "row 2"]),
    "not hdf5": (_not_hdf5, "bad_file", ["not a readable HDF5 file"]),
    "no mpp": (_no_mpp, "no_mpp", ["--mpp", "'mpp'", "level0_magnification"]),
    "no patches": (_empty, "no_patches", ["'features'", "no rows"]),
}


@pytest.mark.parametrize("kind", list(H5_ERRORS))
def test_h5_error_is_reported_and_other_slides_imported(tmp_path, kind):
  make, reason, words = H5_ERRORS[kind]
  inp = tmp_path / "in"
  inp.mkdir()
  feats, _ = write_trident(inp, "good", n=3)
  write_trident(inp, "good2", n=2)  # the commonest feature dim is the import's
  make(inp)
  out = tmp_path / "out"
  summary = run(out, "--format", "trident", "--input", inp, "--encoder", "uni_v1")
  assert summary["slides_written"] == 2 and summary["slides_failed"] == 1
  failure, = summary["failures"]
  assert failure["slide_id"] == "bad" and failure["reason"] == reason
  assert str(inp / "bad.h5") in failure["error"]
  for word in words:
    assert word in failure["error"], (word, failure["error"])
  assert_features(feature_shards.FeatureShards(str(out)).get("good"), feats)
  rows = {json.loads(line)["slide_id"]: json.loads(line) for line in open(out / "slides.jsonl")}
  assert rows["good"]["status"] == "ok" and rows["bad"]["status"] == "failed"
  assert rows["bad"]["reason"] == reason
  on_disk, = [json.loads(line) for line in open(out / "failures.jsonl")]
  assert on_disk["slide_id"] == "bad" and on_disk["path"] == str(inp / "bad.h5")


CSV_ERRORS = {
    "non-numeric cell": ({(1, 3): "abc"}, None, [":3:", "column '3'", "'abc'"]),
    "short row": ({(2, D): None}, None, [":4:", "columns, the header has"]),
    "bad patch name": ({(0, D): "tile7.jpeg"}, None, [":2:", "'patch_name'", "tile7.jpeg"]),
    "nan": ({(1, 0): "nan"}, None, ["NaN", "line 3"]),
    "no header": (None, "-1.5," * D + "0_0.jpeg\n", [":1:", "header row"]),
}


@pytest.mark.parametrize("kind", list(CSV_ERRORS))
def test_csv_error_names_line_and_column(tmp_path, kind):
  cells, text, words = CSV_ERRORS[kind]
  inp = tmp_path / "in"
  inp.mkdir()
  feats, _ = write_slidechat(inp / "a_good.csv")
  if text is not None:
    (inp / "bad.csv").write_text(text)
  else:
    write_slidechat(inp / "bad.csv", n=4, cells=cells)
    if kind == "short row":  # drop the row's last feature cell
      lines = (inp / "bad.csv").read_text().splitlines()
      head, _, name = lines[3].rpartition(",")
      lines[3] = head.rpartition(",")[0] + "," + name
      (inp / "bad.csv").write_text("\n".join(lines) + "\n")
  out = tmp_path / "out"
  summary = run(out, "--format", "slidechat", "--input", inp, "--encoder", "conch_v1",
                "--mpp", "0.25", "--patch_size_level0", "448")
  assert summary["slides_written"] == 1, summary["failures"]
  failure, = summary["failures"]
  assert failure["slide_id"] == "bad" and failure["reason"] == "bad_file"
  assert "bad.csv" in failure["error"]
  for word in words:
    assert word in failure["error"], (word, failure["error"])
  assert_features(feature_shards.FeatureShards(str(out)).get("a_good"), feats)


def test_manifest_row_without_file_is_reported(tmp_path):
  inp = tmp_path / "in"
  inp.mkdir()
  write_trident(inp, "a")
  manifest = tmp_path / "m.jsonl"
  manifest.write_text(json.dumps({"slide_id": "a", "split": "train"}) + "\n"
                      + json.dumps({"slide_id": "ghost", "split": "test"}) + "\n")
  out = tmp_path / "out"
  summary = run(out, "--format", "trident", "--input", inp, "--manifest", manifest,
                "--encoder", "uni_v1")
  assert summary["slides_written"] == 1
  failure, = summary["failures"]
  assert failure["slide_id"] == "ghost" and failure["reason"] == "missing_file"
  assert "m.jsonl" in failure["error"] and "ghost.h5" in failure["error"]
  rows = {json.loads(line)["slide_id"]: json.loads(line) for line in open(out / "slides.jsonl")}
  assert rows["ghost"]["status"] == "failed" and rows["ghost"]["split"] == "test"
  assert rows["a"]["split"] == "train"


def test_bad_manifest_and_inputs_stop_the_run(tmp_path):
  manifest = tmp_path / "m.csv"
  manifest.write_text("slide_id,mpp\na,fast\n")
  with pytest.raises(SystemExit, match=r"m.csv:2: column 'mpp' must be a number"):
    run(tmp_path / "out", "--format", "clam", "--manifest", manifest, "--encoder", "x")
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "features_uni_v1").mkdir()
  with pytest.raises(SystemExit, match=r"no \.h5/\.hdf5 files .*features_uni_v1"):
    run(tmp_path / "out", "--format", "trident", "--input", tmp_path / "empty", "--encoder", "x")


def test_rerun_skips_imported_and_retries_failed(tmp_path, monkeypatch):
  inp = tmp_path / "in"
  inp.mkdir()
  for k in range(3):
    write_trident(inp, f"s{k}", n=2 + k, seed=k)
  _no_coords(inp)
  out = tmp_path / "out"
  args = ["--format", "trident", "--input", inp, "--encoder", "uni_v1", "--slides_per_shard", "2"]
  first = run(out, *args)
  assert first["slides_written"] == 3 and first["slides_failed"] == 1
  before = shard_bytes(out)
  mtimes = {p: os.stat(p).st_mtime_ns for p in before}
  assert len(before) == 2

  second = run(out, *args)
  assert second["slides_written"] == 0 and second["slides_skipped"] == 3
  assert second["slides_failed"] == 1 and second["shards"] == []
  assert shard_bytes(out) == before
  assert {p: os.stat(p).st_mtime_ns for p in before} == mtimes

  # The broken file is fixed: only it is imported, into a new shard generation.
  write_trident(inp, "bad", n=2, seed=9)
  third = run(out, *args)
  assert third["slides_written"] == 1 and third["slides_failed"] == 0
  after = shard_bytes(out)
  assert {p: b for p, b in after.items() if p in before} == before and len(after) == 3
  shards = feature_shards.FeatureShards(str(out))
  assert sorted(shards.slide_ids) == ["bad", "s0", "s1", "s2"]
  assert [json.loads(line) for line in open(out / "failures.jsonl")] == []

  # Another encoder into the same directory is refused.
  with pytest.raises(SystemExit, match="another encoder"):
    run(out, "--format", "trident", "--input", inp, "--encoder", "conch_v1")

  # main() exits 1 when a slide failed, 0 otherwise.
  _no_coords(inp)
  monkeypatch.setattr("sys.argv", ["import_features", "--format", "trident", "--input",
                                   str(inp), "--encoder", "uni_v1", "--output_dir",
                                   str(tmp_path / "out2"), "--progress_interval", "0"])
  with pytest.raises(SystemExit) as exit_info:
    import_features.main()
  assert exit_info.value.code == 1
