// The PathFLIP slide viewer: a slide list, an OpenSeadragon deep-zoom view with a scale bar,
// and text-prompted heatmaps drawn over the slide. window.pf exposes the state to tests.
"use strict";

const pf = window.pf = { viewer: null, slide: null, overlay: null, overlayReady: false,
                         lastHeatmap: null };
const $ = (id) => document.getElementById(id);

async function api(path, options) {
  const response = await fetch(path, options);
  const type = response.headers.get("content-type") || "";
  const body = type.includes("json") ? await response.json() : null;
  if (!response.ok) {
    throw new Error((body && body.error) || `${response.status} ${response.statusText}`);
  }
  return { response, body };
}

function status(text, isError) {
  $("status").textContent = text || "";
  $("status").className = isError ? "error" : "";
}

async function listSlides() {
  const { body } = await api("/api/slides");
  const list = $("slide-list");
  list.innerHTML = "";
  for (const slide of body.slides) {
    const item = document.createElement("li");
    item.dataset.id = slide.id;
    const image = document.createElement("img");
    image.src = `/api/slides/${encodeURIComponent(slide.id)}/thumbnail.jpg`;
    image.alt = slide.id;
    const name = document.createElement("div");
    name.textContent = slide.id;
    const state = document.createElement("div");
    state.className = "state";
    state.textContent = slide.features === "ready" ? "features ready" : "features on open";
    item.append(image, name, state);
    item.addEventListener("click", () => openSlide(slide.id));
    list.append(item);
  }
}

function niceLength(micrometres) {
  const power = Math.pow(10, Math.floor(Math.log10(micrometres)));
  for (const step of [5, 2, 1]) {
    if (step * power <= micrometres) return step * power;
  }
  return power;
}

function updateScaleBar() {
  const viewer = pf.viewer;
  if (!viewer || !pf.slide || viewer.world.getItemCount() === 0) return;
  const item = viewer.world.getItemAt(0);
  const screenPerImagePixel = item.viewportToImageZoom(viewer.viewport.getZoom(true));
  const micronsPerScreenPixel = pf.slide.mpp / screenPerImagePixel;
  const length = niceLength(150 * micronsPerScreenPixel);
  $("scalebar-line").style.width = `${length / micronsPerScreenPixel}px`;
  $("scalebar-label").textContent = length >= 1000 ? `${length / 1000} mm` : `${length} µm`;
  pf.micronsPerScreenPixel = micronsPerScreenPixel;
}

async function openSlide(id) {
  status(`Opening ${id}...`);
  for (const li of $("slide-list").children) li.classList.toggle("open", li.dataset.id === id);
  const { body: slide } = await api(`/api/slides/${encodeURIComponent(id)}`);
  pf.slide = slide;
  pf.overlay = null;
  pf.overlayReady = false;
  $("slide-title").textContent = id;
  $("phrase").disabled = true;
  $("legend").hidden = true;
  $("zero-shot").innerHTML = "";
  $("caption").textContent = "";
  $("answer").textContent = "";
  $("decoder").hidden = !slide.has_decoder;
  if (pf.viewer) pf.viewer.destroy();
  pf.viewer = OpenSeadragon({
    element: $("viewer"),
    prefixUrl: "/static/openseadragon/images/",
    tileSources: `/api/slides/${encodeURIComponent(id)}/slide.dzi`,
    showNavigator: true,
    imageSmoothingEnabled: false,
    maxZoomPixelRatio: 4,
  });
  pf.viewer.addHandler("open", () => { pf.opened = true; updateScaleBar(); });
  pf.viewer.addHandler("animation", updateScaleBar);
  pf.viewer.addHandler("resize", updateScaleBar);
  await ensureFeatures(id);
}

async function ensureFeatures(id) {
  let state = pf.slide.features;
  if (state !== "ready") {
    await api(`/api/slides/${encodeURIComponent(id)}/features`, { method: "POST" });
    for (;;) {
      const { body: job } = await api(`/api/slides/${encodeURIComponent(id)}/features`);
      if (pf.slide.id !== id) return;
      if (job.state === "ready") break;
      if (job.state === "error") {
        status(`Feature extraction failed: ${job.message}`, true);
        return;
      }
      status(job.total ? `Extracting features: ${job.done} / ${job.total} patches`
                       : "Extracting features: finding tissue...");
      await new Promise((resolve) => setTimeout(resolve, 500));
    }
  }
  status("");
  pf.featuresReady = true;
  $("phrase").disabled = false;
  showZeroShot(id);
  if (pf.slide.has_decoder) showCaption(id);
}

async function showZeroShot(id) {
  try {
    const { body } = await api(`/api/slides/${encodeURIComponent(id)}/zero_shot`);
    const list = $("zero-shot");
    list.innerHTML = "";
    for (const c of body.classes) {
      const item = document.createElement("li");
      item.textContent = `${c.name}: ${(100 * c.probability).toFixed(1)}%`;
      list.append(item);
    }
  } catch (error) { status(error.message, true); }
}

async function showCaption(id) {
  pf.captionReady = false;
  $("caption").textContent = "writing...";
  try {
    const { body } = await api(`/api/slides/${encodeURIComponent(id)}/caption`);
    $("caption").textContent = body.caption || "";
  } catch (error) { $("caption").textContent = error.message; }
  pf.captionReady = true;
}

async function drawHeatmap(phrase) {
  const id = pf.slide.id;
  pf.overlayReady = false;
  status(`Scoring "${phrase}"...`);
  const query = `?q=${encodeURIComponent(phrase)}`;
  let response;
  try {
    ({ response } = await api(`/api/slides/${encodeURIComponent(id)}/heatmap.png${query}`));
  } catch (error) { status(error.message, true); return; }
  const meta = JSON.parse(response.headers.get("x-heatmap"));
  const url = URL.createObjectURL(await response.blob());
  if (pf.overlay) pf.viewer.world.removeItem(pf.overlay);
  pf.overlay = null;
  pf.viewer.addSimpleImage({
    url, x: 0, y: 0, width: meta.columns * meta.cell / pf.slide.width,
    opacity: Number($("opacity").value),
    success: (event) => {
      pf.overlay = event.item;
      const done = () => { pf.overlayReady = true; status(""); };
      if (event.item.getFullyLoaded()) done();
      else event.item.addOnceHandler("fully-loaded-change", done);
    },
  });
  pf.lastHeatmap = meta;
  $("legend").hidden = false;
  $("legend-low").textContent = meta.min.toFixed(3);
  $("legend-high").textContent = meta.max.toFixed(3);
  $("geojson").href = `/api/slides/${encodeURIComponent(id)}/heatmap.geojson${query}`;
}

$("phrase-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const phrase = $("phrase").value.trim();
  if (phrase && pf.slide) drawHeatmap(phrase);
});

$("opacity").addEventListener("input", () => {
  if (pf.overlay) pf.overlay.setOpacity(Number($("opacity").value));
});

$("question-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question || !pf.slide) return;
  $("answer").textContent = "thinking...";
  try {
    const { body } = await api(`/api/slides/${encodeURIComponent(pf.slide.id)}/question`, {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ question }) });
    $("answer").textContent = body.answer;
  } catch (error) { $("answer").textContent = error.message; }
});

listSlides().catch((error) => status(error.message, true));
