"""pathflip_jax.storage: local paths and URLs behind one API (fsspec's memory:// stands in for an
object store here; tests/test_object_store.py runs the jobs on a local S3 server)."""

import os

import pytest

from pathflip_jax import storage


def test_urls_stay_urls():
  assert storage.is_url("s3://b/run") and storage.is_url("gs://b") and not storage.is_url("/a/b")
  assert not storage.is_url("file:///tmp/x")
  assert storage.absolute("s3://b/run") == "s3://b/run"          # never $PWD/s3:/b/run
  assert storage.absolute("rel") == os.path.abspath("rel")
  assert storage.join("s3://b/run/", "checkpoints", "8") == "s3://b/run/checkpoints/8"
  assert storage.join("/w", "a") == os.path.join("/w", "a")
  assert storage.basename("s3://b/run/x.json") == "x.json"
  assert storage.dirname("s3://b/run/x.json") == "s3://b/run"
  with pytest.raises(storage.StorageError, match="--manifest s3://b/m.jsonl: a URL"):
    storage.local_path("s3://b/m.jsonl", "--manifest")


@pytest.mark.parametrize("root", ["local", "memory://pathflip-test-store"])
def test_files_folders_upload_and_download(tmp_path, root):
  base = str(tmp_path / "store") if root == "local" else root
  storage.remove(base)
  storage.write_text(storage.join(base, "a", "x.txt"), "hello")
  with storage.open_file(storage.join(base, "a", "y.bin"), "wb") as f:
    f.write(b"\x00\x01")
  with storage.open_file(storage.join(base, "a", "x.txt"), "a") as f:
    f.write(" world")
  assert storage.read_text(storage.join(base, "a", "x.txt")) == "hello world"
  assert storage.read_bytes(storage.join(base, "a", "y.bin")) == b"\x00\x01"
  assert storage.listdir(storage.join(base, "a")) == ["x.txt", "y.bin"]
  assert storage.listdir(storage.join(base, "missing")) == []
  assert storage.exists(storage.join(base, "a", "x.txt"))
  assert storage.size(storage.join(base, "a", "y.bin")) == 2

  tree = tmp_path / "tree"
  (tree / "sub").mkdir(parents=True)
  (tree / "sub" / "z.txt").write_text("z")
  (tree / "top.txt").write_text("t")
  storage.upload(str(tree), storage.join(base, "up"))
  assert storage.read_text(storage.join(base, "up", "sub", "z.txt")) == "z"
  storage.download(storage.join(base, "up"), str(tmp_path / "back"))
  assert (tmp_path / "back" / "sub" / "z.txt").read_text() == "z"
  assert not list((tmp_path / "back").rglob("*.part"))
  storage.remove(storage.join(base, "up"))
  assert not storage.exists(storage.join(base, "up", "top.txt"))
  with pytest.raises(FileNotFoundError):
    storage.read_text(storage.join(base, "nothing.txt"))


def test_cache_keeps_copies_under_its_size_limit(tmp_path):
  store = "memory://pathflip-test-cache"
  storage.remove(store)
  for name in "abc":
    storage.write_bytes(f"{store}/{name}.bin", name.encode() * 600)
  cache = storage.Cache(str(tmp_path / "cache"), limit_gb=1000 / 2 ** 30)   # 1000 bytes
  a = cache.local_copy(f"{store}/a.bin")
  assert open(a, "rb").read() == b"a" * 600
  assert cache.local_copy(f"{store}/a.bin") == a                          # cached
  b = cache.local_copy(f"{store}/b.bin")
  # Two copies (1200 bytes) exceed 1000: the least recently used (a) goes.
  assert os.path.exists(b) and not os.path.exists(a)
  # A changed object is fetched again.
  storage.write_bytes(f"{store}/b.bin", b"B" * 10)
  assert open(cache.local_copy(f"{store}/b.bin"), "rb").read() == b"B" * 10
  assert cache.local_copy(str(tmp_path)) == str(tmp_path)                 # local: as it is
  with pytest.raises(ValueError, match="PATHFLIP_CACHE_GB"):
    storage.Cache(str(tmp_path / "c2"), limit_gb=0)


def test_an_unknown_scheme_names_the_url():
  with pytest.raises(storage.StorageError, match="nosuchscheme://b/x: no filesystem"):
    storage.exists("nosuchscheme://b/x")
