// MedServe viewer: choose a model, send an image, see the answer. Uses the service's own API only.
import { KeyRequired, ServiceError, call, forgetKey, oodOf, postFile, query, storeKey, storedKey } from "./api.js";
import { classColour, decodeInBrowser, drawImage, drawMask, imageFromOverlay, labelsOf, pixelsOf } from "./images.js";

const config = JSON.parse(document.getElementById("viewer-config").textContent);
const $ = (id) => document.getElementById(id);
const el = {
  keyForm: $("key-form"), keyReason: $("key-reason"), keyInput: $("api-key"), forgetKey: $("forget-key"),
  model: $("model"), modelInfo: $("model-info"), file: $("file"), dropzone: $("dropzone"), controls: $("controls"),
  run: $("run"), status: $("status"),
  error: $("error"), errorTitle: $("error-title"), errorDetail: $("error-detail"), ood: $("ood-warning"),
  placeholder: $("placeholder"), view: $("view"), stage: $("stage"), imageCanvas: $("image-canvas"),
  maskCanvas: $("mask-canvas"), explanationImage: $("explanation-image"), noPreview: $("no-preview"),
  segmentation: $("segmentation"), opacity: $("opacity"), opacityValue: $("opacity-value"),
  legendList: $("legend-list"), downloadMask: $("download-mask"), downloadSeg: $("download-seg"),
  classification: $("classification"), predicted: $("predicted"), bars: $("bars"),
  explanationControls: $("explanation-controls"), explanationToggle: $("explanation-toggle"),
  explanationLabel: $("explanation-label"), explanationNote: $("explanation-note"),
  explanationTarget: $("explanation-target"),
};

const MODEL_POLL_MS = 1500;
const state = {
  models: [],
  file: null,
  run: 0, // the current analysis; answers of older ones are dropped
  busy: false,
  retry: null, // what to do again once the user has entered an API key
  objectUrls: [],
  mask: null, // {labels, width, height, visible: Set}
  hasBase: false,
  explainTarget: null, // the class to explain when the user chose one; null: the predicted label
};

// -- small helpers ----------------------------------------------------------------------------------------

function setStatus(text) {
  el.status.textContent = text;
}

function percent(fraction, digits = 1) {
  return `${(fraction * 100).toFixed(digits)} %`;
}

function stem(name) {
  const base = (name || "image").replace(/^.*[\\/]/, "");
  return base.replace(/\.[^.]+$/, "") || "image";
}

function remember(url) {
  state.objectUrls.push(url);
  return url;
}

function saveBlob(blob, filename) {
  const link = document.createElement("a");
  link.href = remember(URL.createObjectURL(blob));
  link.download = filename;
  document.body.append(link);
  link.click();
  link.remove();
}

function selectedModel() {
  return state.models.find((m) => m.name === el.model.value && m.status === "ready") || null;
}

/** Whether the model explains its predictions with Grad-CAM: GET /models lists `explain.methods`. */
function explainsWithGradcam(model) {
  const explain = model.explain;
  return Boolean(explain && Array.isArray(explain.methods) && explain.methods.includes("gradcam"));
}

// -- errors, the API key and the OOD warning -------------------------------------------------------------

function showError(error) {
  el.errorTitle.textContent = error.title || "Error";
  let detail = error.detail || error.message || "Something went wrong.";
  if (error.retryAfter) detail += ` Try again in ${error.retryAfter} s.`;
  el.errorDetail.textContent = detail;
  el.error.hidden = false;
  el.placeholder.hidden = true;
}

function hideError() {
  el.error.hidden = true;
  el.errorTitle.textContent = "";
  el.errorDetail.textContent = "";
}

function askForKey(error, retry) {
  const refused = storedKey() !== null;
  if (refused) forgetKey();
  el.forgetKey.hidden = true;
  el.keyReason.textContent = refused
    ? `The API key was not accepted (${error.detail}). Enter a valid key.`
    : "This service needs an API key. Enter it to continue.";
  state.retry = retry;
  if (state.models.length === 0) el.model.options[0].textContent = "Enter the API key to list the models";
  el.keyForm.hidden = false;
  setStatus("Waiting for an API key.");
  el.keyInput.focus();
}

function handleError(error, retry) {
  if (error instanceof KeyRequired) {
    askForKey(error, retry);
    return;
  }
  if (error instanceof ServiceError) {
    showError(error);
  } else {
    console.error(error);
    showError(new ServiceError(0, "Viewer error", `The answer could not be shown (${error.message}).`));
  }
  setStatus("");
}

function number(value) {
  // Three significant digits, without the trailing zeros of toPrecision ("-1", not "-1.00").
  return typeof value === "number" && Number.isFinite(value) ? String(Number(value.toPrecision(3))) : null;
}

