"""data_prep.public_benchmarks: benchmark files (hand-written fixtures) -> manifests and
questions."""

import csv
import json
import os
import pathlib

import pytest

from data_prep import public_benchmarks
from data_prep.public_benchmarks import tables
from pathflip_jax.data import instructions
from pathflip_jax.data import manifest

DATA = pathlib.Path(__file__).parent / "testdata" / "public_benchmarks"
CAPTIONS = DATA / "SlideBench-Caption-TCGA.csv"
CAPTIONS_PATHFLIP = DATA / "SlideBench-Caption-TCGA-pathflip.csv"
VQA = DATA / "SlideBench-VQA-TCGA.csv"
BCNB = DATA / "SlideBench-VQA-BCNB.csv"
RETRIEVAL = DATA / "retrieval_split.csv"
RETRIEVAL_PATHFLIP = DATA / "SlideBench-Caption-TCGA-plus.json"
RETRIEVAL_SLIDECHAT = DATA / "slidechat_caption.json"
PATHO_BENCH = DATA / "patho_bench" / "cptac_coad" / "KRAS_mutation" / "k=all.tsv"
CPTAC_TRAIN, CPTAC_TEST = DATA / "CPTAC_NSCLC_train.csv", DATA / "CPTAC_NSCLC_test.csv"
CLINICAL = DATA / "cptac_clinical.tsv"
VQA_HEADER = "ID,Slide,Tumor,Broad Category,Narrow Category,Question,A,B,C,D,Answer\n"


def _write(path, text):
  path.write_text(text)
  return str(path)


def _run(*args):
  return public_benchmarks.run([str(a) for a in args])


# --------------------------------------------------------------------------- ids


def test_slide_ids_and_patients():
  assert public_benchmarks.benchmark_slide_id("TCGA-XX-0001-01Z-00-DX1") == (
      "TCGA-XX-0001-01Z-00-DX1")
  # PathFLIP's copies name a feature file; the id is its stem, uuid included.
  path = "datasets/features/TCGA/LUAD/h5_files/TCGA-XX-0001-01Z-00-DX1.0000-ab.h5"
  assert public_benchmarks.benchmark_slide_id(path) == "TCGA-XX-0001-01Z-00-DX1.0000-ab"
  assert public_benchmarks.benchmark_slide_id("BRCA\\TCGA-XX-0001-01Z-00-DX1.csv") == (
      "TCGA-XX-0001-01Z-00-DX1")
  assert public_benchmarks.patient_of("TCGA-XX-0001-01Z-00-DX1.0000-ab") == "TCGA-XX-0001"
  assert public_benchmarks.patient_of("C3L-99901-21") == "C3L-99901"
  assert public_benchmarks.patient_of("synthetic-slide-14") == ""
  assert [public_benchmarks.bcnb_slide_id(v)
          for v in ("9002", "9002.0", "9002.jpg", "9002.csv")] == ["9002"] * 4


def test_answer_letter_forms():
  options = {"A": "Solid", "B": "Acinar", "C": "Lepidic", "D": "Papillary"}
  for answer in ("B", "b", "B.", "(B)", "B)", "acinar", " Acinar. ", "B. Acinar", "(B) acinar"):
    assert public_benchmarks.answer_letter(answer, options) == "B", answer
  for answer, message in (("E", "does not have"), ("Micropapillary", "not one of the options"),
                          ("C. Acinar", "not one of the options"), ("", "empty answer")):
    with pytest.raises(tables._RowProblem, match=message):
      public_benchmarks.answer_letter(answer, options)
  with pytest.raises(tables._RowProblem, match="text of options"):
    public_benchmarks.answer_letter("same", {"A": "same", "B": "Same", "C": "x", "D": "y"})


# --------------------------------------------------------------------------- captions


