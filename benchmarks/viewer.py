"""Viewer heatmap latency: one phrase's heatmap over a 10,000-patch slide.

  python -m benchmarks.viewer --workdir runs/quickstart/align [--patches 10000] [--phrases 20]

A synthetic feature record (random features of the run's width, patches on a square grid) is
scored for each phrase, in one process and on the same compiled scorer:

* ``viewer``      - ``serve.Viewer.heatmap``: the slide's example (regions, padding) is built
                    once and kept; a phrase costs the text encoder, the text-conditioned region
                    attention and the patch scores.
* ``per request`` - the peer, a server without that cache: the example is rebuilt from the
                    feature record for every phrase (what ``infer`` does per slide), then scored.

The first phrase compiles (reported apart); the table has medians and the spread over the rest.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from pathflip_jax import serve
from pathflip_jax.data import slide_examples

PHRASES = ("invasive carcinoma", "tumour necrosis", "benign glands", "fibrous stroma",
           "lymphocytes", "adipose tissue", "sheets of tumour cells", "comedo necrosis",
           "normal ducts", "desmoplastic stroma", "lymphoid aggregate", "fat", "tumour",
           "necrotic debris", "glandular structures", "collagen", "ghost cells",
           "pleomorphic nuclei", "metastatic carcinoma", "stroma with spindle nuclei")


def synthetic_record(num_patches: int, dim: int, patch_size: float = 256.0, seed: int = 0):
  side = int(np.ceil(np.sqrt(num_patches)))
  grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)
  rng = np.random.default_rng(seed)
  return {"features": rng.standard_normal((num_patches, dim)).astype(np.float16),
          "coords": (grid[:num_patches] * patch_size).astype(np.int64),
          "patch_size_level0": patch_size}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="an align (or instruct) run")
  parser.add_argument("--patches", type=int, default=10_000)
  parser.add_argument("--phrases", type=int, default=20)
  args = parser.parse_args(argv)
  viewer = serve.Viewer(args.workdir, {"synthetic": {"path": "", "mpp": None}})
  record = synthetic_record(args.patches, int(viewer.task.shards.identity["feature_dim"]))
  phrases = [PHRASES[i % len(PHRASES)] for i in range(args.phrases + 1)]

  t0 = time.perf_counter()
  viewer._store("synthetic", **record)  # noqa: SLF001 - the cache, filled as extraction does
  viewer.heatmap("synthetic", phrases[0])
  first = time.perf_counter() - t0
  cached = []
  for phrase in phrases[1:]:
    t0 = time.perf_counter()
    viewer.heatmap("synthetic", phrase)
    cached.append(time.perf_counter() - t0)

  uncached = []
  for phrase in phrases[1:]:
    t0 = time.perf_counter()
    element = {**record, "text": slide_examples.SlideText("synthetic", "", (), -1),
               "slide_index": 0}
    example = slide_examples.build_example(element, viewer.task.example_config,
                                           viewer.task.tokenizer, None)
    viewer.scorer(viewer.model, example, viewer._tokens([phrase]))  # noqa: SLF001
    uncached.append(time.perf_counter() - t0)

  print(f"# {args.patches} patches, {len(cached)} phrases after the first "
        f"(first, with compilation: {first:.2f} s); run {viewer.workdir}")
  print("| path | median s/phrase | min | max | ratio to viewer |")
  print("|---|---|---|---|---|")
  base = statistics.median(cached)
  for name, times in (("viewer (cached example)", cached), ("per request (peer)", uncached)):
    median = statistics.median(times)
    print(f"| {name} | {median:.3f} | {min(times):.3f} | {max(times):.3f} | "
          f"{median / base:.2f} |")


if __name__ == "__main__":
  main()
