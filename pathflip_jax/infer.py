r"""One slide file in, PathFLIP's outputs out: zero-shot diagnosis, caption, answers, heatmaps.

  python -m pathflip_jax.infer --workdir W --slide FILE [--query "..."]... [--question "..."]... \
      --output_dir O [--mpp 0.5] [--heatmap_method contribution] [--extract_config C]

``W`` is a finished run: an instruct run (all outputs) or an align run (no caption or answers).
The slide is tiled in-process with the tiling parameters its features were made with (the Beam
job's planning and reading code), its patches are embedded by the same patch encoder
(``features.json``'s ``encoder_config``, checked against the recorded weights hash), and the
align run's model encodes it. A question with options (``"Which tissue is present? | fat |
necrosis | tumour | stroma"``) is asked as multiple choice, one without as an open question.
Without ``--query`` the class names of the zero-shot task are the queries. The heatmaps read each
region's contribution to a query's match (what localization is evaluated with);
``--heatmap_method attention`` reads the text-conditioned attention weights instead.

Writes to ``O``:

  summary.json                      everything below, with paths
  index.html                        the page that shows it together
  thumbnail.png                     the slide, with the tiled tissue outlined
  heatmaps/<slide>__<query>.png     heatmap over the thumbnail, query in the title, colour bar
  heatmaps/<slide>__<query>.geojson QuPath detections (one square per patch, score measurements)
  heatmaps/<slide>__<query>_contours.geojson  QuPath annotations: outlines of the areas scoring
                                    at least half the slide's range
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import json
import os
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from PIL import Image, ImageDraw

from pathflip_jax import checkpointing, config_args, heatmaps, predict, sharding, storage
from pathflip_jax.data import instructions as ins
from pathflip_jax.data import slide_examples, slides, tiling, tissue
from pathflip_jax.evaluators import common

THUMBNAIL_SIDE = 1024


class InferError(Exception):
  """Input the command cannot use; the message names the file or flag."""


def _log(message: str) -> None:
  print(f"[infer] {message}", file=sys.stderr, flush=True)


def _run_config(workdir: str, stage: str | tuple[str, ...]) -> ml_collections.ConfigDict:
  try:
    return checkpointing.run_config(workdir, stage, f"--workdir {workdir}")
  except (FileNotFoundError, ValueError) as e:
    raise InferError(str(e)) from e


def resolve_runs(workdir: str) -> tuple[str, str | None]:
  """(align workdir, instruct workdir or None) of ``workdir``."""
  config = _run_config(workdir, ("align", "instruct"))
  if config.stage == "instruct":
    return config.align_workdir, workdir
  return workdir, None


# ------------------------------------------------------------------------- tiling + features


def tiling_params(identity: dict[str, Any], features_dir: str) -> tiling.TilingParams:
  """The tiling parameters the align run's features were made with."""
  fields = dict(identity.get("tiling") or {})
  if not fields:
    raise InferError(f"{features_dir}/features.json records no tiling parameters; these "
                     "features were not made by data_prep.extract_features")
  known = {f.name for f in dataclasses.fields(tiling.TilingParams)}
  fields = {k: v for k, v in fields.items() if k in known}
  fields["tissue"] = tissue.TissueParams(**fields.get("tissue", {}))
  return tiling.TilingParams(**fields)


def build_patch_encoder(identity: dict[str, Any], features_dir: str, patch_size: int,
                        extract_config: str = ""):
  """The patch encoder the features were extracted with, rebuilt and checked by weights hash."""
  from data_prep import extract_features  # pylint: disable=import-outside-toplevel
  if extract_config:
    config = config_args.load_config(extract_config)
  else:
    recorded = identity.get("encoder_config")
    if not recorded:
      raise InferError(
          f"{features_dir}/features.json does not say how to rebuild its encoder "
          f"({identity.get('encoder', '?')}, source {identity.get('source', '?')}): pass "
          "--extract_config configs/extract_features.py:... as used for the features")
    config = config_args.load_config(extract_features.DEFAULT_CONFIG)
    config.update(recorded)
  encoder = extract_features.build_encoder(config, patch_size)
  expected = identity.get("weights_hash")
  if expected and encoder.weights_hash != expected:
    raise InferError(
        f"the patch encoder rebuilt for {features_dir} ({encoder.name}, {encoder.weights_source})"
        f" has weights sha256 {encoder.weights_hash[:12]}, the features were extracted with "
        f"{expected[:12]}: the encoder's weights changed since")
  return encoder, extract_features.make_embed_fn(encoder, sharding.make_mesh(),
                                                 extract_features.compute_dtype(config.dtype))