function showOod(ood) {
  if (!ood || !ood.flagged) {
    el.ood.hidden = true;
    el.ood.textContent = "";
    return;
  }
  const score = number(ood.score);
  const threshold = number(ood.threshold);
  let measured = "";
  if (score !== null && threshold !== null) measured = ` (score ${score}, threshold ${threshold})`;
  else if (score !== null) measured = ` (score ${score})`;
  el.ood.textContent =
    `Out of distribution: this image is unlike the images the model was trained on${measured}. ` +
    "The answer may be meaningless; do not rely on it.";
  el.ood.hidden = false;
}

// -- the models -------------------------------------------------------------------------------------------

function describeModel(model) {
  if (!model) return "";
  const parts = [model.task, `version ${model.version}`];
  if (Array.isArray(model.classes)) parts.push(`classes: ${model.classes.join(", ")}`);
  if (model.task === "classification" && explainsWithGradcam(model)) {
    parts.push(model.explain.layer ? `explained by Grad-CAM on ${model.explain.layer}` : "explained by Grad-CAM");
  }
  return parts.join(" · ");
}

function fillModels(models) {
  const previous = el.model.value;
  el.model.replaceChildren();
  const ready = models.filter((m) => m.status === "ready");
  for (const model of models) {
    const option = document.createElement("option");
    option.value = model.name;
    if (model.status === "ready") {
      option.textContent = `${model.name} (${model.task})`;
    } else {
      option.textContent = `${model.name} (${model.status})`;
      option.disabled = true;
    }
    el.model.append(option);
  }
  if (ready.length === 0) {
    const option = document.createElement("option");
    option.value = "";
    option.textContent = models.length ? "No model is ready" : "No model is served";
    option.selected = true;
    el.model.prepend(option);
  }
  const keep = ready.find((m) => m.name === previous) || ready[0];
  if (keep) el.model.value = keep.name;
  el.model.disabled = ready.length === 0;
  el.modelInfo.textContent = describeModel(selectedModel());
  updateButtons();
}

async function loadModels() {
  setStatus("Loading the list of models…");
  let body;
  try {
    body = await (await call("/models")).json();
  } catch (error) {
    handleError(error, loadModels);
    return;
  }
  hideError();
  state.models = Array.isArray(body.models) ? body.models : [];
  fillModels(state.models);
  if (state.models.some((m) => m.status === "loading")) {
    setStatus("The models are loading…");
    window.setTimeout(loadModels, MODEL_POLL_MS);
  } else if (state.models.length === 0) {
    setStatus("The service has no model: its model directory holds no checkpoint.");
  } else if (!state.models.some((m) => m.status === "ready")) {
    setStatus("No model could be loaded; GET /models lists the errors.");
  } else {
    setStatus(state.file ? "" : "Ready: choose an image.");
    if (state.file && state.run === 0) analyse();
  }
}

// -- results ----------------------------------------------------------------------------------------------

function resetResult() {
  hideError();
  showOod(null);
  for (const url of state.objectUrls) URL.revokeObjectURL(url);
  state.objectUrls = [];
  state.mask = null;
  el.view.hidden = true;
  el.segmentation.hidden = true;
  el.classification.hidden = true;
  el.maskCanvas.hidden = true;
  el.explanationImage.hidden = true;
  el.explanationImage.removeAttribute("src");
  el.explanationControls.hidden = true;
  el.explanationNote.hidden = true;
  el.noPreview.hidden = true;
  el.imageCanvas.hidden = false;
  el.stage.classList.remove("no-base");
  el.downloadSeg.hidden = true;
  el.legendList.replaceChildren();
  el.bars.replaceChildren();
  el.placeholder.hidden = false;
}

function showBase(source) {
  state.hasBase = Boolean(source);
  if (source) {
    drawImage(el.imageCanvas, source);
    el.imageCanvas.hidden = false;
    el.stage.classList.remove("no-base");
  } else {
    el.imageCanvas.hidden = true;
    el.stage.classList.add("no-base");
  }
  el.view.hidden = false;
  el.placeholder.hidden = true;
}

function redrawMask() {
  const mask = state.mask;
  if (!mask) return;
  drawMask(el.maskCanvas, mask.labels, mask.width, mask.height, mask.visible, config);
}

function applyOpacity() {
  const value = Number(el.opacity.value);
  el.maskCanvas.style.opacity = String(value / 100);
  el.opacityValue.textContent = `${value} %`;
}

