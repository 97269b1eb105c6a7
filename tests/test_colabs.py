"""The Colab notebooks (colabs/*.ipynb) run headless on CPU, so they cannot rot.

One quickstart workdir (``Quickstart(tmp, size="test")``: a 12-slide cohort and tiny models,
about 1.5 min on 2 cores) is made once per module and every notebook gets it as ``WORKDIR``
through its ``parameters``-tagged cell, which the test replaces; each notebook then only runs its
own cells. Kernels run this interpreter (``sys.executable -m ipykernel_launcher``) in the test
process's environment (tests/conftest.py: 8 fake CPU devices, the shared compilation cache), with
a temporary directory as their working directory. Executed notebooks are written next to the
workdir (for a look after a failure), never into the repository. The committed notebooks carry
the outputs of a run at their default parameters, so opening one shows its figures
(``test_committed_notebooks``). The same workdir is the quickstart's own end-to-end
test (``test_quickstart_reports_and_resumes``), so the pipeline runs once for both.
"""

import json
import os
import pathlib
import re
import sys

import pytest

# Plain imports (requirements-test.txt): a missing package fails the suite, it does not skip.
import ipykernel
import nbclient
import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

import configs
import numpy as np
from pathflip_jax import config_args, predict, quickstart
from pathflip_jax.evaluators import localization
from pathflip_jax.tasks import align

COLABS = pathlib.Path(__file__).resolve().parent.parent / "colabs"
# notebook -> whether it promises figures (at least one image output)
NOTEBOOKS = {
    "quickstart.ipynb": True,
    "zero_shot_and_heatmaps.ipynb": True,
    "instruct.ipynb": True,
    "tpu_scaling.ipynb": False,
}
IMAGE_TYPES = ("image/png", "image/jpeg")
KERNEL_NAME = "pathflip-jax-tests"
CELL_TIMEOUT_S = 600


def _read(name: str):
  return nbformat.read(COLABS / name, as_version=4)


def _parameters_cell(nb):
  cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(cells) == 1, "a notebook needs exactly one cell tagged 'parameters'"
  return cells[0]


def test_committed_notebooks():
  """Valid nbformat v4, a title on every code cell, a parameters cell that sets SIZE and
  WORKDIR, a Colab-only setup cell; saved with the outputs of a run at the default parameters
  (the demo), without errors, showing the figures each promises in small images."""
  assert sorted(p.name for p in COLABS.glob("*.ipynb")) == sorted(NOTEBOOKS)
  for name, figures in NOTEBOOKS.items():
    nb = _read(name)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3", name
    for cell in nb.cells:
      if cell.cell_type == "code":
        assert cell.source.startswith("# @title "), (name, cell.source[:60])
    params = _parameters_cell(nb).source
    assert 'SIZE = "demo"' in params and "WORKDIR = " in params, name
    assert '"google.colab" in sys.modules' in nb.cells[1].source, f"{name}: no Colab-only setup"
    outputs = _outputs(nb)
    assert outputs, f"{name}: saved without outputs"
    assert not [o for o in outputs if o.output_type == "error"], f"{name}: saved with an error"
    images = [data for o in outputs for mime, data in o.get("data", {}).items()
              if mime in IMAGE_TYPES]
    assert bool(images) == figures, name
    # base64 of a picture scaled for display, not the full-size heatmap files.
    assert all(len(image) < 120_000 for image in images), name


@pytest.fixture(scope="module")
def quickstart_workdir(tmp_path_factory) -> pathlib.Path:
  workdir = tmp_path_factory.mktemp("colabs") / "quickstart"
  quickstart.Quickstart(str(workdir), size="test").run()
  return workdir


@pytest.fixture(scope="module")
def kernel_specs(tmp_path_factory) -> KernelSpecManager:
  """A kernelspec for this interpreter only (whatever ``python3`` means elsewhere)."""
  root = tmp_path_factory.mktemp("kernels")
  (root / KERNEL_NAME).mkdir()
  (root / KERNEL_NAME / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": f"pathflip_jax tests (ipykernel {ipykernel.__version__})",
      "language": "python"}))
  return KernelSpecManager(kernel_dirs=[str(root)])


def _outputs(nb):
  return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


def _text(output) -> str:
  if output.output_type == "stream":
    return output.text
  return "".join(output.get("data", {}).get("text/plain", ""))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(NOTEBOOKS))
def test_notebook_runs(name, quickstart_workdir, kernel_specs, tmp_path):
  nb = _read(name)
  _parameters_cell(nb).source = ("# @title Parameters (set by tests/test_colabs.py)\n"
                                 f'SIZE = "test"\nWORKDIR = {str(quickstart_workdir)!r}\n')
  km = AsyncKernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=kernel_specs)
  client = nbclient.NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S,
                                   resources={"metadata": {"path": str(tmp_path)}})
  try:
    client.execute()
  finally:
    nbformat.write(nb, str(quickstart_workdir.parent / f"executed_{name}"))

  outputs = _outputs(nb)
  errors = [o for o in outputs if o.output_type == "error"]
  assert not errors, f"{name}: {errors[0].ename}: {errors[0].evalue}"
  if NOTEBOOKS[name]:
    assert any(set(IMAGE_TYPES) & set(o.get("data", {})) for o in outputs), \
        f"{name}: no image output"
  text = "".join(_text(o) for o in outputs)
  assert "not Colab: nothing installed" in text, name  # the setup cell did nothing here
  if name == "tpu_scaling.ipynb":
    assert "'step': 2" in text, "the two sharded training steps did not finish"
    import jax  # noqa: PLC0415
    if jax.device_count() == 8:  # conftest's fake devices: every mesh axis is used
      assert "{'data': 2, 'fsdp': 2, 'model': 2}" in text
  # Nothing was written into the kernel's working directory by accident (all under WORKDIR).
  assert not os.listdir(tmp_path), os.listdir(tmp_path)


