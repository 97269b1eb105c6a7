"""A local slide viewer: zoom a slide, type a phrase, see where it is.

  python -m pathflip_jax.serve --workdir W --slides MANIFEST_OR_DIR [--host 127.0.0.1] [--port 8000]

``W`` is an align run (heatmaps, zero-shot) or an instruct run (also the caption and a question
box). ``--slides`` is a manifest (``slide_id``, ``path`` per row) or a folder of slide files.
The page (http://HOST:PORT/) lists the slides with thumbnails; a slide opens in a deep-zoom
viewer (OpenSeadragon, installed by ``setup.sh`` into ``pathflip_jax/viewer/openseadragon``)
with a µm scale bar. Typing a phrase draws its text-prompted heatmap over the slide (opacity
slider, colour bar), computed from the slide's features: the run's own feature records when the
slide has them, otherwise extracted with the run's patch encoder on first open (with progress)
and kept in ``--cache_dir`` (default ``W/viewer_features``: one ``.npz`` per slide, reused by
later servers while the slide file, the encoder's weights and the tiling are the same). The
heatmap downloads as QuPath GeoJSON.

Safe by default: binds 127.0.0.1; a slide is addressed by its id and only the configured slides
are served (no file path ever comes from a request); phrases and request bodies are bounded;
every error is JSON with a message.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from pathflip_jax import heatmaps, infer, predict, storage
from pathflip_jax.data import manifest as manifest_lib
from pathflip_jax.data import slide_examples, slides

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "viewer")
OPENSEADRAGON_DIR = os.path.join(STATIC_DIR, "openseadragon")
TILE_SIZE = 256
MAX_PHRASE = 200            # characters of a heatmap phrase or a question
MAX_BODY = 4096             # bytes of a request body
THUMBNAIL_SIDE = 160
_SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif",
                   ".svslide")


class NotFound(LookupError):
  """An unknown slide id (answered 404)."""


class BadRequest(ValueError):
  """A malformed or oversized request (answered 400 or 413)."""

  def __init__(self, message: str, status: int = 400):
    super().__init__(message)
    self.status = status


def catalog(source: str) -> dict[str, dict[str, Any]]:
  """slide id -> {"path", "mpp"} of a manifest (JSON lines or CSV) or a folder of slides."""
  if storage.isdir(source):
    found = {}
    for name in storage.listdir(source):
      stem, suffix = os.path.splitext(name)
      if suffix.lower() in _SLIDE_SUFFIXES and not storage.isdir(storage.join(source, name)):
        found[stem] = {"path": storage.join(source, name), "mpp": None}
    if not found:
      raise SystemExit(f"--slides {source}: no slide files ({', '.join(_SLIDE_SUFFIXES)})")
    return found
  if not storage.exists(source):
    raise SystemExit(f"--slides {source}: no such manifest or folder")
  rows = manifest_lib.read_manifest(source)
  return {str(r["slide_id"]): {"path": manifest_lib.resolve(source, r["path"]),
                               "mpp": r.get("mpp")} for r in rows}


class _Job:
  """Feature extraction of one slide, in the background."""

  def __init__(self):
    self.state, self.done, self.total, self.message = "waiting", 0, 0, ""
    self.started = time.time()

  def as_dict(self) -> dict[str, Any]:
    return {"state": self.state, "done": self.done, "total": self.total,
            "message": self.message, "seconds": round(time.time() - self.started, 1)}


class Viewer:
  """The models of one run and everything computed per slide (cached)."""

  def __init__(self, workdir: str, slides_source: str | dict[str, dict[str, Any]],
               cache_dir: str | None = None):
    self.workdir = storage.absolute(workdir)
    self.slides = (dict(slides_source) if isinstance(slides_source, dict)
                   else catalog(slides_source))
    self.align_dir, self.instruct_dir = infer.resolve_runs(self.workdir)
    self.task, self.model = predict.load_align(self.align_dir, name=f"--workdir {workdir}")
    self.graphdef, self.state = nnx.split(self.model)
    self.scorer = heatmaps.HeatmapScorer()
    self._encoder = None
    self._lock = threading.Lock()                 # guards the dicts below
    self._slide_locks: dict[str, threading.Lock] = {}
    self._open: dict[str, slides.Slide] = {}
    self._prepared: dict[str, dict[str, Any]] = {}
    self._jobs: dict[str, _Job] = {}
    self._extract_lock = threading.Lock()         # one extraction at a time (CPU-bound)
    self._instruct: tuple[Any, Any] | None = None  # (task, model), loaded on the first question
    self._instruct_lock = threading.Lock()
    self._recorded = {r["slide_id"] for r in self.task.shards.rows}
    self.cache_dir = storage.absolute(cache_dir or storage.join(self.workdir, "viewer_features"))
    self._on_disk = {s for s in self.slides if s not in self._recorded and self._cached(s)}

  # ------------------------------------------------------------------------ feature cache
  def _cache_path(self, slide_id: str) -> str:
    # Ids may hold any character: a readable stem plus a hash keeps file names safe and apart.
    digest = hashlib.sha256(slide_id.encode()).hexdigest()[:12]
    return storage.join(self.cache_dir, f"{heatmaps.safe_name(slide_id)}-{digest}.npz")

  def _cache_key(self, slide_id: str) -> str:
    """What the cached features depend on: the slide file, the encoder's weights, the tiling."""
    path = self.entry(slide_id)["path"]
    identity = self.task.shards.identity
    return json.dumps({"slide": path, "slide_bytes": storage.size(path),
                       "weights_hash": identity.get("weights_hash", ""),
                       "encoder": identity.get("encoder", ""),
                       "tiling": identity.get("tiling") or {}}, sort_keys=True, default=str)

  def _cached(self, slide_id: str) -> bool:
    """True when the slide's cached features exist and were made from what the run uses now."""
    path = self._cache_path(slide_id)
    try:
      if not storage.exists(path):
        return False
      # npz members load lazily: from a local cache only the key is read, so start-up does not
      # read every cached slide's features (an object store's file still comes whole).
      with storage.open_file(path, "rb") as f, np.load(f) as cached:
        return str(cached["key"]) == self._cache_key(slide_id)
    except (OSError, ValueError, KeyError) as e:
      print(f"[serve] {path}: unreadable feature cache ({e}); the slide will be re-extracted",
            file=sys.stderr, flush=True)
      return False

  def _write_cache(self, slide_id: str, features, coords, patch_size_level0) -> None:
    out = io.BytesIO()
    np.savez(out, features=np.asarray(features), coords=np.asarray(coords),
             patch_size_level0=np.float64(patch_size_level0), key=self._cache_key(slide_id))
    storage.makedirs(self.cache_dir)
    storage.write_bytes(self._cache_path(slide_id), out.getvalue())

  # ------------------------------------------------------------------------------ slides
  def entry(self, slide_id: str) -> dict[str, Any]:
    if slide_id not in self.slides:
      raise NotFound(f"no slide {slide_id!r}")
    return self.slides[slide_id]

  def _slide_lock(self, slide_id: str) -> threading.Lock:
    with self._lock:
      return self._slide_locks.setdefault(slide_id, threading.Lock())

  def _slide(self, slide_id: str) -> slides.Slide:
    entry = self.entry(slide_id)
    with self._lock:
      slide = self._open.get(slide_id)
    if slide is None:
      slide = slides.Slide(entry["path"], mpp=entry["mpp"])
      with self._lock:
        slide = self._open.setdefault(slide_id, slide)
    return slide

  def describe(self, slide_id: str) -> dict[str, Any]:
    """What the page needs to open a slide."""
    slide = self._slide(slide_id)
    info = slide.info
    return {"id": slide_id, "width": info.width, "height": info.height, "mpp": info.mpp,
            "tile_size": TILE_SIZE, "features": self.feature_state(slide_id),
            "has_decoder": self.instruct_dir is not None}

  def list_slides(self) -> list[dict[str, Any]]:
    return [{"id": s, "name": storage.basename(e["path"]), "features": self.feature_state(s)}
            for s, e in self.slides.items()]

  def thumbnail(self, slide_id: str) -> bytes:
    slide = self._slide(slide_id)
    with self._slide_lock(slide_id):
      pixels = slide.thumbnail(THUMBNAIL_SIDE)
    return _jpeg(pixels)

  def dzi(self, slide_id: str) -> str:
    info = self._slide(slide_id).info
    return ('<?xml version="1.0" encoding="UTF-8"?>'
            '<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" Format="jpeg" '
            f'Overlap="0" TileSize="{TILE_SIZE}"><Size Width="{info.width}" '
            f'Height="{info.height}"/></Image>')

  def tile(self, slide_id: str, level: int, col: int, row: int) -> bytes:
    """A DeepZoom tile: level ``max_level`` is level 0 of the slide, each level below halves."""
    slide = self._slide(slide_id)
    info = slide.info
    max_level = math.ceil(math.log2(max(info.width, info.height)))
    if not 0 <= level <= max_level:
      raise NotFound(f"slide {slide_id!r} has DeepZoom levels 0-{max_level}, not {level}")
    scale = 2 ** (max_level - level)
    level_w, level_h = math.ceil(info.width / scale), math.ceil(info.height / scale)
    x, y = col * TILE_SIZE, row * TILE_SIZE
    if col < 0 or row < 0 or x >= level_w or y >= level_h:
      raise NotFound(f"no tile {col}_{row} at level {level} of slide {slide_id!r}")
    out_w, out_h = min(TILE_SIZE, level_w - x), min(TILE_SIZE, level_h - y)
    x0, y0 = x * scale, y * scale
    w0, h0 = min(out_w * scale, info.width - x0), min(out_h * scale, info.height - y0)
    with self._slide_lock(slide_id):
      pixels = slide.read_region(x0, y0, w0, h0, out_w, out_h)
    return _jpeg(pixels)

  # ---------------------------------------------------------------------------- features
  def feature_state(self, slide_id: str) -> str:
    """"ready" (cached, or in the run's feature records), "extracting", "error" or "none"."""
    with self._lock:
      if slide_id in self._prepared or slide_id in self._recorded or slide_id in self._on_disk:
        return "ready"
      job = self._jobs.get(slide_id)
    return "none" if job is None else {"done": "ready"}.get(job.state, job.state)

  def job(self, slide_id: str) -> dict[str, Any]:
    self.entry(slide_id)
    if self.feature_state(slide_id) == "ready":
      return {"state": "ready"}
    with self._lock:
      job = self._jobs.get(slide_id)
    return {"state": "none"} if job is None else job.as_dict()

  def start_extraction(self, slide_id: str) -> dict[str, Any]:
    """Starts extracting the slide's features in the background (nothing if under way)."""
    self.entry(slide_id)
    with self._lock:
      if slide_id in self._prepared or slide_id in self._recorded or slide_id in self._on_disk:
        return {"state": "ready"}
      job = self._jobs.get(slide_id)
      if job is not None and job.state in ("waiting", "extracting"):
        return job.as_dict()
      job = self._jobs[slide_id] = _Job()
    threading.Thread(target=self._extract, args=(slide_id, job), daemon=True,
                     name=f"extract-{slide_id}").start()
    return job.as_dict()

  def _extract(self, slide_id: str, job: _Job) -> None:
    try:
      with self._extract_lock:
        job.state = "extracting"
        if self._encoder is None:
          identity, features_dir = self.task.shards.identity, self.task.config.features_dir
          params = infer.tiling_params(identity, features_dir)
          _, embed = infer.build_patch_encoder(identity, features_dir, params.patch_size)
          self._encoder = (params, embed)
        params, embed = self._encoder
        slide = self._slide(slide_id)

        def progress(done, total):
          job.done, job.total = done, total

        with self._slide_lock(slide_id):
          tiles = infer.tile_and_embed(slide, slide_id, params, embed, progress=progress)
        fields = tiles["features"], tiles["coords"], tiles["patch_size_level0"]
        self._store(slide_id, *fields)
        self._write_cache(slide_id, *fields)
        job.state = "done"
    except Exception as e:  # noqa: BLE001 - reported to the page, the server goes on
      job.state, job.message = "error", f"{type(e).__name__}: {e}"

  def _store(self, slide_id: str, features, coords, patch_size_level0) -> dict[str, Any]:
    element = {"features": np.asarray(features), "coords": np.asarray(coords),
               "patch_size_level0": float(patch_size_level0),
               "text": slide_examples.SlideText(slide_id, "", (), -1), "slide_index": 0}
    example = slide_examples.build_example(element, self.task.example_config,
                                           self.task.tokenizer, None)
    prepared = {"example": example, "coords": np.asarray(coords, np.int64),
                "patch_size_level0": float(patch_size_level0), "encoded": None}
    with self._lock:
      self._prepared[slide_id] = prepared
    return prepared

  def prepared(self, slide_id: str) -> dict[str, Any]:
    """The slide's example (features, regions), from the cache or the run's records."""
    self.entry(slide_id)
    with self._lock:
      found = self._prepared.get(slide_id)
    if found is not None:
      return found
    if slide_id in self._on_disk:
      with np.load(io.BytesIO(storage.read_bytes(self._cache_path(slide_id)))) as cached:
        return self._store(slide_id, cached["features"], cached["coords"],
                           float(cached["patch_size_level0"]))
    if slide_id not in self._recorded:
      raise BadRequest(f"slide {slide_id!r} has no features yet: POST "
                       f"/api/slides/{slide_id}/features to extract them", status=409)
    record = self.task.shards.get(slide_id)
    return self._store(slide_id, record["features"], record["coords"],
                       record["patch_size_level0"])

  # ------------------------------------------------------------------------------ models
  def _tokens(self, texts: list[str]) -> np.ndarray:
    return self.task.tokenizer.encode_batch(texts, self.task.example_config.subcaption_len)

  def heatmap(self, slide_id: str, phrase: str) -> dict[str, Any]:
    """Raw and min-max normalised patch scores of ``phrase``, with the patch grid."""
    phrase = _phrase(phrase)
    prepared = self.prepared(slide_id)
    scores = self.scorer(self.model, prepared["example"], self._tokens([phrase]))[0]
    return {"phrase": phrase, "scores": scores, "normalised": heatmaps.normalise(scores),
            "coords": prepared["coords"], "patch_size_level0": prepared["patch_size_level0"]}

  def heatmap_png(self, slide_id: str, phrase: str) -> tuple[bytes, dict[str, Any]]:
    """The heatmap as an RGBA image of one pixel per patch cell over the whole slide (clear
    where there is no patch), and where it goes (level-0 pixels per image pixel)."""
    result = self.heatmap(slide_id, phrase)
    info = self._slide(slide_id).info
    size = result["patch_size_level0"]
    cols, rows = math.ceil(info.width / size), math.ceil(info.height / size)
    rgba = np.zeros((rows, cols, 4), np.uint8)
    cells = np.floor(result["coords"] / size).astype(int)
    inside = (cells[:, 0] < cols) & (cells[:, 1] < rows)
    cells, values = cells[inside], result["normalised"][inside]
    rgba[cells[:, 1], cells[:, 0], :3] = heatmaps.colormap(values)
    rgba[cells[:, 1], cells[:, 0], 3] = 255
    out = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(out, format="PNG")
    scores = result["scores"]
    meta = {"phrase": result["phrase"], "columns": cols, "rows": rows, "cell": size,
            "min": float(scores.min()), "max": float(scores.max()),
            "patches": int(len(scores)),
            # Level-0 centre of the highest-scoring patch: where a client zooms to show it.
            "peak": (result["coords"][int(np.argmax(scores))] + size / 2).tolist()}
    return out.getvalue(), meta

  def heatmap_geojson(self, slide_id: str, phrase: str) -> dict:
    result = self.heatmap(slide_id, phrase)
    return heatmaps.geojson(result["coords"], result["patch_size_level0"], result["scores"],
                            result["phrase"])

  def _encoded(self, slide_id: str) -> dict[str, Any]:
    prepared = self.prepared(slide_id)
    if prepared["encoded"] is None:
      texts, owner, score = infer._zero_shot_prompts(self.task.config)  # noqa: SLF001
      keys = ("features", "patch_valid", "region_index", "region_patch_valid", "region_valid",
              "region_pos")
      batch = {k: jnp.asarray(prepared["example"][k])[None] for k in keys}
      encoded, prompts_te, region_t = jax.device_get(infer._encode(  # noqa: SLF001
          self.graphdef, self.state, batch, jnp.asarray(self._tokens(texts))))
      prepared["encoded"] = {"encoded": encoded, "prompts": np.asarray(prompts_te),
                             "region": np.asarray(region_t), "owner": owner, "score": score}
    return prepared["encoded"]

  def zero_shot(self, slide_id: str) -> dict[str, Any]:
    enc = self._encoded(slide_id)
    return infer.zero_shot(self.task.class_names, np.asarray(enc["encoded"]["slide"])[0],
                           enc["prompts"], enc["region"], enc["owner"], enc["score"],
                           float(self.task.config.loss.temperature))

  def _visual(self, slide_id: str) -> dict[str, np.ndarray]:
    # Imported on first use: the instruct stage pulls in the decoder, which align runs never need.
    from pathflip_jax.tasks import instruct as instruct_task
    if self.instruct_dir is None:
      raise BadRequest(f"{self.workdir} is an align run: no decoder for captions and "
                       "questions (serve an instruct run)", status=404)
    prepared, enc = self.prepared(slide_id), self._encoded(slide_id)["encoded"]
    return instruct_task.slide_visual_tokens(
        np.asarray(enc["slide"])[0], np.asarray(enc["regions"])[0],
        np.asarray(enc["region_valid"])[0], prepared["example"]["region_pos"],
        prepared["coords"], prepared["patch_size_level0"],
        self.task.example_config.region_patches, self.model.config.embed_dim)

  def _ask(self, slide_id: str, questions: list[str], caption: bool) -> dict[str, Any]:
    """The instruct run, loaded once, on the slide; one request at a time (generation shares
    the task's state and the CPU)."""
    visual = self._visual(slide_id)
    with self._instruct_lock:
      if self._instruct is None:
        self._instruct = infer.load_instruct(self.instruct_dir)
      return infer.ask_loaded(*self._instruct, visual, questions, caption=caption)

  def caption(self, slide_id: str) -> dict[str, Any]:
    prepared = self.prepared(slide_id)
    if "caption" not in prepared:
      prepared["caption"] = self._ask(slide_id, [], caption=True).get("caption")
    return {"caption": prepared["caption"]}

  def answer(self, slide_id: str, question: str) -> dict[str, Any]:
    question = _phrase(question, "question")
    try:
      infer._parse_question(question)  # noqa: SLF001
    except infer.InferError as e:
      raise BadRequest(str(e)) from None
    return self._ask(slide_id, [question], caption=False)["answers"][0]