def tile_and_embed(slide: slides.Slide, slide_id: str, params: tiling.TilingParams,
                   embed, batch_size: int = 32,
                   progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
  """Plans the slide's tissue patches, reads them batch by batch and embeds them;
  ``progress(done, total)`` after each batch."""
  plan, pictures = tiling.plan_slide(slide, slide_id, params)
  total = int(len(plan.cells))
  if not total:
    raise InferError(f"{slide.info.path}: no tissue patches found (tissue fraction "
                     f"{plan.tissue_fraction:.3f} of the slide; min_tissue_fraction "
                     f"{params.min_tissue_fraction} per patch)")
  _log(f"{total} tissue patches of {plan.patch_size} px at {plan.patch_mpp:.2f} µm/px "
       f"(level {plan.level}, {plan.grid_cols} x {plan.grid_rows} grid)")
  devices = jax.device_count()
  batch_size = -(-batch_size // devices) * devices
  features, coords, pending = [], [], []
  done, last = 0, time.time()

  def flush():
    nonlocal done, last
    images = np.stack(pending)
    real = len(images)
    if real < batch_size:  # one compiled shape: pad the last batch
      images = np.concatenate([images, np.zeros((batch_size - real,) + images.shape[1:],
                                                images.dtype)])
    features.append(np.asarray(jax.device_get(embed(images)))[:real])
    done += real
    pending.clear()
    if progress is not None:
      progress(done, total)
    if time.time() - last > 5 or done == total:
      _log(f"embedded {done}/{total} patches")
      last = time.time()

  for b in range(plan.num_batches):
    for record in tiling.read_batch(slide, plan, b, params):
      pending.append(tiling.decode_jpeg(record["jpeg"]))
      coords.append((record["x"], record["y"]))
      if len(pending) == batch_size:
        flush()
  if pending:
    flush()
  return {"features": np.concatenate(features).astype(np.float16),
          "coords": np.asarray(coords, np.int64),
          "patch_size_level0": float(plan.patch_size_level0), "plan": plan,
          "pictures": pictures}


# ------------------------------------------------------------------------------ the model


def _zero_shot_prompts(align_config) -> tuple[list[str], np.ndarray, str]:
  """The prompt texts, their class and the score of the align run's slide_zero_shot evaluator
  (class names and the slide score when it has none)."""
  evaluator = next((e for e in (align_config.get("evals") or {}).values()
                    if e.get("type") == "slide_zero_shot"), ml_collections.ConfigDict())
  texts, owner = common.class_prompts(evaluator, list(align_config.class_names))
  return texts, owner, evaluator.get("score", "slide")


@jax.jit
def _encode(graphdef, state, batch, prompt_tokens):
  model = nnx.merge(graphdef, state)
  encoded = model.encode_slides(batch)
  prompts_te = model.encode_texts(prompt_tokens)
  text_bte = prompts_te[None]
  region = model.region_scores(text_bte, encoded["regions"], encoded["region_valid"])[0]
  return encoded, prompts_te, region


def zero_shot(class_names: Sequence[str], slide_e: np.ndarray, prompts_te: np.ndarray,
              region_t: np.ndarray, owner: np.ndarray, score: str, temperature: float
              ) -> dict[str, Any]:
  """Class scores as the slide_zero_shot evaluator computes them, and softmax(score / tau)."""
  slide_s = common.class_embeddings(prompts_te, owner, len(class_names)) @ slide_e
  region_s = np.array([region_t[owner == c].mean() for c in range(len(class_names))])
  chosen = {"slide": slide_s, "region": region_s, "both": slide_s + region_s}[score]
  logits = chosen / temperature
  probs = np.exp(logits - logits.max())
  probs /= probs.sum()
  order = np.argsort(-probs)
  return {"prediction": class_names[int(order[0])], "score": score, "temperature": temperature,
          "classes": [{"name": class_names[int(c)], "probability": float(probs[c]),
                       "slide_score": float(slide_s[c]), "region_score": float(region_s[c])}
                      for c in order]}


def _parse_question(text: str) -> ins.Instruction:
  parts = [p.strip() for p in text.split("|")]
  question, options = parts[0], tuple(p for p in parts[1:] if p)
  if not question:
    raise InferError(f"--question {text!r}: empty question")
  if options:
    if not 2 <= len(options) <= len(ins.LETTERS):
      raise InferError(f"--question {text!r}: {len(options)} options; give 2 to "
                       f"{len(ins.LETTERS)} after the question, separated by '|'")
    return ins.Instruction(slide=0, kind=ins.MULTIPLE_CHOICE, question=question,
                           options=options, answer=ins.LETTERS[0], category="user")
  return ins.Instruction(slide=0, kind=ins.OPEN, question=question, category="user")


def load_instruct(instruct_dir: str) -> tuple[Any, Any]:
  """(task, model) of an instruct run, for :func:`ask_loaded`."""
  config = _run_config(instruct_dir, "instruct")
  return predict.load_run(instruct_dir, config=config)


def ask(instruct_dir: str, visual: dict[str, np.ndarray], questions: Sequence[str]
        ) -> dict[str, Any]:
  """The instruct run's caption of the slide and answers to ``questions`` (greedy; at most as
  many tokens as the run's captioning and VQA evaluators generate)."""
  return ask_loaded(*load_instruct(instruct_dir), visual, questions)


def ask_loaded(task: Any, model: Any, visual: dict[str, np.ndarray], questions: Sequence[str],
               caption: bool = True) -> dict[str, Any]:
  """:func:`ask` with the run already loaded; ``caption=False`` answers the questions only.
  Not thread-safe: the slide's tokens go into ``task.visual["infer"]``."""
  config = task.config
  evals = config.get("evals") or {}
  caption_tokens = next((e.max_new_tokens for e in evals.values()
                         if e.get("type") == "captioning"), 256)
  answer_tokens = next((e.max_new_tokens for e in evals.values() if e.get("type") == "vqa"), 48)
  if len(visual["tokens"]) > task.sequence.max_visual:
    raise InferError(f"the slide has {len(visual['tokens'])} visual tokens; the instruct run "
                     f"takes at most {task.sequence.max_visual}")
  task.visual["infer"] = [visual]
  caption = caption and bool(config.get("caption_prompt"))
  items = ([ins.Instruction(slide=0, kind=ins.CAPTION, question=config.caption_prompt)]
           if caption else [])
  items += [_parse_question(q) for q in questions]
  if not items:
    return {}
  longest = max(len(ins.encode_prompt(task.tokenizer, ins.render(i, task.template, None)[0],
                                      len(visual["tokens"]))) for i in items)
  prompt_len = -(-longest // 16) * 16
  out: dict[str, Any] = {}
  start = 0
  if caption:
    out["caption"] = task.generate(model, "infer", items[:1], prompt_len=prompt_len,
                                   max_new_tokens=caption_tokens, batch_size=1)[0]
    start = 1
  if items[start:]:
    answers = task.generate(model, "infer", items[start:], prompt_len=prompt_len,
                            max_new_tokens=answer_tokens, batch_size=len(items) - start)
    out["answers"] = [{"question": q, "answer": a} for q, a in zip(questions, answers)]
  return out


# ------------------------------------------------------------------------------ outputs


def _thumbnail_with_tissue(thumb: np.ndarray, downsample: float, coords: np.ndarray,
                           patch_size_level0: float) -> Image.Image:
  image = Image.fromarray(thumb)
  draw = ImageDraw.Draw(image)
  side = patch_size_level0 / downsample
  for x, y in coords / downsample:
    draw.rectangle([x, y, x + side, y + side], outline=(20, 120, 60))
  return image


def write_page(output_dir: str, summary: dict[str, Any]) -> str:
  """index.html: thumbnail, zero-shot table, caption, answers and the heatmaps, side by side."""
  e = html.escape
  parts = [f"<!doctype html><meta charset='utf-8'><title>{e(summary['slide_id'])}</title>",
           "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
           "img{max-width:100%}td,th{padding:2px 8px;text-align:left}"
           ".grid{display:grid;grid-template-columns:1fr 1fr;gap:1em}"
           ".bar{background:#c0392b;height:10px}</style>",
           f"<h1>{e(summary['slide_id'])}</h1>",
           f"<p>{e(summary['slide'])}<br>{summary['num_patches']} tissue patches; run "
           f"{e(summary['workdir'])} (checkpoint {e(summary['align_checkpoint'])})</p>",
           "<img src='thumbnail.png' alt='thumbnail'>"]
  zs = summary.get("zero_shot")
  if zs:
    parts.append(f"<h2>Zero-shot: {e(zs['prediction'])}</h2><table><tr><th>class</th>"
                 "<th>probability</th><th></th></tr>")
    for row in zs["classes"]:
      width = int(200 * row["probability"])
      parts.append(f"<tr><td>{e(row['name'])}</td><td>{row['probability']:.3f}</td>"
                   f"<td><div class='bar' style='width:{width}px'></div></td></tr>")
    parts.append(f"</table><p><small>softmax of the {e(zs['score'])} scores / "
                 f"{zs['temperature']}: a ranking, not calibrated probabilities</small></p>")
  if summary.get("caption"):
    parts.append(f"<h2>Caption</h2><p>{e(summary['caption'])}</p>")
  if summary.get("answers"):
    parts.append("<h2>Questions</h2><dl>")
    for qa in summary["answers"]:
      parts.append(f"<dt><b>{e(qa['question'])}</b></dt><dd>{e(qa['answer'])}</dd>")
    parts.append("</dl>")
  if summary.get("heatmaps"):
    parts.append("<h2>Heatmaps</h2><div class='grid'>")
    for h in summary["heatmaps"]:
      png, geo, outline = (os.path.relpath(h[k], output_dir)
                           for k in ("png", "geojson", "contours"))
      parts.append(f"<figure><img src='{e(png)}' alt='{e(h['query'])}'><figcaption>"
                   f"{e(h['query'])} &middot; QuPath GeoJSON: <a href='{e(geo)}'>patches</a>, "
                   f"<a href='{e(outline)}'>outlines</a></figcaption></figure>")
    parts.append("</div>")
  path = os.path.join(output_dir, "index.html")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(parts) + "\n")
  return path


def infer(workdir: str, slide_path: str, output_dir: str, queries: Sequence[str] = (),
          questions: Sequence[str] = (), mpp: float | None = None,
          heatmap_method: str = heatmaps.METHODS[0], extract_config: str = ""
          ) -> dict[str, Any]:
  """Runs everything on one slide; returns the summary (also ``output_dir/summary.json``)."""
  t0 = time.time()
  workdir = storage.absolute(workdir)
  try:
    storage.check_reachable(workdir, "--workdir", must_exist=True)
    storage.check_reachable(slide_path, "--slide", must_exist=True)
  except (storage.StorageError, FileNotFoundError) as e:
    raise InferError(str(e)) from None
  # Outputs for a URL are written in the local cache and uploaded together at the end.
  final_dir = output_dir
  if storage.is_url(output_dir):
    output_dir = storage.cache().staging(output_dir)
  align_dir, instruct_dir = resolve_runs(workdir)
  if questions and instruct_dir is None:
    raise InferError(f"--question needs an instruct run; {workdir} is an align run")
  if heatmap_method not in heatmaps.METHODS:
    raise InferError(f"--heatmap_method {heatmap_method!r}: expected one of {heatmaps.METHODS}")
  questions = list(questions)
  for q in questions:
    _parse_question(q)                          # fail on a malformed question before the work
  slide_id = os.path.splitext(storage.basename(slide_path))[0]
  try:
    slide = slides.Slide(slide_path, mpp=mpp)
  except slides.SlideError as e:
    raise InferError(f"cannot read slide {slide_path} ({e.reason}): {e.message}") from None

  from pathflip_jax.tasks import instruct as instruct_task  # pylint: disable=import-outside-toplevel
  align_checkpoint = checkpointing.model_checkpoint(align_dir)
  _log(f"loading the align run {align_dir} (checkpoint {align_checkpoint})")
  task, model = predict.load_align(align_dir, name=f"--workdir {workdir}")
  identity, features_dir = task.shards.identity, task.config.features_dir
  params = tiling_params(identity, features_dir)
  _, embed = build_patch_encoder(identity, features_dir, params.patch_size, extract_config)
  os.makedirs(os.path.join(output_dir, "heatmaps"), exist_ok=True)
  with slide:
    _log(f"{slide_path}: {slide.info.width} x {slide.info.height} px at {slide.info.mpp:.3f} "
         f"µm/px ({slide.info.reader})")
    tiles = tile_and_embed(slide, slide_id, params, embed)
    thumb = slide.thumbnail(THUMBNAIL_SIDE)
    downsample = slide.info.width / thumb.shape[1]
  _thumbnail_with_tissue(thumb, downsample, tiles["coords"], tiles["patch_size_level0"]).save(
      os.path.join(output_dir, "thumbnail.png"))

  element = {"features": tiles["features"], "coords": tiles["coords"],
             "patch_size_level0": tiles["patch_size_level0"],
             "text": slide_examples.SlideText(slide_id, "", (), -1), "slide_index": 0}
  example = slide_examples.build_example(element, task.example_config, task.tokenizer, None)
  keys = ("features", "patch_valid", "region_index", "region_patch_valid", "region_valid",
          "region_pos")
  batch = {k: jnp.asarray(example[k])[None] for k in keys}
  texts, owner, score = _zero_shot_prompts(task.config)
  tokens = task.tokenizer.encode_batch(texts, task.example_config.subcaption_len)
  graphdef, state = nnx.split(model)
  encoded, prompts_te, region_t = jax.device_get(_encode(graphdef, state, batch,
                                                         jnp.asarray(tokens)))
  summary: dict[str, Any] = {
      "slide_id": slide_id, "slide": storage.absolute(slide_path), "workdir": workdir,
      "align_workdir": align_dir, "instruct_workdir": instruct_dir,
      # Which checkpoint of each run made these outputs (a run trained with
      # checkpoint.use_best: W/best, the one its val evaluation chose).
      "align_checkpoint": align_checkpoint,
      "instruct_checkpoint": (checkpointing.model_checkpoint(instruct_dir)
                              if instruct_dir else None),
      "width": slide.info.width, "height": slide.info.height, "mpp": slide.info.mpp,
      "num_patches": int(len(tiles["coords"])),
      "patch_size_level0": tiles["patch_size_level0"],
      "num_regions": int(np.asarray(encoded["region_valid"]).sum()),
      "thumbnail": os.path.join(output_dir, "thumbnail.png"),
  }
  summary["zero_shot"] = zero_shot(task.class_names, np.asarray(encoded["slide"])[0],
                                   np.asarray(prompts_te), np.asarray(region_t), owner, score,
                                   float(task.config.loss.temperature))
  _log(f"zero-shot: {summary['zero_shot']['prediction']} "
       f"({summary['zero_shot']['classes'][0]['probability']:.2f})")

  queries = list(queries) or list(task.class_names)
  query_tokens = task.tokenizer.encode_batch(queries, task.example_config.subcaption_len)
  scores = heatmaps.HeatmapScorer(heatmap_method)(model, example, query_tokens)
  summary["heatmap_method"] = heatmap_method
  summary["heatmaps"] = heatmaps.write_outputs(
      os.path.join(output_dir, "heatmaps"), slide_id, queries, scores, tiles["coords"],
      tiles["patch_size_level0"], thumb, downsample)
  _log(f"{len(queries)} heatmaps -> {os.path.join(output_dir, 'heatmaps')}")

  if instruct_dir is not None:
    visual = instruct_task.slide_visual_tokens(
        np.asarray(encoded["slide"])[0], np.asarray(encoded["regions"])[0],
        np.asarray(encoded["region_valid"])[0], example["region_pos"], tiles["coords"],
        tiles["patch_size_level0"], task.example_config.region_patches,
        model.config.embed_dim)
    _log(f"loading the instruct run {instruct_dir}")
    summary.update(ask(instruct_dir, visual, questions))
    if summary.get("caption"):
      _log(f"caption: {summary['caption']}")
  summary["seconds"] = round(time.time() - t0, 1)
  summary["page"] = write_page(output_dir, summary)
  if final_dir != output_dir:
    summary = json.loads(json.dumps(summary).replace(output_dir, final_dir.rstrip("/")))
  with open(os.path.join(output_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  if final_dir != output_dir:
    storage.upload(output_dir, final_dir)
  _log(f"done in {summary['seconds']}s -> {summary['page']}")
  return summary


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="an instruct or align run (path or URL)")
  parser.add_argument("--slide", required=True,
                      help="slide file (anything large_image reads), or its URL")
  parser.add_argument("--output_dir", required=True, help="a folder, or a URL to upload it to")
  parser.add_argument("--query", action="append", default=[],
                      help="text to localise (repeat for several); default: the class names")
  parser.add_argument("--question", action="append", default=[],
                      help="a question; 'question | option | option ...' for multiple choice")
  parser.add_argument("--mpp", type=float, default=None,
                      help="µm per pixel of the slide's level 0, overriding its metadata")
  parser.add_argument("--heatmap_method", default=heatmaps.METHODS[0], choices=heatmaps.METHODS,
                      help="region scores the heatmaps read: each region's contribution to the "
                           "query's match (default), or the attention weights alone")
  parser.add_argument("--extract_config", default="",
                      help="configs/extract_features.py:... (when features.json cannot say)")
  args = parser.parse_args(argv)
  from pathflip_jax import compilation_cache  # pylint: disable=import-outside-toplevel
  compilation_cache.enable()
  try:
    summary = infer(args.workdir, args.slide, args.output_dir, args.query, args.question,
                    args.mpp, args.heatmap_method, args.extract_config)
  except InferError as e:
    raise SystemExit(f"[infer] {e}") from None
  print(json.dumps({k: summary[k] for k in ("slide_id", "zero_shot", "caption", "answers",
                                            "page") if k in summary}, indent=1))


if __name__ == "__main__":
  main()
