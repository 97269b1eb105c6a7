"""python -m pathflip_jax.serve: the slide viewer's API on a real server (uvicorn on a free
port) and its page driven in headless Chromium. The runs are untrained: what is checked is
that the viewer shows what the model computes, not the model's quality."""

import concurrent.futures
import io
import json
import os
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from pathflip_jax import heatmaps, serve
from tests import runs as runs_lib


def _port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(demo_cohort, demo_tiles, demo_questions, cmu_slide, tmp_path_factory):
  """The viewer over the demo slides (features in the run's records) and the CMU slide (none:
  extracted on first open), serving an untrained instruct run."""
  import uvicorn  # noqa: PLC0415
  root = tmp_path_factory.mktemp("serve")
  runs_lib.untrained_demo_runs(root, demo_tiles[0], demo_questions)
  rows = [json.loads(line) for line in open(demo_cohort / "manifest.jsonl")]
  rows = [{"slide_id": r["slide_id"], "path": str(demo_cohort / r["path"])} for r in rows]
  rows.append({"slide_id": "cmu", "path": str(cmu_slide)})
  manifest = root / "slides.jsonl"
  manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
  viewer = serve.Viewer(str(root / "instruct"), str(manifest))
  port = _port()
  instance = uvicorn.Server(uvicorn.Config(serve.create_app(viewer), host="127.0.0.1",
                                           port=port, log_level="warning"))
  thread = threading.Thread(target=instance.run, daemon=True)
  thread.start()
  deadline = time.time() + 30
  while not instance.started:
    assert time.time() < deadline and thread.is_alive(), "the server did not start"
    time.sleep(0.05)
  yield f"http://127.0.0.1:{port}", viewer, rows
  instance.should_exit = True
  thread.join(10)


def _get(url: str, data: bytes | None = None):
  """(status, headers, body) of a request; errors are answers too."""
  request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
  try:
    with urllib.request.urlopen(request, timeout=120) as response:
      return response.status, response.headers, response.read()
  except urllib.error.HTTPError as e:
    return e.code, e.headers, e.read()


def test_only_configured_slides_are_served(server):
  base, _, rows = server
  status, _, body = _get(f"{base}/api/slides")
  assert status == 200
  listed = json.loads(body)["slides"]
  assert [s["id"] for s in listed] == [r["slide_id"] for r in rows]
  assert {s["id"]: s["features"] for s in listed}["cmu"] == "none"
  slide = rows[0]["slide_id"]
  for path in ("/api/slides/..%2F..%2F..%2Fetc%2Fpasswd/thumbnail.jpg",
               "/api/slides/%2Fetc%2Fpasswd/slide.dzi", "/api/slides/../../etc/passwd",
               f"/api/slides/{slide}/..%2F..%2Fserve.py", "/static/..%2F..%2Fserve.py",
               "/static/../../pathflip_jax/serve.py", "/api/slides/no-such-slide/slide.dzi",
               f"/api/slides/{slide}/slide_files/99/0_0.jpeg"):
    status, headers, body = _get(base + path)
    assert status == 404, (path, status)
    assert headers["content-type"] == "application/json" and "error" in json.loads(body), path
  status, _, body = _get(f"{base}/api/slides/{slide}/heatmap.png?q={'x' * 201}")
  assert status == 413 and "at most 200" in json.loads(body)["error"]
  status, _, body = _get(f"{base}/api/slides/{slide}/question", b"x" * 5000)
  assert status == 413
  status, _, body = _get(f"{base}/api/slides/{slide}/question", b"not json")
  assert status == 400 and b"Traceback" not in body


def test_tiles_follow_the_deepzoom_pyramid(server):
  base, viewer, rows = server
  slide = rows[0]["slide_id"]
  info = viewer.describe(slide)
  status, _, body = _get(f"{base}/api/slides/{slide}/slide.dzi")
  assert status == 200 and f'Width="{info["width"]}"' in body.decode()
  top = int(np.ceil(np.log2(max(info["width"], info["height"]))))
  status, _, body = _get(f"{base}/api/slides/{slide}/slide_files/{top}/0_0.jpeg")
  assert status == 200 and Image.open(io.BytesIO(body)).size == (serve.TILE_SIZE,) * 2
  status, _, body = _get(f"{base}/api/slides/{slide}/slide_files/0/0_0.jpeg")
  assert status == 200 and Image.open(io.BytesIO(body)).size == (1, 1)