function legendEntry(entry) {
  const item = document.createElement("li");
  item.dataset.class = entry.name;
  item.dataset.pixels = String(entry.pixels);
  const swatch = document.createElement("span");
  swatch.className = "swatch";
  swatch.setAttribute("aria-hidden", "true");
  const area = document.createElement("span");
  area.className = "area";
  area.textContent = ` ${percent(entry.fraction)} (${entry.pixels.toLocaleString("en")} px)`;
  const name = document.createElement("span");
  name.className = "class-name";
  name.textContent = entry.name;
  if (entry.index === 0) {
    swatch.classList.add("none");
    const text = document.createElement("span");
    text.append(name, area);
    item.append(swatch, text);
    return item;
  }
  const [r, g, b] = classColour(config, entry.index);
  swatch.style.backgroundColor = `rgb(${r}, ${g}, ${b})`;
  const box = document.createElement("input");
  box.type = "checkbox";
  box.id = `class-toggle-${entry.index}`;
  box.checked = true;
  box.dataset.index = String(entry.index);
  box.addEventListener("change", () => {
    if (!state.mask) return;
    if (box.checked) state.mask.visible.add(entry.index);
    else state.mask.visible.delete(entry.index);
    redrawMask();
  });
  const label = document.createElement("label");
  label.htmlFor = box.id;
  label.append(swatch, name, area);
  item.append(box, label);
  return item;
}

async function segment(run, model, file) {
  const path = (format) => `/segment${query({ model: model.name, format })}`;
  const [summaryResponse, maskResponse] = await Promise.all([
    postFile(path("json"), file),
    postFile(path("png"), file),
  ]);
  const summary = await summaryResponse.json();
  const maskBlob = await maskResponse.blob();
  const maskPixels = await pixelsOf(maskBlob);
  const classes = Array.isArray(summary.classes) ? summary.classes : [];
  const labels = labelsOf(maskPixels, classes.length || model.classes.length);
  const { width, height } = maskPixels;
  const bitmap = await decodeInBrowser(file);
  let base = bitmap && bitmap.width === width && bitmap.height === height ? bitmap : null;
  if (!base) {
    // The browser cannot decode the file (TIFF, DICOM) or reads it at another size: the image as the
    // service read it, recovered from its overlay.
    const overlay = await pixelsOf(await (await postFile(path("overlay"), file)).blob());
    base = imageFromOverlay(overlay, labels, config);
  }
  if (run !== state.run) return;
  showBase(base);
  state.mask = { labels, width, height, visible: new Set(classes.map((c) => c.index).filter((i) => i > 0)) };
  redrawMask();
  applyOpacity();
  el.maskCanvas.hidden = false;
  el.legendList.replaceChildren(...classes.map(legendEntry));
  el.downloadMask.href = remember(URL.createObjectURL(maskBlob));
  el.downloadMask.download = `${stem(file.name)}-mask.png`;
  if (summary.dicom !== undefined && summary.dicom !== null) {
    el.downloadSeg.hidden = false;
    el.downloadSeg.onclick = () => downloadSeg(model, file);
  }
  el.segmentation.hidden = false;
  showOod(oodOf(summary.ood, maskResponse));
}

async function downloadSeg(model, file) {
  hideError();
  setStatus("Writing the DICOM SEG…");
  el.downloadSeg.disabled = true;
  try {
    const response = await postFile(`/segment${query({ model: model.name, format: "dicom-seg" })}`, file);
    saveBlob(await response.blob(), `${stem(file.name)}-seg.dcm`);
    setStatus("DICOM SEG downloaded.");
  } catch (error) {
    handleError(error, () => downloadSeg(model, file));
  } finally {
    el.downloadSeg.disabled = false;
  }
}

function bar(name, probability, top) {
  const item = document.createElement("li");
  item.dataset.class = name;
  item.dataset.probability = String(probability);
  if (top) item.classList.add("top");
  const label = document.createElement("span");
  label.className = "bar-label";
  label.textContent = name;
  const track = document.createElement("span");
  track.className = "bar-track";
  track.setAttribute("aria-hidden", "true");
  const fill = document.createElement("span");
  fill.className = "bar-fill";
  fill.style.width = `${Math.max(0, Math.min(100, probability * 100))}%`;
  track.append(fill);
  const value = document.createElement("span");
  value.className = "bar-value";
  value.textContent = percent(probability);
  item.append(label, track, value);
  return item;
}

function applyExplanationToggle() {
  const shown = el.explanationToggle.checked;
  el.explanationImage.hidden = !shown;
  el.noPreview.hidden = state.hasBase || shown;
}