def test_localization_reference_is_the_patch_encoders_own_cosine(quickstart_workdir):
  """The localization evaluator's reference scores each patch by the cosine of the patch_clip
  run's projected feature with the query's mean prompt embedding from that run's text tower."""
  workdir = quickstart_workdir
  results = json.load(open(workdir / "align" / "results.json"))
  assert 0.0 <= results["localization/reference/mean_lesion_auroc"] <= 1.0
  spec = pathlib.Path(configs.__file__).parent / "pathflip_demo.py"
  args = quickstart.Quickstart(str(workdir), size="test").align_config_args()
  config = config_args.load_config(f"{spec}:{args}", {"input.worker_count": 0})
  assert config.evals.localization.reference == str(workdir / "patch_clip")
  task = align.AlignTask(config, str(workdir / "align"))
  evaluator = localization.Evaluator(config.evals.localization, task, None)
  slide_id, _, _, scores = next(evaluator.reference_heatmaps())
  element = task.source(evaluator.split)[0]
  assert slide_id == element["text"].slide_id
  model, tokenizer, text_len = predict.load_patch_clip(str(workdir / "patch_clip"))
  query = evaluator.queries[0]
  prompts = config.evals.localization.prompts[query]
  text = np.asarray(model.encode_texts(tokenizer.encode_batch(prompts, text_len))).mean(0)
  patches = np.asarray(model.image_proj(np.asarray(element["features"], np.float32)))
  expected = (patches @ text) / (np.linalg.norm(patches, axis=1) * np.linalg.norm(text))
  np.testing.assert_allclose(scores[0], expected, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="stage is 'align'.* must be a 'patch_clip' run"):
    predict.load_patch_clip(str(workdir / "align"))


TABLES = ("## Patch encoder", "## Zero-shot diagnosis", "## Slide - caption retrieval",
          "## Text-prompted localization", "## Biomarker", "## Captioning",
          "## Visual question answering", "### Sample captions", "## Example slides")


@pytest.mark.slow
def test_quickstart_reports_and_resumes(quickstart_workdir, capsys):
  """REPORT.md holds every table with numbers and the example heatmaps; a re-run after an
  interruption redoes only the unfinished stages. (Last in this file: it re-runs stages of the
  shared workdir, and leaves it complete again.)"""
  workdir = quickstart_workdir
  report = (workdir / "REPORT.md").read_text()
  for heading in TABLES:
    assert heading in report, heading
  # Numbers beside baselines, e.g. "| balanced accuracy (chance) | 0.250 | 0.250 |".
  interval = r"( \[[^]]*\])?"
  assert re.search(r"\| balanced accuracy \(chance\) \| [01]\.\d{3}" + interval
                   + r" \| 0\.250 \|", report)
  assert re.search(r"\| \*\*lesions \(mean\)\*\* \| [01]\.\d{3}" + interval + r" \|", report)
  assert re.search(r"\| lesions \(mean\): the patch encoder's own text alignment, trained with "
                   r"patch-level supervision \| [01]\.\d{3}" + interval + r" \|", report)
  # The VQA ceiling: model, single letter, patch probe and oracle over all multiple-choice
  # questions.
  assert re.search(r"\| all \| \d+ \| [01]\.\d{3} \| [01]\.\d{3} \| [01]\.\d{3} \| [01]\.\d{3} \|",
                   report)
  assert "| patch probe |" in report
  oracle = json.load(open(workdir / "instruct" / "eval" / "vqa_oracle_test.json"))
  assert 0.0 <= oracle["all"]["token_probe"] <= 1.0 and "| region-token probe |" in report
  examples = quickstart.Quickstart(str(workdir), size="test").example_slides()
  images = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", report)
  assert examples and len(images) == len(examples) * len(quickstart.EXAMPLE_QUERIES)
  assert all((workdir / image).exists() for image in images)
  timings = json.load(open(workdir / "timings.json"))
  assert set(timings["seconds"]) == {"cohort", "tiles", "questions", "patch_clip", "features",
                                     "align", "question_only", "instruct", "heatmaps", "report"}

  os.remove(workdir / "instruct" / "results.json")
  stamp = os.path.getmtime(workdir / "align" / "results.json")
  capsys.readouterr()
  quickstart.main(["--workdir", str(workdir), "--size", "test"])
  captured = capsys.readouterr()
  assert captured.out.strip().splitlines()[-1] == str(workdir / "REPORT.md")
  for stage in ("cohort", "tiles", "questions", "patch_clip", "features", "align",
                "question_only", "heatmaps"):
    assert re.search(rf"stage \d+/10 {stage}: already complete, skipped", captured.err), stage
  assert "stage 8/10 instruct ..." in captured.err
  assert os.path.getmtime(workdir / "align" / "results.json") == stamp
  assert (workdir / "instruct" / "results.json").exists()