def test_heatmap_image_puts_each_patch_score_in_its_cell(server):
  base, viewer, rows = server
  slide = rows[0]["slide_id"]
  status, headers, body = _get(f"{base}/api/slides/{slide}/heatmap.png?q=invasive%20carcinoma")
  assert status == 200
  meta = json.loads(headers["x-heatmap"])
  rgba = np.asarray(Image.open(io.BytesIO(body)))
  assert rgba.shape == (meta["rows"], meta["columns"], 4)
  result = viewer.heatmap(slide, "invasive carcinoma")
  cells = (result["coords"] // meta["cell"]).astype(int)
  expected = heatmaps.colormap(result["normalised"])
  np.testing.assert_array_equal(rgba[cells[:, 1], cells[:, 0], :3], expected)
  assert (rgba[..., 3] > 0).sum() == len(result["coords"]) == meta["patches"]
  peak_x, peak_y = np.floor(np.asarray(meta["peak"]) / meta["cell"]).astype(int)
  assert rgba[peak_y, peak_x, :3].tolist() == heatmaps.colormap(np.array([1.0]))[0].tolist()
  status, _, body = _get(f"{base}/api/slides/{slide}/heatmap.geojson?q=invasive%20carcinoma")
  assert status == 200 and len(json.loads(body)["features"]) == meta["patches"]


def test_twenty_concurrent_heatmap_requests_all_succeed(server):
  base, _, rows = server
  slides = [r["slide_id"] for r in rows[:4]]
  phrases = ["tumour", "fibrous stroma", "necrosis", "fat", "lymphocytes"]
  urls = [f"{base}/api/slides/{slides[i % 4]}/heatmap.png?q={phrases[i % 5].replace(' ', '%20')}"
          for i in range(20)]
  with concurrent.futures.ThreadPoolExecutor(20) as pool:
    answers = list(pool.map(_get, urls))
  assert [a[0] for a in answers] == [200] * 20
  assert all(Image.open(io.BytesIO(a[2])).mode == "RGBA" for a in answers)


def test_a_slide_without_features_is_extracted_on_first_open(server, tmp_path):
  base, viewer, _ = server
  status, _, body = _get(f"{base}/api/slides/cmu/heatmap.png?q=tumour")
  assert status == 409 and "no features yet" in json.loads(body)["error"]
  status, _, _ = _get(f"{base}/api/slides/cmu/features", b"")
  assert status == 202
  deadline = time.time() + 120
  while True:
    job = json.loads(_get(f"{base}/api/slides/cmu/features")[2])
    if job["state"] == "ready":
      break
    assert job["state"] in ("waiting", "extracting") and time.time() < deadline, job
    time.sleep(0.2)
  status, headers, _ = _get(f"{base}/api/slides/cmu/heatmap.png?q=tumour")
  assert status == 200 and json.loads(headers["x-heatmap"])["patches"] > 0
  assert viewer.feature_state("cmu") == "ready"
  # A later server over the same run reuses the extracted features from its cache folder...
  later = serve.Viewer(viewer.workdir, {"cmu": viewer.entry("cmu")})
  assert later.feature_state("cmu") == "ready"
  np.testing.assert_allclose(later.heatmap("cmu", "tumour")["scores"],
                             viewer.heatmap("cmu", "tumour")["scores"], atol=1e-6)
  # ...but not for another slide file under the same id.
  other = tmp_path / "other.svs"
  shutil.copy(viewer.entry("cmu")["path"], other)
  assert serve.Viewer(viewer.workdir, {"cmu": {"path": str(other), "mpp": None}}
                      ).feature_state("cmu") == "none"


def test_zero_shot_caption_and_question(server):
  base, viewer, rows = server
  slide = rows[0]["slide_id"]
  zero_shot = json.loads(_get(f"{base}/api/slides/{slide}/zero_shot")[2])
  assert [c["name"] for c in zero_shot["classes"]] and abs(
      sum(c["probability"] for c in zero_shot["classes"]) - 1) < 1e-4
  assert isinstance(json.loads(_get(f"{base}/api/slides/{slide}/caption")[2])["caption"], str)
  status, _, body = _get(f"{base}/api/slides/{slide}/question",
                         json.dumps({"question": "What is the diagnosis?"}).encode())
  assert status == 200 and json.loads(body)["question"] == "What is the diagnosis?"


def _chrome():
  from selenium import webdriver  # noqa: PLC0415
  from selenium.webdriver.chrome.service import Service  # noqa: PLC0415
  driver_path = shutil.which("chromedriver")
  browser = shutil.which("chromium")
  if not driver_path or not browser:
    pytest.skip("needs Debian's chromium and chromium-driver (bash setup.sh --test)")
  options = webdriver.ChromeOptions()
  options.binary_location = browser
  for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
               "--window-size=1280,800", "--force-device-scale-factor=1"):
    options.add_argument(flag)
  return webdriver.Chrome(service=Service(driver_path), options=options)