async function classify(run, model, file) {
  const explain = explainsWithGradcam(model);
  const target = explain && model.classes.includes(state.explainTarget) ? state.explainTarget : null;
  let response;
  let note = null;
  try {
    const params = { model: model.name, explain: explain ? "gradcam" : null, target };
    response = await postFile(`/classify${query(params)}`, file);
  } catch (error) {
    // Explanations have their own queue: when it is full, answer without one.
    if (!explain || !(error instanceof ServiceError) || error instanceof KeyRequired || error.status !== 503) {
      throw error;
    }
    note = `No explanation this time: ${error.detail}`;
    response = await postFile(`/classify${query({ model: model.name })}`, file);
  }
  const body = await response.json();
  const prediction = (body.predictions || [])[0];
  if (!prediction) throw new ServiceError(0, "Empty answer", "The service answered without a prediction.");
  const bitmap = await decodeInBrowser(file);
  if (run !== state.run) return;
  showBase(bitmap);
  const entries = Object.entries(prediction.probabilities || {}).sort((a, b) => b[1] - a[1]);
  el.bars.replaceChildren(...entries.map(([name, p]) => bar(name, p, name === prediction.label)));
  const best = prediction.probabilities ? prediction.probabilities[prediction.label] : undefined;
  el.predicted.textContent =
    best === undefined ? `Most probable: ${prediction.label}` : `Most probable: ${prediction.label} (${percent(best)})`;
  const explanation = prediction.explanation;
  if (explanation && typeof explanation.overlay_png === "string") {
    el.explanationImage.src = `data:image/png;base64,${explanation.overlay_png}`;
    const method = explanation.method === "gradcam" ? "Grad-CAM" : explanation.method || "explanation";
    const explained = explanation.target ?? prediction.label;
    el.explanationLabel.textContent = `Show the ${method} map for “${explained}”`;
    el.explanationTarget.replaceChildren(
      ...model.classes.map((name) => new Option(name, name, false, name === explained)),
    );
    el.explanationControls.hidden = false;
    applyExplanationToggle();
  } else {
    el.noPreview.hidden = state.hasBase;
  }
  if (note) {
    el.explanationNote.textContent = note;
    el.explanationNote.hidden = false;
  }
  el.classification.hidden = false;
  showOod(oodOf(prediction.ood, response));
}

async function analyse() {
  const file = state.file;
  if (!file) return;
  const model = selectedModel();
  const run = ++state.run;
  resetResult();
  if (!model) {
    showError(new ServiceError(0, "No model", "No model is ready yet: wait for the models to load."));
    return;
  }
  state.busy = true;
  updateButtons();
  setStatus(`Sending ${file.name || "the image"} to ${model.name}…`);
  try {
    if (model.task === "segmentation") await segment(run, model, file);
    else if (model.task === "classification") await classify(run, model, file);
    else throw new ServiceError(0, "Unknown task", `The viewer cannot show answers of task “${model.task}”.`);
    if (run === state.run) setStatus(`Answered by ${model.name} (version ${model.version}).`);
  } catch (error) {
    if (run === state.run) {
      resetResult();
      handleError(error, analyse);
    }
  } finally {
    if (run === state.run) {
      state.busy = false;
      updateButtons();
    }
  }
}

function updateButtons() {
  el.run.disabled = state.busy || !state.file || !selectedModel();
}

function chooseFile(file) {
  if (!file) return;
  state.file = file;
  state.explainTarget = null;
  analyse();
}

// -- wiring -----------------------------------------------------------------------------------------------

el.keyForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const key = el.keyInput.value.trim();
  if (!key) return;
  storeKey(key);
  el.keyInput.value = "";
  el.keyForm.hidden = true;
  el.forgetKey.hidden = false;
  const retry = state.retry || loadModels;
  state.retry = null;
  // The models first when they were never listed (the first 401 came from GET /models).
  if (state.models.length === 0 && retry !== loadModels) loadModels().then(retry);
  else retry();
});

el.forgetKey.addEventListener("click", () => {
  forgetKey();
  el.forgetKey.hidden = true;
  setStatus("The API key is forgotten.");
});

el.model.addEventListener("change", () => {
  state.explainTarget = null;
  el.modelInfo.textContent = describeModel(selectedModel());
  updateButtons();
  if (state.file) analyse();
});

el.file.addEventListener("change", () => chooseFile(el.file.files[0]));
el.run.addEventListener("click", () => analyse());
el.opacity.addEventListener("input", applyOpacity);
el.explanationToggle.addEventListener("change", applyExplanationToggle);
el.explanationTarget.addEventListener("change", () => {
  state.explainTarget = el.explanationTarget.value;
  analyse();
});

// Dropping a file anywhere on the page chooses it (and never makes the browser open it instead).
document.addEventListener("dragover", (event) => {
  event.preventDefault();
  el.dropzone.classList.add("dragging");
});
document.addEventListener("dragleave", (event) => {
  if (event.relatedTarget === null) el.dropzone.classList.remove("dragging");
});
document.addEventListener("drop", (event) => {
  event.preventDefault();
  el.dropzone.classList.remove("dragging");
  const file = event.dataTransfer && event.dataTransfer.files[0];
  if (file) chooseFile(file);
});

el.forgetKey.hidden = storedKey() === null;
applyOpacity();
resetResult();
loadModels();