def test_slidebench_captions(tmp_path, capsys):
  out = tmp_path / "captions.jsonl"
  summary = _run("slidebench_captions", "--input", CAPTIONS, "--output", out)
  assert (summary["read"], summary["written"], summary["skipped"]) == (5, 3, 2)
  assert summary["skipped_by_reason"] == {"empty_caption": 1, "duplicate_slide": 1}
  # The first caption spans two lines: the rows after it are named by their real line.
  assert [s["where"] for s in summary["skips"]] == [f"{CAPTIONS}:5", f"{CAPTIONS}:6"]
  assert summary["skips"][1]["detail"].endswith(f"already on {CAPTIONS}:2")
  assert "read 5 rows, wrote 3 slides" in capsys.readouterr().out
  rows = manifest.read_manifest(str(out))
  assert [r["slide_id"] for r in rows] == ["TCGA-XX-0001-01Z-00-DX1", "TCGA-XX-0002-01Z-00-DX1",
                                           "TCGA-XY-0004-01Z-00-DX2"]
  assert rows[0]["path"] == str(tmp_path / "TCGA-XX-0001-01Z-00-DX1.svs")
  assert [r["patient_id"] for r in rows] == ["TCGA-XX-0001", "TCGA-XX-0002", "TCGA-XY-0004"]
  assert {r["split"] for r in rows} == {"test"} and rows[2]["tumor"] == "BRCA"
  assert rows[0]["caption"].endswith("acinar adenocarcinoma with lepidic spread at the edge.\n"
                                     "Margins are free of tumour; no pleural invasion is seen.")
  assert len(manifest.read_rows(str(out))) == 3


def test_slidebench_captions_pathflip_layout(tmp_path):
  report = public_benchmarks.Report()
  rows = public_benchmarks.slidebench_captions(str(CAPTIONS_PATHFLIP), split="val", report=report)
  assert report.read == 2 and not report.skipped
  uuid = "00000000-0000-4000-8000-000000000001"
  assert rows[0]["slide_id"] == f"TCGA-XX-0001-01Z-00-DX1.{uuid}"
  assert rows[0]["path"] == f"TCGA-XX-0001-01Z-00-DX1.{uuid}.svs"
  assert rows[0]["patient_id"] == "TCGA-XX-0001" and rows[0]["split"] == "val"
  out = str(tmp_path / "m.csv")
  public_benchmarks.write_manifest(rows, out)
  assert [r["slide_id"] for r in manifest.read_manifest(out)] == [r["slide_id"] for r in rows]


def test_captions_and_questions_with_slides_dir(tmp_path):
  # A gdc-client download: <file uuid>/<barcode>.<uuid>.svs. Slide 0002 has two files (ambiguous),
  # TCGA-XY-0004 none (kept, with its expected path, and counted).
  slides = tmp_path / "gdc"
  for folder, name in (("u1", "TCGA-XX-0001-01Z-00-DX1.aaaa.svs"),
                       ("u2", "TCGA-XX-0002-01Z-00-DX1.bbbb.svs"),
                       ("u3", "TCGA-XX-0002-01Z-00-DX1.cccc.svs")):
    (slides / folder).mkdir(parents=True)
    (slides / folder / name).write_bytes(b"")
  out = tmp_path / "captions.csv"
  summary = _run("slidebench_captions", "--input", CAPTIONS, "--output", out, "--slides_dir",
                 slides, "--id_from_file")
  assert summary["skipped_by_reason"] == {"empty_caption": 1, "duplicate_slide": 1,
                                          "ambiguous_file": 1}
  assert summary["missing_files"] == 1
  rows = manifest.read_manifest(str(out))
  assert rows[0]["slide_id"] == "TCGA-XX-0001-01Z-00-DX1.aaaa"
  assert rows[0]["benchmark_slide"] == "TCGA-XX-0001-01Z-00-DX1"
  assert rows[0]["path"] == str(slides / "u1" / "TCGA-XX-0001-01Z-00-DX1.aaaa.svs")
  assert rows[1]["slide_id"] == "TCGA-XY-0004-01Z-00-DX2"
  assert rows[1]["path"] == str(slides / "TCGA-XY-0004-01Z-00-DX2.svs")
  # The questions of the same benchmark get the same ids with the same options.
  questions = tmp_path / "questions.csv"
  summary = _run("slidebench_vqa", "--input", VQA, "--output", questions, "--slides_dir", slides,
                 "--id_from_file")
  assert summary["skipped_by_reason"]["ambiguous_file"] == 2
  ids = {q.slide_id for q in instructions.read_questions(str(questions))}
  assert ids == {"TCGA-XX-0001-01Z-00-DX1.aaaa", "TCGA-XY-0004-01Z-00-DX2"}
  assert ids <= {r["slide_id"] for r in rows}


