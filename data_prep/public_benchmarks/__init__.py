r"""Reads the released files of the public benchmarks PathFLIP reports on into this project's
inputs.

  python -m data_prep.public_benchmarks ADAPTER --input FILE [FILE ...] --output OUT \
      [--split train|val|test [...]] [--slides_dir DIR] [--slide_ext .svs] [--id_from_file] \
      [--skip_invalid] [--category narrow|broad|both] [--fold N] [--label COL[=NAME] ...]

ADAPTER               reads                                              writes
slidebench_captions   SlideBench-Caption (TCGA) CSV                      manifest
slidebench_vqa        SlideBench-VQA (TCGA) CSV                          questions CSV
bcnb_vqa              SlideBench-VQA (BCNB) CSV                          questions CSV
retrieval_split       slide / caption / split table, or PathFLIP's or    manifest
                      SlideChat's caption JSON
cptac_labels          CPTAC label table (Patho-Bench ``k=all.tsv``,      manifest (label columns for
                      PathFLIP's CPTAC CSV, a GDC/PDC clinical table)    the slide_linear_probe)

A manifest (``.jsonl``, ``.csv`` or ``.tsv``; ``pathflip_jax/data/manifest.py``) gets ``slide_id``,
``path``, ``patient_id`` (when known), ``split`` and the benchmark's columns; a questions CSV
(``.csv``) gets exactly ``instructions.COLUMNS``, every row ``multiple_choice``. Several ``--input``
files are read in turn into one output; ``--split`` gives one split for all of them or one each.
The benchmarks are test sets, so the split is "test" unless the file or ``--split`` says otherwise;
a questions CSV must name the same split as the manifest of its slides (stage instruct refuses a
question whose split differs from its slide's).

Layouts assumed (column names are matched ignoring case, spaces, "_" and "-")
--------------------------------------------------------------------------------
slidebench_captions  ``ID,Slide,Tumor,Question,Caption`` (``SlideBench-Caption-TCGA.csv`` of the
    SlideChat release, huggingface General-Medical-AI/SlideChat; the columns as in the copy PathFLIP
    ships, github cyclexfy/PathFLIP2 ``datasets/SlideBench-Caption-TCGA.csv``). Used: ``Slide``
    (required), ``Caption`` (required), ``Tumor`` (optional, the TCGA project without "TCGA-",
    kept as ``tumor``). ``Question`` (the report prompt) and ``ID`` are not used.
slidebench_vqa  ``ID,Slide,Tumor,Broad Category,Narrow Category,Question,A,B,C,D,Answer``: the
    columns SlideChat's ``xtuner/tools/test.py`` reads from ``--test_slide_csv
    SlideBench-VQA(TCGA).csv`` (SlideChat README; the tool as in forks such as github
    binhnam2907/SlideChatImprovement ``xtuner/tools/test.py``, which skips empty options), and the
    copy in cyclexfy/PathFLIP2 ``datasets/SlideBench-VQA-TCGA.csv``: ``Answer`` is the letter,
    Broad Category is Microscopy/Diagnosis/Clinical, Narrow Category one of the 13 reported
    categories. Required: ``Slide``, ``Question``, ``A``, ``B``, ``Answer``; further single-letter
    columns (``C``..``G``: PathFLIP's ``src/eval/eval_vlm.py`` reads up to G) are options too.
    ``category`` is the Narrow Category (``--category broad|both`` for Broad or "Broad / Narrow").
bcnb_vqa  ``ID,Slide,Task,Question,A,B,C,D,Answer``: the dataset card of General-Medical-AI/
    SlideChat ("SlideBench-VQA (BCNB).csv ... Slide(patient_id), Task, Question, Answer options (A,
    B, C, D), and the correct answer"; features "named by patient ID; for example, 1.csv"), column
    list as read by github OzzyChen97/TC-SSA ``vqa/tools/test_benchmark_bcnb.py`` (C and D empty
    for tasks with two classes; ``Answer`` compared with a letter). ``Slide`` is the BCNB patient
    id, one WSI per patient, released as ``<id>.jpg`` (github bupt-ai-cz/BALNMP README), so
    ``--slide_ext`` defaults to ``.jpg`` here. ``category`` is ``Task``.
retrieval_split  (a) any table (CSV/TSV/JSONL) with a slide column (``slide_id``, ``Slide``,
    ``image``, ``file_name``), a caption column (``caption``, ``report``, ``text``) and optionally a
    split column (``split``, ``set``, ``subset``, ``partition``); (b) the JSON list PathFLIP's
    ``src/eval/eval_retrieval.py`` reads (cyclexfy/PathFLIP2, default
    ``datasets/SlideBench-Caption-TCGA-plus.json`` through ``src/dataset/dataset_pathflip.py``):
    objects with ``image`` (a feature file path) and ``caption`` (and ``fine_grained_concepts``,
    dropped: lists do not pass through); (c) SlideChat's caption JSON (github winglet0996/SlideChat
    ``dataset/train_data_example.json``): ``id``, ``image`` (a one-element list) and
    ``conversations``, the caption being the first "gpt" turn. Split values train/training,
    val/valid/validation/dev, test/testing; other scalar columns pass through.
cptac_labels  (a) Patho-Bench task splits (huggingface MahmoodLab/Patho-Bench,
    ``<dataset>/<task>/k=all.tsv`` beside ``config.yaml``; read by github mahmoodlab/Patho-Bench
    ``patho_bench/SplitFactory.py`` and ``DataSplit``): tab-separated ``case_id``, ``slide_id``,
    the task's label column (config ``task_col``, integer codes of ``label_dict``) and
    ``fold_0``..``fold_K`` holding train/val/test; (b) PathFLIP's CPTAC tables
    (cyclexfy/PathFLIP2 ``datasets/CPTAC_NSCLC_{train,test}.csv``): ``slide_id,conch_feature,label``
    with label CPTAC-LUAD / CPTAC-LSCC, one file per split; (c) a clinical table keyed by case only
    (GDC/PDC ``case_submitter_id``, ``case_id``, ``patient_id``; "'--" for missing), whose cases
    are expanded to the slides under ``--slides_dir`` named ``<case>-*`` / ``<case>.*`` (TCGA
    ``TCGA-XX-XXXX-01Z-...``, CPTAC ``C3L-00001-21``). Label columns: ``--label COL[=NAME]``, by
    default every column that is not an id, ``fold_*``, ``split`` or a feature path
    (``conch_feature``, ``features_path``, ``feature_path``, ``h5_path``, ``path``). The split is
    ``--fold N`` (``fold_N``), else ``--split``, else the table's ``split`` column, else ``fold_0``,
    else "test". Empty label cells and nan/NA/N/A/None/null/--/'-- are missing ("" in the output);
    integer-valued floats ("1.0") become integers ("1").

Slide ids and paths
-------------------
The benchmark's slide field is kept as ``slide_id``, reduced to its file name without a known
slide or feature extension (``.svs``, ``.tif``, ``.ndpi``, ``.jpg``, ``.h5``, ``.pt``, ``.csv``,
...):
SlideChat's ``TCGA-05-0000-01Z-00-DX1`` stays as it is, PathFLIP's
``datasets/features/TCGA/LUAD/.../TCGA-05-0000-01Z-00-DX1.<uuid>.h5`` becomes
``TCGA-05-0000-01Z-00-DX1.<uuid>`` (the stem TRIDENT/CLAM features of that slide carry), BCNB's
``1`` (or ``1.0``) stays ``1``. ``patient_id`` is the first 12 characters of a TCGA id
(``TCGA-XX-XXXX``), the ``C3L-/C3N-nnnnn`` case of a CPTAC id, the case column of a label table,
or BCNB's patient id.

``path`` is where the slide file is expected. Without ``--slides_dir`` it is ``<slide_id><ext>``
(``--slide_ext``, default ``.svs``; ``.jpg`` for BCNB), relative, so it resolves next to the
manifest, and the file need not exist: features imported with ``data_prep/import_features.py``
from TRIDENT/CLAM are joined to a manifest given as ``config.manifest`` (stage align) by
``slide_id`` alone. With ``--slides_dir`` (searched recursively, e.g. a gdc-client download of
``<uuid>/<name>.svs`` folders) ``path`` is the absolute path of the file named ``<slide_id>.<ext>``
or, for a SlideChat barcode, ``<slide_id>.<anything>.<ext>`` (``TCGA-...-DX1.<uuid>.svs``); a slide
with several such files is skipped (ambiguous), one with none keeps the expected path and is
counted as missing. ``--id_from_file`` makes ``slide_id`` the stem of the file found (so that it
equals the slide id TRIDENT/CLAM features of that file get), keeping the benchmark's id in
``benchmark_slide``; give the same ``--slides_dir``/``--id_from_file`` to the VQA adapters so that
the questions name the same ids.

Multiple-choice questions
-------------------------
Options are the non-empty letter columns; an "A. text" / "A) text" / "(A) text" / "A: text" prefix
with the option's own letter is removed. ``Answer`` may be the letter (also "C.", "(C)"), the
option's text (case and spacing ignored) or "C. text". The project's multiple-choice format has
exactly four options: a row with more than 4, fewer than 2, or 2-3 options is skipped (reasons
too_many_options / too_few_options / not_4_options), options are never invented.

Errors and skipped rows
-----------------------
Input that cannot be read the documented way raises BenchmarkError naming the file, the line (the
item of a JSON list) and the column: a missing required column, an answer that is not one of the
row's options, an option after an empty one, an unknown split value. ``--skip_invalid`` skips such
rows instead (reason invalid). Rows that are unusable by nature are skipped with a reason and
counted: empty_slide, empty_caption, empty_question, duplicate_slide (a manifest holds a slide
once; the first row wins), too_many_options, too_few_options, not_4_options, ambiguous_file,
no_label, not_in_fold, no_slide_for_case. ``run`` prints a one-line summary, logs each skipped row
(file:line: reason) to stderr and returns the summary; an input that leaves no row is an error and
nothing is written. Outputs are written whole (a temporary file renamed into place).

Code: one module per benchmark (``slidebench``, ``bcnb``, ``retrieval``, ``cptac``); ``tables``
(reading and writing tables, Report, errors, splits), ``slide_files`` (slide ids, patients, files)
and ``multiple_choice`` (both VQA files) hold what they share; ``cli`` is the command line.
"""