def _phrase(text: str | None, what: str = "phrase") -> str:
  text = (text or "").strip()
  if not text:
    raise BadRequest(f"an empty {what}")
  if len(text) > MAX_PHRASE:
    raise BadRequest(f"the {what} has {len(text)} characters; at most {MAX_PHRASE}", status=413)
  return text


def _jpeg(pixels: np.ndarray) -> bytes:
  out = io.BytesIO()
  Image.fromarray(np.asarray(pixels, np.uint8)).save(out, format="JPEG", quality=85)
  return out.getvalue()


def colorbar_png(width: int = 256, height: int = 12) -> bytes:
  """The heatmaps' colour ramp, low to high, left to right."""
  ramp = heatmaps.colormap(np.linspace(0.0, 1.0, width))
  out = io.BytesIO()
  Image.fromarray(np.repeat(ramp[None], height, axis=0)).save(out, format="PNG")
  return out.getvalue()


# ------------------------------------------------------------------------------- the app


def create_app(viewer: Viewer):
  """The Starlette app over ``viewer``."""
  from starlette.applications import Starlette  # pylint: disable=import-outside-toplevel
  from starlette.exceptions import HTTPException  # pylint: disable=import-outside-toplevel
  from starlette.responses import (  # pylint: disable=import-outside-toplevel
      FileResponse, JSONResponse, Response)
  from starlette.routing import Mount, Route  # pylint: disable=import-outside-toplevel
  from starlette.staticfiles import StaticFiles  # pylint: disable=import-outside-toplevel

  def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)

  def handled(function):
    """Runs ``function(request)`` in the thread pool; errors become JSON."""
    from starlette.concurrency import run_in_threadpool  # pylint: disable=import-outside-toplevel

    async def endpoint(request):
      try:
        if int(request.headers.get("content-length") or 0) > MAX_BODY:
          return error(413, f"request body over {MAX_BODY} bytes")
        body = await request.body() if request.method == "POST" else b""
        if len(body) > MAX_BODY:
          return error(413, f"request body over {MAX_BODY} bytes")
        return await run_in_threadpool(function, request, body)
      except NotFound as e:
        return error(404, str(e))
      except BadRequest as e:
        return error(e.status, str(e))
      except slides.SlideError as e:
        return error(422, f"the slide cannot be read ({e.reason}): {e.message}")
      except Exception as e:  # noqa: BLE001 - never a traceback to the page
        print(f"[serve] {request.url.path}: {type(e).__name__}: {e}", file=sys.stderr,
              flush=True)
        return error(500, f"{type(e).__name__}: {e}")

    return endpoint

  def slide_id(request) -> str:
    value = request.path_params["slide_id"]
    viewer.entry(value)
    return value

  def json_body(body: bytes) -> dict[str, Any]:
    try:
      value = json.loads(body or b"{}")
    except ValueError:
      raise BadRequest("the request body is not JSON") from None
    if not isinstance(value, dict):
      raise BadRequest("the request body must be a JSON object")
    return value

  def index(request, body):
    return FileResponse(os.path.join(STATIC_DIR, "index.html"))

  def list_slides(request, body):
    return JSONResponse({"slides": viewer.list_slides(), "workdir": viewer.workdir,
                         "has_decoder": viewer.instruct_dir is not None})

  def describe(request, body):
    return JSONResponse(viewer.describe(slide_id(request)))

  def thumbnail(request, body):
    return Response(viewer.thumbnail(slide_id(request)), media_type="image/jpeg")

  def dzi(request, body):
    return Response(viewer.dzi(slide_id(request)), media_type="application/xml")

  def tile(request, body):
    p = request.path_params
    return Response(viewer.tile(slide_id(request), p["level"], p["col"], p["row"]),
                    media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

  def features(request, body):
    sid = slide_id(request)
    if request.method == "POST":
      return JSONResponse(viewer.start_extraction(sid), status_code=202)
    return JSONResponse(viewer.job(sid))

  def heatmap_png(request, body):
    png, meta = viewer.heatmap_png(slide_id(request), request.query_params.get("q"))
    return Response(png, media_type="image/png",
                    headers={"X-Heatmap": json.dumps(meta), "Cache-Control": "no-store"})

  def heatmap_meta(request, body):
    _, meta = viewer.heatmap_png(slide_id(request), request.query_params.get("q"))
    return JSONResponse(meta)

  def heatmap_geojson(request, body):
    sid = slide_id(request)
    phrase = request.query_params.get("q")
    name = heatmaps.safe_name(_phrase(phrase))
    return JSONResponse(viewer.heatmap_geojson(sid, phrase), headers={
        "Content-Disposition": f'attachment; filename="{sid}__{name}.geojson"'})

  def zero_shot(request, body):
    return JSONResponse(viewer.zero_shot(slide_id(request)))

  def caption(request, body):
    return JSONResponse(viewer.caption(slide_id(request)))

  def question(request, body):
    return JSONResponse(viewer.answer(slide_id(request), json_body(body).get("question")))

  def colorbar(request, body):
    return Response(colorbar_png(), media_type="image/png")

  async def not_found(request, exc):
    status = getattr(exc, "status_code", 404)
    return error(status, f"{request.url.path}: {exc.detail}" if hasattr(exc, "detail")
                 else "not found")

  slide = "/api/slides/{slide_id}"
  routes = [
      Route("/", handled(index)),
      Route("/api/slides", handled(list_slides)),
      Route("/api/colorbar.png", handled(colorbar)),
      Route(slide, handled(describe)),
      Route(slide + "/thumbnail.jpg", handled(thumbnail)),
      Route(slide + "/slide.dzi", handled(dzi)),
      Route(slide + "/slide_files/{level:int}/{col:int}_{row:int}.jpeg", handled(tile)),
      Route(slide + "/features", handled(features), methods=["GET", "POST"]),
      Route(slide + "/heatmap.png", handled(heatmap_png)),
      Route(slide + "/heatmap.json", handled(heatmap_meta)),
      Route(slide + "/heatmap.geojson", handled(heatmap_geojson)),
      Route(slide + "/zero_shot", handled(zero_shot)),
      Route(slide + "/caption", handled(caption)),
      Route(slide + "/question", handled(question), methods=["POST"]),
      Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
  ]
  return Starlette(routes=routes, exception_handlers={HTTPException: not_found})


def check_static() -> None:
  """OpenSeadragon is installed by setup.sh (never loaded from a CDN): say so when missing."""
  if not os.path.exists(os.path.join(OPENSEADRAGON_DIR, "openseadragon.min.js")):
    raise SystemExit(f"{OPENSEADRAGON_DIR}/openseadragon.min.js is missing: run bash setup.sh "
                     "(it installs the pinned OpenSeadragon from npm)")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="an align or instruct run")
  parser.add_argument("--slides", required=True,
                      help="a manifest (slide_id, path per row) or a folder of slide files")
  parser.add_argument("--host", default="127.0.0.1",
                      help="address to bind (default: this machine only)")
  parser.add_argument("--port", type=int, default=8000)
  parser.add_argument("--cache_dir", default=None,
                      help="where features extracted on first open are kept "
                           "(default: WORKDIR/viewer_features)")
  args = parser.parse_args(argv)
  check_static()
  import uvicorn  # pylint: disable=import-outside-toplevel
  try:
    viewer = Viewer(args.workdir, args.slides, cache_dir=args.cache_dir)
  except (FileNotFoundError, infer.InferError, manifest_lib.ManifestError) as e:
    raise SystemExit(f"[serve] {e}") from None
  print(f"[serve] {len(viewer.slides)} slides, run {viewer.workdir}: "
        f"http://{args.host}:{args.port}/", file=sys.stderr, flush=True)
  uvicorn.run(create_app(viewer), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
  main()
