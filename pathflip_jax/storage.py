"""Local paths and object-store URLs (``gs://``, ``s3://``, any fsspec scheme) behind one API.

Every run, data and slide path may be either. Local paths go through ``os``; URLs through
fsspec (``s3fs`` for s3://, ``gcsfs`` for gs://: install the one you use), and nothing here
turns a URL into a local path: ``local_path`` refuses a URL, naming it and the job that needed a
local file.

Some pinned libraries cannot read or write some schemes (ArrayRecord writes ``s3://b/x`` as a
local folder ``s3:``; Orbax and tensorstore refuse ``s3://``; large_image opens local files
only). Those go through a :class:`Cache`: a local folder with a size limit that holds
downloaded copies (least recently used first out) and where files are written before one
upload each, so a reader never sees half a file.

Environment: ``PATHFLIP_CACHE_DIR`` (default ``~/.cache/pathflip_jax/staging``) and
``PATHFLIP_CACHE_GB`` (default 20) size the cache; fsspec's own settings and the usual
credentials (``AWS_*``, ``GOOGLE_APPLICATION_CREDENTIALS``; ``AWS_ENDPOINT_URL`` for an
S3-compatible server) apply.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
import threading
import time
from typing import IO, Any, Iterator

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "pathflip_jax", "staging")
DEFAULT_CACHE_GB = 20.0
# Fail fast on an unreachable endpoint: botocore otherwise retries for minutes.
_S3_DEFAULTS = {"config_kwargs": {"connect_timeout": 5, "read_timeout": 60,
                                  "retries": {"max_attempts": 3}}}


class StorageError(OSError):
  """A path or URL that cannot be reached, read or written; the message names it."""


def is_url(path: str | os.PathLike) -> bool:
  """Whether ``path`` is a URL with a scheme (``s3://b/k``) rather than a local path."""
  text = os.fspath(path)
  return "://" in text and not text.startswith("file://")


def scheme(path: str) -> str:
  """"s3" for ``s3://b/k``; "" for a local path."""
  return path.split("://", 1)[0] if is_url(path) else ""


def _local(path: str) -> str:
  path = os.fspath(path)
  return path[len("file://"):] if path.startswith("file://") else path


def join(base: str, *parts: str) -> str:
  """``os.path.join`` for local paths; "/"-joined for URLs (whatever the OS)."""
  base = os.fspath(base)
  if not is_url(base):
    return os.path.join(_local(base), *parts)
  out = base.rstrip("/")
  for part in parts:
    out = part if is_url(part) else f"{out}/{part.strip('/')}"
  return out


def absolute(path: str) -> str:
  """A local path made absolute; a URL as it is (never ``$PWD/s3:/...``)."""
  return os.fspath(path) if is_url(path) else os.path.abspath(_local(path))


def basename(path: str) -> str:
  return os.fspath(path).rstrip("/").rsplit("/", 1)[-1] if is_url(path) else \
      os.path.basename(_local(path))


def dirname(path: str) -> str:
  if not is_url(path):
    return os.path.dirname(_local(path))
  head, _, _ = os.fspath(path).rstrip("/").rpartition("/")
  return head


def filesystem(path: str):
  """(fsspec filesystem, path within it) of a URL."""
  import fsspec  # pylint: disable=import-outside-toplevel
  kind = scheme(path)
  options = dict(_S3_DEFAULTS) if kind in ("s3", "s3a") else {}
  try:
    return fsspec.core.url_to_fs(path, **options)
  except (ImportError, ValueError) as e:
    raise StorageError(f"{path}: no filesystem for scheme {kind!r} ({e}); install its fsspec "
                       "package (s3fs for s3://, gcsfs for gs://)") from None


def _wrap(path: str, action: str):
  """A context that turns the store's errors into one StorageError naming the URL."""

  @contextlib.contextmanager
  def context():
    try:
      yield
    except FileNotFoundError:
      raise
    except StorageError:
      raise
    except Exception as e:  # noqa: BLE001 - the stores raise many kinds; keep the first line
      first = str(e).strip().splitlines()[0] if str(e).strip() else ""
      raise StorageError(f"{path}: cannot {action} ({type(e).__name__}: {first})") from None

  return context()


def exists(path: str) -> bool:
  if not is_url(path):
    return os.path.exists(_local(path))
  fs, inner = filesystem(path)
  with _wrap(path, "check that it exists"):
    return bool(fs.exists(inner))


def isdir(path: str) -> bool:
  if not is_url(path):
    return os.path.isdir(_local(path))
  fs, inner = filesystem(path)
  with _wrap(path, "list it"):
    return bool(fs.isdir(inner))


def listdir(path: str) -> list[str]:
  """Names (not paths) in a folder; [] for a missing one."""
  if not is_url(path):
    path = _local(path)
    return sorted(os.listdir(path)) if os.path.isdir(path) else []
  fs, inner = filesystem(path)
  with _wrap(path, "list it"):
    if not fs.isdir(inner):
      return []
    fs.invalidate_cache(inner)
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(inner, detail=False)
                  if p.rstrip("/") != inner.rstrip("/"))