from data_prep.public_benchmarks.bcnb import bcnb_slide_id, bcnb_vqa
from data_prep.public_benchmarks.cli import ADAPTERS, main, run
from data_prep.public_benchmarks.cptac import cptac_labels
from data_prep.public_benchmarks.multiple_choice import answer_letter
from data_prep.public_benchmarks.retrieval import retrieval_split
from data_prep.public_benchmarks.slide_files import (KNOWN_EXTENSIONS, Resolved, SlideFiles,
                                                     benchmark_slide_id, patient_of)
from data_prep.public_benchmarks.slidebench import (CATEGORY_MODES, slidebench_captions,
                                                    slidebench_vqa)
from data_prep.public_benchmarks.tables import (DEFAULT_SPLIT, SPLITS, BenchmarkError, Report,
                                                read_table, write_manifest, write_questions)

__all__ = [
    "ADAPTERS", "CATEGORY_MODES", "DEFAULT_SPLIT", "KNOWN_EXTENSIONS", "SPLITS", "BenchmarkError",
    "Report", "Resolved", "SlideFiles", "answer_letter", "bcnb_slide_id", "bcnb_vqa",
    "benchmark_slide_id", "cptac_labels", "main", "patient_of", "read_table", "retrieval_split",
    "run", "slidebench_captions", "slidebench_vqa", "write_manifest", "write_questions",
]