def _wait(driver, script: str, timeout: float = 60.0):
  deadline = time.time() + timeout
  while not driver.execute_script(f"return Boolean({script});"):
    assert time.time() < deadline, f"timed out waiting for {script}"
    time.sleep(0.1)


def _screenshot(driver) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB"))


@pytest.mark.slow
def test_page_in_headless_chromium_zoom_type_see_the_overlay(server, tmp_path):
  """Open a slide, zoom, type a phrase: the screenshot shows the heatmap's high colour on the
  highest-scoring patch, its low colour on the lowest, and the slide untouched off the tissue."""
  from selenium.webdriver.common.by import By  # noqa: PLC0415
  from selenium.webdriver.common.keys import Keys  # noqa: PLC0415
  base, viewer, rows = server
  slide = rows[0]["slide_id"]
  driver = _chrome()
  try:
    driver.get(base + "/")
    _wait(driver, f"document.querySelector('li[data-id=\"{slide}\"]')")
    driver.find_element(By.CSS_SELECTOR, f'li[data-id="{slide}"]').click()
    _wait(driver, "window.pf.opened && window.pf.featuresReady && "
          "pf.viewer.world.getItemAt(0).getFullyLoaded()")
    before_zoom = driver.execute_script("return pf.micronsPerScreenPixel;")
    scale_label = driver.find_element(By.ID, "scalebar-label").text
    assert scale_label.endswith("µm") or scale_label.endswith("mm")
    driver.execute_script(
        "pf.settled = false;"
        "pf.viewer.addOnceHandler('animation-finish', () => { pf.settled = true; });"
        "pf.viewer.viewport.zoomBy(2); pf.viewer.viewport.applyConstraints();")
    _wait(driver, "pf.settled && pf.viewer.world.getItemAt(0).getFullyLoaded()")
    time.sleep(0.5)
    after_zoom = driver.execute_script("return pf.micronsPerScreenPixel;")
    assert after_zoom == pytest.approx(before_zoom / 2, rel=0.05)
    plain = _screenshot(driver)

    driver.execute_script("document.getElementById('opacity').value = 1;")
    field = driver.find_element(By.ID, "phrase")
    field.send_keys("invasive carcinoma", Keys.ENTER)
    _wait(driver, "pf.overlayReady")
    time.sleep(0.5)
    shot = _screenshot(driver)
    Image.fromarray(shot).save(tmp_path / "viewer.png")

    result = viewer.heatmap(slide, "invasive carcinoma")
    size = result["patch_size_level0"]

    def on_screen(x: float, y: float) -> tuple[int, int] | None:
      point = driver.execute_script(
          "const item = pf.viewer.world.getItemAt(0);"
          "const p = item.imageToViewerElementCoordinates(new OpenSeadragon.Point("
          "arguments[0], arguments[1]));"
          "const box = pf.viewer.element.getBoundingClientRect();"
          "return [p.x + box.left, p.y + box.top, box.left, box.top, box.right, box.bottom];",
          float(x), float(y))
      px, py, left, top, right, bottom = point
      if left + 2 <= px < right - 2 and top + 2 <= py < bottom - 2:
        return int(px), int(py)
      return None

    checked = 0
    for index, target in ((int(np.argmax(result["normalised"])), 1.0),
                          (int(np.argmin(result["normalised"])), 0.0)):
      x, y = result["coords"][index] + size / 2
      where = on_screen(x, y)
      if where is None:
        continue
      colour = heatmaps.colormap(np.array([target]))[0].astype(int)
      seen = shot[where[1], where[0]].astype(int)
      assert np.abs(seen - colour).max() <= 12, (index, seen, colour)
      assert np.abs(plain[where[1], where[0]].astype(int) - colour).max() > 12
      checked += 1
    assert checked, "neither the highest nor the lowest patch is on screen"
    # Off the tissue (a cell with no patch): the slide shows through unchanged.
    cells = {tuple(c) for c in (result["coords"] // size).astype(int)}
    info = viewer.describe(slide)
    empty = next(((cx, cy) for cy in range(int(info["height"] // size))
                  for cx in range(int(info["width"] // size)) if (cx, cy) not in cells
                  and on_screen((cx + 0.5) * size, (cy + 0.5) * size)), None)
    if empty is not None:
      ex, ey = on_screen((empty[0] + 0.5) * size, (empty[1] + 0.5) * size)
      assert np.abs(shot[ey, ex].astype(int) - plain[ey, ex].astype(int)).max() <= 12
    assert driver.find_element(By.ID, "geojson").get_attribute("href").endswith(
        "heatmap.geojson?q=invasive%20carcinoma")
    assert not driver.find_element(By.ID, "legend").get_attribute("hidden")
  finally:
    driver.quit()
  assert os.path.getsize(tmp_path / "viewer.png") > 0