def makedirs(path: str) -> None:
  """Creates a local folder (and parents); object stores have no folders to create."""
  if not is_url(path):
    os.makedirs(_local(path), exist_ok=True)


def size(path: str) -> int:
  if not is_url(path):
    return os.path.getsize(_local(path))
  fs, inner = filesystem(path)
  with _wrap(path, "read its size"):
    return int(fs.size(inner))


def remove(path: str) -> None:
  """Deletes a file or a folder tree; nothing if absent."""
  if not is_url(path):
    path = _local(path)
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)
    return
  fs, inner = filesystem(path)
  with _wrap(path, "delete it"):
    if fs.exists(inner):
      fs.rm(inner, recursive=True)


@contextlib.contextmanager
def open_file(path: str, mode: str = "r", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
  """Opens a local file or a URL. Writing a URL uploads once, at close, so a reader never sees
  half a file; writing a local file goes through a temporary file and a rename, for the same
  reason. ``encoding`` is for text modes."""
  binary = "b" in mode
  enc = None if binary else encoding
  if "w" in mode or "a" in mode:
    with _writer(path, mode, enc) as f:
      yield f
    return
  if not is_url(path):
    with open(_local(path), mode, encoding=enc) as f:
      yield f
    return
  fs, inner = filesystem(path)
  with _wrap(path, "read it"):
    data = fs.cat_file(inner)
  yield io.BytesIO(data) if binary else io.StringIO(data.decode(enc or "utf-8"))


@contextlib.contextmanager
def _writer(path: str, mode: str, encoding: str | None) -> Iterator[IO[Any]]:
  binary = "b" in mode
  if "a" in mode:
    previous = read_bytes(path) if exists(path) else b""
  else:
    previous = b""
  buffer = io.BytesIO(previous) if binary else io.StringIO(previous.decode(encoding or "utf-8"))
  buffer.seek(0, io.SEEK_END)
  yield buffer
  data = buffer.getvalue()
  write_bytes(path, data if binary else data.encode(encoding or "utf-8"))


def read_bytes(path: str) -> bytes:
  with open_file(path, "rb") as f:
    return f.read()


def read_text(path: str) -> str:
  with open_file(path, "r") as f:
    return f.read()


def write_bytes(path: str, data: bytes) -> None:
  """Writes a whole file: locally through a temporary file and a rename; to a URL as one PUT."""
  if not is_url(path):
    path = _local(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
      with os.fdopen(fd, "wb") as f:
        f.write(data)
      os.replace(tmp, path)
    except BaseException:
      with contextlib.suppress(OSError):
        os.remove(tmp)
      raise
    return
  fs, inner = filesystem(path)
  with _wrap(path, "write it"):
    fs.pipe_file(inner, data)


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def upload(local: str, url: str) -> None:
  """Copies a local file or folder tree to ``url`` (a local destination: a copy). Each file is
  one PUT, so none is ever half there; a folder's files go up in sorted order."""
  if not is_url(url):
    if os.path.isdir(local):
      shutil.copytree(local, _local(url), dirs_exist_ok=True)
    else:
      write_bytes(url, open(local, "rb").read())
    return
  fs, inner = filesystem(url)
  with _wrap(url, f"upload {local} to it"):
    if os.path.isdir(local):
      for root, _, files in sorted(os.walk(local)):
        for name in sorted(files):
          source = os.path.join(root, name)
          relative = os.path.relpath(source, local).replace(os.sep, "/")
          fs.put_file(source, f"{inner.rstrip('/')}/{relative}")
    else:
      fs.put_file(local, inner)


def download(url: str, local: str) -> None:
  """Copies a file or folder tree at ``url`` to the local path ``local`` (a file arrives under a
  temporary name and is renamed, so a killed download leaves no partial file)."""
  if not is_url(url):
    source = _local(url)
    if os.path.isdir(source):
      shutil.copytree(source, local, dirs_exist_ok=True)
    else:
      os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
      shutil.copyfile(source, local + ".part")
      os.replace(local + ".part", local)
    return
  fs, inner = filesystem(url)
  with _wrap(url, "download it"):
    if fs.isdir(inner):
      for remote in fs.find(inner):
        relative = remote[len(inner.rstrip("/")) + 1:]
        _get(fs, remote, os.path.join(local, *relative.split("/")))
    else:
      _get(fs, inner, local)


def _get(fs, remote: str, local: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
  fs.get_file(remote, local + ".part")
  os.replace(local + ".part", local)


def check_reachable(path: str, what: str, must_exist: bool = False) -> None:
  """Fails at once, with one line naming ``path`` and ``what`` it is (e.g. "--workdir"), when a
  URL's store cannot be reached or refuses access (or, with ``must_exist``, has nothing
  there). Local paths are checked only for ``must_exist``."""
  if not is_url(path):
    if must_exist and not os.path.exists(_local(path)):
      raise FileNotFoundError(f"{what} {path}: not found")
    return
  fs, inner = filesystem(path)
  bucket = inner.split("/", 1)[0]
  try:
    # Listing the bucket answers both "can I reach it" and "may I": a missing key is no error.
    found = fs.exists(inner)
    if not found:
      fs.ls(bucket, detail=False)
  except FileNotFoundError:
    raise StorageError(f"{what} {path}: no bucket {bucket!r} there") from None
  except Exception as e:  # noqa: BLE001
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise StorageError(f"{what} {path}: unreachable or not authorised ({type(e).__name__}: "
                       f"{first})") from None
  if must_exist and not found:
    raise FileNotFoundError(f"{what} {path}: not found")


def local_path(path: str, what: str) -> str:
  """``path`` when it is local; for a URL, an error naming ``what`` needs a local file (for code
  that hands paths to libraries without object-store support and has no staging)."""
  if is_url(path):
    raise StorageError(f"{what} {path}: a URL where a local path is needed (copy it to local "
                       "disk first)")
  return _local(path)


# --------------------------------------------------------------------------- the local cache


class Cache:
  """A local folder of staged files with a size limit.

  ``local_copy(url)`` downloads a file (or folder tree) once and returns its local path; copies
  are evicted least recently used first once the folder is over ``limit_bytes`` (a copy being
  used is kept: it was touched last). ``staging(url)`` is a fresh local folder for writing a
  file or tree that ``upload`` then sends to ``url`` in one go.
  """

  def __init__(self, directory: str | None = None, limit_gb: float | None = None):
    self.directory = os.path.abspath(
        directory or os.environ.get("PATHFLIP_CACHE_DIR") or DEFAULT_CACHE_DIR)
    limit = limit_gb if limit_gb is not None else float(
        os.environ.get("PATHFLIP_CACHE_GB") or DEFAULT_CACHE_GB)
    if limit <= 0:
      raise ValueError(f"PATHFLIP_CACHE_GB={limit}: the cache needs a positive size limit")
    self.limit_bytes = int(limit * 2 ** 30)
    self._lock = threading.Lock()
    os.makedirs(self.directory, exist_ok=True)

  def key(self, url: str) -> str:
    """The cache folder name of a URL: readable tail, unique hash."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    tail = "".join(c if c.isalnum() or c in "._-" else "_" for c in basename(url))[-60:]
    return f"{digest}-{tail}"

  def local_copy(self, url: str) -> str:
    """A local path holding the content of ``url`` (a local path is returned as it is)."""
    if not is_url(url):
      return _local(url)
    entry = os.path.join(self.directory, "copies", self.key(url))
    target = os.path.join(entry, basename(url))
    stamp = os.path.join(entry, "source.json")
    remote_size = None if isdir(url) else size(url)
    with self._lock:
      if os.path.exists(stamp):
        with open(stamp) as f:
          known = json.load(f)
        if known.get("url") == url and known.get("size") == remote_size and os.path.exists(
            target):
          os.utime(stamp)
          return target
      shutil.rmtree(entry, ignore_errors=True)
      download(url, target)
      with open(stamp, "w") as f:
        json.dump({"url": url, "size": remote_size, "time": time.time()}, f)
      self._evict(keep=entry)
    return target

  def staging(self, url: str) -> str:
    """An empty local folder to write ``url``'s content into before uploading it."""
    folder = tempfile.mkdtemp(prefix=self.key(url) + "-", dir=self._staging_root())
    return folder

  def _staging_root(self) -> str:
    root = os.path.join(self.directory, "staging")
    os.makedirs(root, exist_ok=True)
    return root

  def _evict(self, keep: str) -> None:
    copies = os.path.join(self.directory, "copies")
    entries = []
    for name in os.listdir(copies):
      entry = os.path.join(copies, name)
      stamp = os.path.join(entry, "source.json")
      used = os.path.getmtime(stamp) if os.path.exists(stamp) else 0.0
      entries.append((used, entry, _tree_bytes(entry)))
    total = sum(b for _, _, b in entries)
    for _, entry, nbytes in sorted(entries):
      if total <= self.limit_bytes:
        break
      if entry == keep:
        continue
      shutil.rmtree(entry, ignore_errors=True)
      total -= nbytes


def _tree_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path)
             for f in files)


_DEFAULT_CACHE: Cache | None = None


def cache() -> Cache:
  """The process's cache (``PATHFLIP_CACHE_DIR``, ``PATHFLIP_CACHE_GB``)."""
  global _DEFAULT_CACHE  # pylint: disable=global-statement
  if _DEFAULT_CACHE is None:
    _DEFAULT_CACHE = Cache()
  return _DEFAULT_CACHE