def test_captions_errors(tmp_path):
  bad = _write(tmp_path / "no_caption.csv", "ID,Slide,Tumor\n1,TCGA-XX-0001-01Z-00-DX1,LUAD\n")
  with pytest.raises(public_benchmarks.BenchmarkError, match=rf"{bad}:1: missing required caption "
                                                       r"column .*'Caption'"):
    public_benchmarks.slidebench_captions(bad)
  out = tmp_path / "none.jsonl"
  empty = _write(tmp_path / "empty.csv", "ID,Slide,Caption\n1,TCGA-XX-0001-01Z-00-DX1,\n")
  with pytest.raises(public_benchmarks.BenchmarkError,
                     match="no usable rows among 1 .*empty_caption 1"):
    _run("slidebench_captions", "--input", empty, "--output", out)
  assert not out.exists()


# --------------------------------------------------------------------------- VQA


def test_slidebench_vqa(tmp_path):
  out = tmp_path / "questions.csv"
  summary = _run("slidebench_vqa", "--input", VQA, "--output", out)
  assert (summary["read"], summary["written"]) == (8, 5)
  assert summary["skipped_by_reason"] == {"not_4_options": 1, "too_few_options": 1,
                                          "empty_question": 1}
  with open(out, newline="") as f:
    assert tuple(next(csv.reader(f))) == instructions.COLUMNS
  questions = instructions.read_questions(str(out))
  assert [q.answer for q in questions] == ["C", "B", "B", "D", "B"]
  assert {q.type for q in questions} == {"multiple_choice"} and {q.split for q in questions} == {
      "test"}
  # "A. Solid" -> "Solid"; "G1: Well differentiated" keeps its G1 (not the option's letter).
  assert questions[1].options == ("Solid", "Acinar", "Lepidic", "Papillary")
  assert questions[2].options[0] == "G1: Well differentiated"
  assert questions[2].correct_text == "G2: Moderately differentiated"   # answer given as text
  assert questions[3].correct_text == "p40"                              # answer "(D)"
  assert questions[4].correct_text == "Pleomorphic nuclei"               # answer "B. text"
  assert [q.category for q in questions[:2]] == ["Disease Classification",
                                                 "Tissue Architecture and Arrangement"]
  assert questions[0].slide_id == "TCGA-XX-0001-01Z-00-DX1"
  both = public_benchmarks.slidebench_vqa(str(VQA), split="val", category="both")
  assert both[0]["category"] == "Diagnosis / Disease Classification" and both[0]["split"] == "val"


