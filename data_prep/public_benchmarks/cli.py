"""The command line: ``python -m data_prep.public_benchmarks ADAPTER --input FILE ... --output OUT``
(the package docstring describes the adapters and flags)."""

from __future__ import annotations

import argparse
import os
from typing import Any, Sequence

# The package's docstring is the command's documentation (docs/generate.py shows it).
from data_prep import public_benchmarks
from data_prep.public_benchmarks.bcnb import bcnb_vqa
from data_prep.public_benchmarks.cptac import cptac_labels
from data_prep.public_benchmarks.retrieval import retrieval_split
from data_prep.public_benchmarks.slide_files import SlideFiles
from data_prep.public_benchmarks.slidebench import (CATEGORY_MODES, slidebench_captions,
                                                    slidebench_vqa)
from data_prep.public_benchmarks.tables import (DEFAULT_SPLIT, SPLITS, BenchmarkError, Report,
                                                _log, write_manifest, write_questions)
from pathflip_jax.data import manifest as manifest_lib

ADAPTERS = ("slidebench_captions", "slidebench_vqa", "bcnb_vqa", "retrieval_split",
            "cptac_labels")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--input", nargs="+", required=True,
                      help="the benchmark's file(s), read in turn into one output")
  common.add_argument("--output", required=True,
                      help="manifest .jsonl/.csv/.tsv, or questions .csv for the VQA adapters")
  common.add_argument("--split", nargs="+", choices=SPLITS,
                      help="split of every row: one for all inputs or one per input (default: "
                           "the file's own, else test)")
  common.add_argument("--slides_dir",
                      help="folder of the slide (or feature) files, searched recursively")
  common.add_argument("--slide_ext",
                      help="extension of an expected slide file (default .svs; .jpg for BCNB)")
  common.add_argument("--id_from_file", action="store_true",
                      help="slide_id = stem of the file found under --slides_dir (the benchmark's "
                           "id kept as benchmark_slide)")
  common.add_argument("--skip_invalid", action="store_true",
                      help="skip rows with errors (answer not an option, bad split...) instead "
                           "of stopping")
  parser = argparse.ArgumentParser(
      prog="python -m data_prep.public_benchmarks",
      description=public_benchmarks.__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="adapter", required=True, metavar="ADAPTER")
  sub.add_parser("slidebench_captions", parents=[common],
                 help="SlideBench-Caption (TCGA) CSV -> manifest")
  vqa = sub.add_parser("slidebench_vqa", parents=[common],
                       help="SlideBench-VQA (TCGA) CSV -> questions CSV")
  vqa.add_argument("--category", choices=CATEGORY_MODES, default="narrow",
                   help="category column: Narrow Category, Broad Category or 'Broad / Narrow'")
  sub.add_parser("bcnb_vqa", parents=[common], help="SlideBench-VQA (BCNB) CSV -> questions CSV")
  sub.add_parser("retrieval_split", parents=[common],
                 help="slide/caption/split table or caption JSON -> manifest")
  cptac = sub.add_parser("cptac_labels", parents=[common],
                         help="CPTAC label table (Patho-Bench k=all.tsv, ...) -> manifest")
  cptac.add_argument("--fold", type=int, help="split from column fold_N (Patho-Bench)")
  cptac.add_argument("--label", nargs="+", metavar="COL[=NAME]",
                     help="label columns to keep, optionally renamed (default: all others)")
  args = parser.parse_args(argv)
  if args.split and len(args.split) not in (1, len(args.input)):
    parser.error(f"--split: give one split or one per --input ({len(args.input)}), got "
                 f"{len(args.split)}")
  if args.id_from_file and not args.slides_dir:
    parser.error("--id_from_file needs --slides_dir")
  if getattr(args, "fold", None) is not None and args.fold < 0:
    parser.error("--fold must be >= 0")
  return args


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Converts the inputs, writes the output, returns the summary (BenchmarkError on bad input)."""
  args = _parse_args(argv)
  slides = SlideFiles(args.slides_dir, args.slide_ext, args.id_from_file)
  report = Report()
  questions = args.adapter in ("slidebench_vqa", "bcnb_vqa")
  rows: list[dict[str, Any]] = []
  for i, path in enumerate(args.input):
    split = (args.split[i] if len(args.split) > 1 else args.split[0]) if args.split else None
    kw = {"slides": slides, "report": report, "skip_invalid": args.skip_invalid}
    if args.adapter == "slidebench_captions":
      rows += slidebench_captions(path, split or DEFAULT_SPLIT, **kw)
    elif args.adapter == "slidebench_vqa":
      rows += slidebench_vqa(path, split or DEFAULT_SPLIT, args.category, **kw)
    elif args.adapter == "bcnb_vqa":
      rows += bcnb_vqa(path, split or DEFAULT_SPLIT, **kw)
    elif args.adapter == "retrieval_split":
      rows += retrieval_split(path, split, **kw)
    else:
      rows += cptac_labels(path, split, args.fold, args.label, **kw)
  for s in report.skipped:
    _log(f"{s['where']}: skipped ({s['reason']}): {s['detail']}")
  reasons = report.reasons()
  skipped = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()))
  if not rows:
    raise BenchmarkError(f"{', '.join(args.input)}: no usable rows among {report.read} "
                         f"(skipped: {skipped or 'none'}); nothing written")
  if questions:
    write_questions(rows, args.output)
  else:
    write_manifest(rows, args.output)
  splits: dict[str, int] = {}
  for row in rows:
    splits[row["split"]] = splits.get(row["split"], 0) + 1
  summary = {
      "adapter": args.adapter, "inputs": [os.path.abspath(p) for p in args.input],
      "output": os.path.abspath(args.output), "read": report.read, "written": len(rows),
      "skipped": len(report.skipped), "skipped_by_reason": reasons, "splits": splits,
      "missing_files": len(report.missing_files), "skips": report.skipped,
  }
  kind = "questions" if questions else "slides"
  line = (f"{args.adapter}: read {report.read} rows, wrote {len(rows)} {kind} to {args.output}, "
          f"skipped {len(report.skipped)}" + (f" ({skipped})" if skipped else ""))
  if args.slides_dir and not questions:
    line += f"; {len(report.missing_files)} slides without a file under {args.slides_dir}"
  print(line, flush=True)
  return summary


def main(argv: Sequence[str] | None = None) -> None:
  """Runs the job; exit status 2 for unusable input."""
  try:
    run(argv)
  except (BenchmarkError, manifest_lib.ManifestError) as e:
    _log(str(e))
    raise SystemExit(2) from None
