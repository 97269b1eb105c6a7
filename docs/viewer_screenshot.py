"""Draws docs/viewer.jpg: the slide viewer on a run, a phrase typed, at two zoom levels.

  python docs/viewer_screenshot.py --workdir runs/quickstart/instruct \
      --slides tests/testdata --slide cmu_small_region --phrase tumour [--output docs/viewer.jpg]

Starts ``python -m pathflip_jax.serve`` on a free port as a user would, opens the page in
Debian's headless Chromium (Selenium and /usr/bin/chromedriver, as tests/test_serve.py), opens
the slide, types the phrase, and saves the whole slide and a 4x zoom on its highest-scoring
patch side by side. Needs ``setup.sh --test`` (Chromium, Selenium).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _wait(driver, script: str, timeout: float = 600) -> None:
  deadline = time.time() + timeout
  while not driver.execute_script(f"return Boolean({script});"):
    if time.time() > deadline:
      raise TimeoutError(f"timed out waiting for {script}")
    time.sleep(0.2)


def _shot(driver) -> Image.Image:
  return Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--slides", required=True)
  parser.add_argument("--slide", required=True, help="the slide id to open")
  parser.add_argument("--phrase", default="tumour")
  parser.add_argument("--output", default=os.path.join(HERE, "viewer.jpg"))
  args = parser.parse_args(argv)

  from selenium import webdriver  # pylint: disable=import-outside-toplevel
  from selenium.webdriver.common.by import By  # pylint: disable=import-outside-toplevel
  from selenium.webdriver.common.keys import Keys  # pylint: disable=import-outside-toplevel

  port = _free_port()
  base = f"http://127.0.0.1:{port}"
  server = subprocess.Popen([sys.executable, "-m", "pathflip_jax.serve", "--workdir",
                             args.workdir, "--slides", args.slides, "--port", str(port)])
  driver = None
  try:
    deadline = time.time() + 300
    while True:
      try:
        with urllib.request.urlopen(base + "/api/slides", timeout=5) as response:
          ids = [s["id"] for s in json.load(response)["slides"]]
        break
      except OSError:
        if server.poll() is not None or time.time() > deadline:
          raise SystemExit("the viewer did not start") from None
        time.sleep(0.5)
    if args.slide not in ids:
      raise SystemExit(f"--slide {args.slide!r} is not among the served slides {ids}")

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--window-size=1280,800", "--force-device-scale-factor=1"):
      options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService("/usr/bin/chromedriver"),
                              options=options)
    started = time.time()
    driver.get(base + "/")
    _wait(driver, f"document.querySelector('li[data-id=\"{args.slide}\"]')")
    driver.find_element(By.CSS_SELECTOR, f'li[data-id="{args.slide}"]').click()
    _wait(driver, "window.pf.opened && window.pf.featuresReady && "
          "pf.viewer.world.getItemAt(0).getFullyLoaded()")
    print(f"[viewer_screenshot] slide open, features ready in {time.time() - started:.1f} s")
    driver.find_element(By.ID, "phrase").send_keys(args.phrase, Keys.ENTER)
    _wait(driver, "pf.overlayReady")
    _wait(driver, "pf.captionReady || document.getElementById('decoder').hidden")
    time.sleep(1.0)
    overview = _shot(driver)

    with urllib.request.urlopen(f"{base}/api/slides/{args.slide}/heatmap.json?q="
                                + urllib.parse.quote(args.phrase), timeout=120) as response:
      meta = json.load(response)
    x, y = meta["peak"]
    driver.execute_script(
        "pf.settled = false;"
        "pf.viewer.addOnceHandler('animation-finish', () => { pf.settled = true; });"
        "const item = pf.viewer.world.getItemAt(0);"
        "const at = item.imageToViewportCoordinates(new OpenSeadragon.Point(arguments[0],"
        "                                                                   arguments[1]));"
        "pf.viewer.viewport.zoomTo(4 * pf.viewer.viewport.getZoom());"
        "pf.viewer.viewport.panTo(at);"
        "pf.viewer.viewport.applyConstraints();", x, y)
    _wait(driver, "pf.settled && pf.viewer.world.getItemAt(0).getFullyLoaded()")
    time.sleep(1.0)
    zoomed = _shot(driver)
  finally:
    if driver is not None:
      driver.quit()
    server.terminate()
    server.wait(30)

  width, height = overview.size
  sheet = Image.new("RGB", (2 * width + 16, height), "white")
  sheet.paste(overview, (0, 0))
  sheet.paste(zoomed, (width + 16, 0))
  sheet = sheet.resize((sheet.width * 3 // 4, sheet.height * 3 // 4), Image.LANCZOS)
  sheet.save(args.output, quality=85)
  print(f"[viewer_screenshot] -> {args.output}")


if __name__ == "__main__":
  main()