def test_slidebench_vqa_errors(tmp_path):
  row = "1,TCGA-XX-0001-01Z-00-DX1,LUAD,Diagnosis,Grading,Which grade?,G1,G2,G3,G4,"
  bad = _write(tmp_path / "bad_answer.csv", VQA_HEADER + row + "G1\n" + row + "Grade 5\n")
  with pytest.raises(public_benchmarks.BenchmarkError,
                     match=rf"{bad}:3: column 'Answer': answer 'Grade 5' is not one of the "
                           "options"):
    public_benchmarks.slidebench_vqa(bad)
  report = public_benchmarks.Report()
  rows = public_benchmarks.slidebench_vqa(bad, report=report, skip_invalid=True)
  assert len(rows) == 1 and report.reasons() == {"invalid": 1}
  assert report.skipped[0]["where"] == f"{bad}:3"
  gap = _write(tmp_path / "gap.csv",
               VQA_HEADER + "1,TCGA-XX-0001-01Z-00-DX1,LUAD,D,G,Q?,a,,c,d,A\n")
  with pytest.raises(public_benchmarks.BenchmarkError,
                     match=rf"{gap}:2: column 'C': option C is given but option B before it"):
    public_benchmarks.slidebench_vqa(gap)
  no_answer = _write(tmp_path / "no_answer.csv", "Slide,Question,A,B,C,D\nS1,Q?,a,b,c,d\n")
  with pytest.raises(public_benchmarks.BenchmarkError,
                     match=rf"{no_answer}:1: missing required answer column"):
    public_benchmarks.slidebench_vqa(no_answer)
  # PathFLIP's evaluation reads option columns up to G: five options cannot be four.
  five = _write(tmp_path / "five.csv", "Slide,Question,A,B,C,D,E,Answer\n"
                "S1,Q?,a,b,c,d,e,A\nS1,Q2?,a,b,c,d,,B\n")
  report = public_benchmarks.Report()
  rows = public_benchmarks.slidebench_vqa(five, report=report)
  assert [r["question"] for r in rows] == ["Q2?"] and report.reasons() == {"too_many_options": 1}


def test_bcnb_vqa(tmp_path):
  out = tmp_path / "bcnb.csv"
  summary = _run("bcnb_vqa", "--input", BCNB, "--output", out, "--split", "val")
  assert (summary["read"], summary["written"]) == (5, 2)
  # ER / HER2 have two classes and grading three: the project's format needs four options.
  assert summary["skipped_by_reason"] == {"not_4_options": 3}
  questions = instructions.read_questions(str(out))
  assert [(q.slide_id, q.answer, q.category, q.split) for q in questions] == [
      ("9001", "B", "Molecular subtype", "val"), ("9003", "D", "Molecular subtype", "val")]
  no_slide = _write(tmp_path / "no_slide.csv",
                    "ID,Task,Question,A,B,C,D,Answer\n1,ER,Q?,a,b,c,d,A\n")
  with pytest.raises(public_benchmarks.BenchmarkError,
                     match=rf"{no_slide}:1: missing required slide"):
    public_benchmarks.bcnb_vqa(no_slide)
  with pytest.raises(public_benchmarks.BenchmarkError,
                     match=r"bcnb\.tsv: a questions file is a \.csv"):
    _run("bcnb_vqa", "--input", BCNB, "--output", tmp_path / "bcnb.tsv")


# --------------------------------------------------------------------------- retrieval


def test_retrieval_split(tmp_path):
  out = tmp_path / "retrieval.jsonl"
  summary = _run("retrieval_split", "--input", RETRIEVAL, RETRIEVAL_PATHFLIP,
                 RETRIEVAL_SLIDECHAT, "--output", out)
  assert (summary["read"], summary["written"]) == (10, 8)
  assert summary["skipped_by_reason"] == {"empty_caption": 1, "duplicate_slide": 1}
  assert summary["splits"] == {"train": 1, "val": 1, "test": 6}
  rows = {r["slide_id"]: r for r in manifest.read_manifest(str(out))}
  assert rows["TCGA-XX-0012-01Z-00-DX1"]["split"] == "val"          # "validation"
  assert rows["synthetic-slide-14"]["split"] == "test"              # "Test"
  assert "patient_id" not in rows["synthetic-slide-14"]
  pathflip = rows["TCGA-XX-0021-01Z-00-DX1.00000000-0000-4000-8000-000000000021"]
  assert pathflip["caption"].startswith("Invented fixture caption: a moderately")
  assert "fine_grained_concepts" not in pathflip                    # lists do not pass through
  slidechat = rows["TCGA-XX-0031-01Z-00-DX1"]
  assert slidechat["caption"].endswith("palisading necrosis.") and slidechat["id"] == "train::0"
  # --split per input overrides the file's own.
  summary = _run("retrieval_split", "--input", RETRIEVAL, RETRIEVAL_SLIDECHAT, "--output",
                 tmp_path / "r.csv", "--split", "train", "val")
  assert summary["splits"] == {"train": 4, "val": 2}


