"""Slide ids and files: a benchmark's slide field as a slide id, its patient, where its file is
(``--slides_dir``, ``--slide_ext``, ``--id_from_file``) and the manifest row built from them."""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

from data_prep.public_benchmarks.tables import BenchmarkError, Report, _RowProblem

SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu",
                    ".svslide", ".isyntax", ".czi", ".dcm", ".jpg", ".jpeg", ".png")
FEATURE_EXTENSIONS = (".h5", ".hdf5", ".pt", ".npy", ".npz", ".csv")
# Slide formats first: when a slide and its features share a stem, the slide is the path.
KNOWN_EXTENSIONS = SLIDE_EXTENSIONS + FEATURE_EXTENSIONS

_TCGA_PATIENT = re.compile(r"^(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})", re.IGNORECASE)
_CPTAC_PATIENT = re.compile(r"^(C3[LN]-\d{5})", re.IGNORECASE)


def benchmark_slide_id(value: str) -> str:
  """A benchmark's slide field as a slide id: its file name without a known extension."""
  name = re.split(r"[\\/]", str(value).strip())[-1]
  stem, ext = os.path.splitext(name)
  return stem if stem and ext.lower() in KNOWN_EXTENSIONS else name


def patient_of(slide_id: str) -> str:
  """``TCGA-XX-XXXX`` (a TCGA id's first 12 characters) or ``C3L-nnnnn``; "" for other ids."""
  for pattern in (_TCGA_PATIENT, _CPTAC_PATIENT):
    m = pattern.match(slide_id)
    if m:
      return m.group(1).upper()
  return ""


@dataclasses.dataclass(frozen=True)
class Resolved:
  slide_id: str
  path: str
  found: bool
  benchmark_slide: str      # the benchmark's id when --id_from_file replaced it, else ""


class SlideFiles:
  """Where each slide's file is (``--slides_dir``), or is expected (no folder given)."""

  def __init__(self, root: str | None = None, ext: str | None = None,
               id_from_file: bool = False):
    if ext is not None and not ext.startswith("."):
      ext = "." + ext
    self.root, self.ext, self.id_from_file = root, ext, id_from_file
    self.by_stem: dict[str, list[str]] = {}
    if root is None:
      if id_from_file:
        raise BenchmarkError("--id_from_file needs --slides_dir (the files to take ids from)")
      return
    if not os.path.isdir(root):
      raise BenchmarkError(f"--slides_dir {root}: no such folder")
    for folder, subfolders, files in os.walk(root):
      subfolders.sort()
      for name in sorted(files):
        stem, e = os.path.splitext(name)
        if e.lower() in KNOWN_EXTENSIONS:
          self.by_stem.setdefault(stem, []).append(os.path.abspath(os.path.join(folder, name)))
    rank = {e: i for i, e in enumerate(KNOWN_EXTENSIONS)}
    for paths in self.by_stem.values():
      paths.sort(key=lambda p: rank[os.path.splitext(p)[1].lower()])

  def stems(self, slide_id: str) -> list[str]:
    """Stems of the files of a slide: ``<id>`` itself, else ``<id>.<anything>`` (a TCGA barcode
    whose files carry ``.<uuid>``)."""
    if slide_id in self.by_stem:
      return [slide_id]
    return sorted(s for s in self.by_stem if s.startswith(slide_id + "."))

  def case_stems(self, case_id: str) -> list[str]:
    """Stems of the slides of a case: ``<case>``, ``<case>-*`` or ``<case>.*``."""
    return sorted(s for s in self.by_stem
                  if s == case_id or s.startswith(case_id + "-") or s.startswith(case_id + "."))

  def resolve(self, slide_id: str, default_ext: str) -> Resolved:
    """The slide's file; raises _RowProblem(None, ...) when several files could be it."""
    ext = self.ext or default_ext
    if self.root is None:
      return Resolved(slide_id, slide_id + ext, False, "")
    stems = self.stems(slide_id)
    if len(stems) > 1:
      raise _RowProblem(None, f"slide {slide_id!r} matches several files under "
                              f"{self.root}: {stems[:4]}")
    if not stems:
      return Resolved(slide_id, os.path.abspath(os.path.join(self.root, slide_id + ext)), False,
                      "")
    stem = stems[0]
    path = self.by_stem[stem][0]
    if self.id_from_file and stem != slide_id:
      return Resolved(stem, path, True, slide_id)
    return Resolved(slide_id, path, True, "")


def _slides(slides: SlideFiles | None) -> SlideFiles:
  return slides if slides is not None else SlideFiles()


def _manifest_row(slide_id: str, where: str, slides: SlideFiles, default_ext: str,
                  report: Report, patient_id: str | None = None) -> dict[str, Any] | None:
  """slide_id, path, patient_id (+ benchmark_slide) of a manifest row, or None when skipped."""
  try:
    resolved = slides.resolve(slide_id, default_ext)
  except _RowProblem as e:
    report.skip(where, "ambiguous_file", e.message)
    return None
  if resolved.slide_id in report.seen:
    report.skip(where, "duplicate_slide", f"slide {resolved.slide_id!r} already on "
                                          f"{report.seen[resolved.slide_id]}")
    return None
  report.seen[resolved.slide_id] = where
  if slides.root is not None and not resolved.found:
    report.missing_files.append(resolved.slide_id)
  row: dict[str, Any] = {"slide_id": resolved.slide_id, "path": resolved.path}
  patient = patient_id if patient_id is not None else patient_of(resolved.slide_id)
  if patient:
    row["patient_id"] = patient
  if resolved.benchmark_slide:
    row["benchmark_slide"] = resolved.benchmark_slide
  return row
