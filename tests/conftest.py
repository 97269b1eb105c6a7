"""Test setup: 8 fake CPU devices (set before JAX initialises), shared synthetic slides."""

import logging
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The lowest XLA:CPU backend optimisation level: the tests' models are tiny, so compiling them
# costs far more than running them (measured: test_pathflip + test_decoder 320 s -> 221 s).
# Numerics are unchanged; only the machine code is less optimised.
os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split()
     if not f.startswith(("--xla_force_host_platform_device_count",
                          "--xla_backend_optimization_level"))]
    + ["--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"])

# XLA:CPU needs seconds to compile a model's random initialisation; tests (and the jobs they
# start as subprocesses) build the same small models many times, so share compilations.
import tempfile  # noqa: E402

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "pathflip_jax_test_jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pathlib  # noqa: E402

import pytest  # noqa: E402

from tests import synthetic  # noqa: E402

TESTDATA = pathlib.Path(__file__).parent / "testdata"
CMU_SLIDE = TESTDATA / "cmu_small_region.svs"


@pytest.fixture(scope="session")
def cmu_slide() -> pathlib.Path:
  return CMU_SLIDE


@pytest.fixture(scope="session")
def slide_dir(tmp_path_factory) -> pathlib.Path:
  """Synthetic slides shared by the tests (written once per session)."""
  return synthetic.write_test_slides(tmp_path_factory.mktemp("slides"))


@pytest.fixture(scope="session")
def demo_cohort(tmp_path_factory) -> pathlib.Path:
  """An 8-slide demo cohort (make_demo_cohort, seed 0), generated once per session: rendering
  slides is slow, and test_demo_cohort and test_patch_clip both read it."""
  from data_prep import make_demo_cohort  # noqa: PLC0415
  out = tmp_path_factory.mktemp("cohort")
  make_demo_cohort.run(["--output_dir", str(out), "--num_slides", "8", "--seed", "0"])
  return out


@pytest.fixture(scope="session")
def demo_tiles(demo_cohort, tmp_path_factory) -> tuple[pathlib.Path, dict]:
  """tile_slides run once on ``demo_cohort``: (output directory, the job's summary)."""
  from data_prep import tile_slides  # noqa: PLC0415
  out = tmp_path_factory.mktemp("demo_tiles")
  summary = tile_slides.run(["--manifest", str(demo_cohort / "manifest.jsonl"), "--output_dir",
                             str(out), "--direct_running_mode=in_memory",
                             "--direct_num_workers=1", "--progress_interval=0"])
  return out, summary


@pytest.fixture(scope="session")
def demo_questions(demo_cohort, demo_tiles, tmp_path_factory) -> pathlib.Path:
  """data_prep.demo_questions run once on the tiled ``demo_cohort``: the questions.csv path."""
  from data_prep import demo_questions as questions_job  # noqa: PLC0415
  out = tmp_path_factory.mktemp("demo_questions") / "questions.csv"
  questions_job.run(["--cohort_dir", str(demo_cohort), "--patches", str(demo_tiles[0]),
                     "--output", str(out)])
  return out


@pytest.fixture(scope="session")
def s3_bucket() -> str:
  """An S3 bucket on moto's server on 127.0.0.1 (moto[server], a test requirement): the URL
  ``s3://pathflip-test``. The endpoint and fake credentials go into this process's environment
  (subprocesses inherit them), as a user's AWS_* settings would."""
  import socket  # noqa: PLC0415

  from moto.server import ThreadedMotoServer  # noqa: PLC0415
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  # The server logs every request (werkzeug, INFO): thousands of lines in a failing test's log.
  logging.getLogger("werkzeug").setLevel(logging.WARNING)
  server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
  server.start()
  settings = dict(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                  AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
  before = {k: os.environ.get(k) for k in settings}
  os.environ.update(settings)
  import boto3  # noqa: PLC0415
  boto3.client("s3").create_bucket(Bucket="pathflip-test")
  yield "s3://pathflip-test"
  server.stop()
  for key, value in before.items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value