def test_retrieval_split_errors(tmp_path):
  bad = _write(tmp_path / "bad_split.csv", "slide_id,caption,split\nS1,a caption,train\n"
               "S2,a caption,holdout2\n")
  with pytest.raises(public_benchmarks.BenchmarkError,
                     match=rf"{bad}:3: column 'split': split 'holdout2' is not one of"):
    public_benchmarks.retrieval_split(bad)
  two = tmp_path / "two.json"
  two.write_text(json.dumps([{"image": ["a.csv", "b.csv"], "caption": "x"}]))
  with pytest.raises(public_benchmarks.BenchmarkError,
                     match=rf"{two}: item 0: column 'image': 2 images"):
    public_benchmarks.retrieval_split(str(two))
  no_caption = _write(tmp_path / "nc.csv", "slide_id,split\nS1,train\n")
  with pytest.raises(public_benchmarks.BenchmarkError,
                     match=rf"{no_caption}:1: missing required caption"):
    public_benchmarks.retrieval_split(no_caption)


# --------------------------------------------------------------------------- CPTAC labels


def test_cptac_labels_patho_bench(tmp_path):
  out = tmp_path / "kras.jsonl"
  summary = _run("cptac_labels", "--input", PATHO_BENCH, "--output", out)   # split from fold_0
  assert (summary["read"], summary["written"]) == (6, 4)
  assert summary["skipped_by_reason"] == {"no_label": 1, "not_in_fold": 1}
  rows = manifest.read_manifest(str(out))
  assert [(r["slide_id"], r["patient_id"], r["split"], r["KRAS_mutation"]) for r in rows] == [
      ("C3L-99901-21", "C3L-99901", "train", "1"), ("C3L-99901-22", "C3L-99901", "train", "1"),
      ("C3N-99902-21", "C3N-99902", "test", "0"), ("C3L-99905-26", "C3L-99905", "val", "1")]
  assert not any(k.startswith("fold_") or k == "case_id" for r in rows for k in r)
  rows = public_benchmarks.cptac_labels(str(PATHO_BENCH), fold=1, labels=["KRAS_mutation=kras"])
  assert [(r["split"], r["kras"]) for r in rows] == [("test", "1"), ("test", "1"), ("train", "0"),
                                                     ("train", "0"), ("train", "1")]


def test_cptac_labels_pathflip_tables(tmp_path):
  out = tmp_path / "nsclc.csv"
  summary = _run("cptac_labels", "--input", CPTAC_TRAIN, CPTAC_TEST, "--split", "train", "test",
                 "--output", out)
  assert summary["splits"] == {"train": 2, "test": 2} and summary["skipped"] == 0
  rows = manifest.read_manifest(str(out))
  assert [(r["slide_id"], r["split"], r["label"]) for r in rows][::3] == [
      ("C3N-99911-21", "train", "CPTAC-LUAD"), ("C3L-99914-21", "test", "CPTAC-LSCC")]
  assert "conch_feature" not in rows[0] and rows[0]["patient_id"] == "C3N-99911"
  # The same table twice: its slides are already there.
  summary = _run("cptac_labels", "--input", CPTAC_TRAIN, CPTAC_TRAIN, "--output", out)
  assert summary["skipped_by_reason"] == {"duplicate_slide": 2}


def test_cptac_labels_case_table(tmp_path):
  slides = tmp_path / "slides"
  slides.mkdir()
  for name in ("C3L-99921-21.svs", "C3L-99921-22.svs", "C3N-99922-21.svs", "C3L-999210-21.svs"):
    (slides / name).write_bytes(b"")
  out = tmp_path / "grade.jsonl"
  summary = _run("cptac_labels", "--input", CLINICAL, "--output", out, "--slides_dir", slides,
                 "--label", "tumor_grade=grade")
  assert summary["skipped_by_reason"] == {"no_slide_for_case": 1, "no_label": 1}
  rows = manifest.read_manifest(str(out))
  # case_submitter_id (not GDC's UUID case_id) is the case; C3L-999210 is another case.
  assert [(r["slide_id"], r["patient_id"], r["grade"]) for r in rows] == [
      ("C3L-99921-21", "C3L-99921", "G2"), ("C3L-99921-22", "C3L-99921", "G2"),
      ("C3N-99922-21", "C3N-99922", "G3")]
  assert rows[0]["path"] == str(slides / "C3L-99921-21.svs")
  # Default labels: every column that is not an id ("'--" is missing).
  rows = public_benchmarks.cptac_labels(str(CLINICAL),
                                        slides=public_benchmarks.SlideFiles(str(slides)))
  assert set(rows[0]) == {"slide_id", "path", "patient_id", "split", "project_id", "tumor_grade"}
  with pytest.raises(public_benchmarks.BenchmarkError,
                     match="names cases only .*give --slides_dir"):
    public_benchmarks.cptac_labels(str(CLINICAL))


def test_cptac_labels_errors(tmp_path):
  with pytest.raises(public_benchmarks.BenchmarkError,
                     match=rf"{PATHO_BENCH}:1: missing required label 'MSI' column"):
    public_benchmarks.cptac_labels(str(PATHO_BENCH), labels=["MSI"])
  with pytest.raises(public_benchmarks.BenchmarkError, match="would be written as 'split'"):
    public_benchmarks.cptac_labels(str(PATHO_BENCH), labels=["KRAS_mutation=split"])
  with pytest.raises(public_benchmarks.BenchmarkError, match=r"missing required fold_7 column"):
    public_benchmarks.cptac_labels(str(PATHO_BENCH), fold=7)
  bad = _write(tmp_path / "k=all.tsv", "case_id\tslide_id\tlabel\tfold_0\nC1\tC1-1\t1\ttarin\n")
  with pytest.raises(public_benchmarks.BenchmarkError,
                     match=rf"{bad}:2: column 'fold_0': split 'tarin' is not one of"):
    public_benchmarks.cptac_labels(bad)


# --------------------------------------------------------------------------- command line


def test_main_exit_status(tmp_path, capsys):
  out = tmp_path / "q.csv"
  with pytest.raises(SystemExit) as e:
    public_benchmarks.main(["slidebench_vqa", "--input", str(tmp_path / "absent.csv"),
                            "--output", str(out)])
  assert e.value.code == 2 and "absent.csv: input file not found" in capsys.readouterr().err
  public_benchmarks.main(["bcnb_vqa", "--input", str(BCNB), "--output", str(out)])
  assert "bcnb_vqa: read 5 rows, wrote 2 questions" in capsys.readouterr().out
  assert os.path.exists(out)
  with pytest.raises(SystemExit):   # argparse: one --split or one per input
    public_benchmarks.main(["bcnb_vqa", "--input", str(BCNB), "--output", str(out), "--split",
                            "train", "test"])


def test_manifest_with_byte_order_mark(tmp_path):
  """Spreadsheet tools save a byte-order mark: the first column must still be 'slide_id'."""
  jsonl = tmp_path / "m.jsonl"
  jsonl.write_text('\ufeff{"slide_id": "A", "path": "a.svs"}\n\n{"slide_id": "B", '
                   '"path": "b.svs"}\n', encoding="utf-8")
  assert [r["slide_id"] for r in manifest.read_manifest(str(jsonl))] == ["A", "B"]
  table = tmp_path / "m.csv"
  table.write_text("\ufeffslide_id,path\nA,a.svs\n", encoding="utf-8")
  assert manifest.read_manifest(str(table))[0]["slide_id"] == "A"
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"slide_id": "A", "path": "a.svs"}\n[1, 2]\n')
  with pytest.raises(manifest.ManifestError, match=rf"{bad}:2: expected a JSON object"):
    manifest.read_rows(str(bad))
