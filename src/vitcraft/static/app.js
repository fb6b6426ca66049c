// The vitcraft serve page: pick or drop an image, POST it to /api/predict, show what comes back.
// No libraries: the server sends the top classes as JSON and the pictures as PNG data URIs.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, file: null, request: 0 };

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function setStatus(message) {
  $("status").textContent = message;
}

function megabytes(bytes) {
  return `${Math.round(bytes / 1024 / 1024)} MB`;
}

function fillSelect(select, options, selected) {
  select.replaceChildren(...options.map(([value, label]) => {
    const option = document.createElement("option");
    option.value = value;
    option.textContent = label;
    option.selected = value === selected;
    return option;
  }));
}

async function loadInfo() {
  const response = await fetch("/api/info");
  const info = await response.json();
  state.info = info;
  $("model-title").textContent = info.title;
  const colour = info.channels === 1 ? "grayscale" : "colour";
  $("model-facts").textContent = `${info.classes.length} classes · ${info.image_size}×${info.image_size} ` +
    `${colour} input · ${info.layers} blocks · ${info.heads} heads`;
  $("limits").textContent = `Any common image format, up to ${megabytes(info.max_upload_bytes)} and ` +
    `${Math.round(info.max_pixels / 1e6)} megapixels. It is resized to ${info.image_size}×${info.image_size} ` +
    `for the model.`;
  $("controls").hidden = info.maps !== "cls";  // block and head choose among [CLS] attention maps only
  if (info.maps !== "cls") return;
  const layers = [...Array(info.layers).keys()].map((i) => [String(i), i === info.layers - 1 ? `${i} (last)` : String(i)]);
  fillSelect($("layer-select"), layers, String(info.layers - 1));
  const heads = [["mean", "mean of all"], ...[...Array(info.heads).keys()].map((i) => [String(i), String(i)])];
  fillSelect($("head-select"), heads, "mean");
}

function showTop(top5) {
  $("top5").replaceChildren(...top5.map(({ name, probability }) => {
    const item = document.createElement("li");
    const row = document.createElement("div");
    row.className = "row";
    const label = document.createElement("span");
    label.className = "name";
    label.textContent = name;
    const value = document.createElement("span");
    value.className = "prob";
    value.textContent = `${(100 * probability).toFixed(2)}%`;
    row.append(label, value);
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("div");
    fill.style.width = `${(100 * probability).toFixed(1)}%`;
    bar.append(fill);
    item.append(row, bar);
    return item;
  }));
}

function showResult(result) {
  $("file-name").textContent = result.name;
  showTop(result.top5);
  $("image-view").src = result.image;
  for (const method of ["cls", "rollout"]) {
    const picture = result[`overlay_${method}`];  // null when the model has no such map
    $(`overlay-${method}`).hidden = !picture;
    if (picture) $(`overlay-${method}`).src = picture;
    $(`caption-${method}`).textContent = result[`caption_${method}`];
  }
  $("results").hidden = false;
}

// Sends the current file with the chosen block and head; an older answer arriving late is dropped.
async function predict() {
  if (!state.file) return;
  const request = ++state.request;
  const form = new FormData();
  form.append("image", state.file, state.file.name);
  form.append("layer", $("layer-select").value || "-1");  // empty when the model has no block choice
  form.append("head", $("head-select").value || "mean");
  setStatus(`Running the model on ${state.file.name}…`);
  let message = "";
  try {
    const response = await fetch("/api/predict", { method: "POST", body: form });
    const text = await response.text();
    let body = null;
    try { body = JSON.parse(text); } catch (_) { /* not JSON: a proxy or a crash page */ }
    if (request !== state.request) return;
    if (response.ok && body) {
      showResult(body);
    } else {
      message = (body && body.error) || `The server answered ${response.status} ${response.statusText}.`;
    }
  } catch (error) {
    if (request !== state.request) return;
    message = `Cannot reach the vitcraft server (${error.message}). Is it still running?`;
  }
  setStatus("");
  showError(message);
  if (message) $("results").hidden = true;
}

function choose(file) {
  if (!file) return;
  showError("");
  if (state.info && file.size > state.info.max_upload_bytes) {
    state.file = null;
    $("results").hidden = true;
    showError(`${file.name} is ${megabytes(file.size)}; the limit is ${megabytes(state.info.max_upload_bytes)}.`);
    return;
  }
  state.file = file;
  predict();
}

function setUp() {
  loadInfo().catch((error) => showError(`Cannot read the model description: ${error.message}`));
  $("file-input").addEventListener("change", (event) => choose(event.target.files[0]));
  $("layer-select").addEventListener("change", predict);
  $("head-select").addEventListener("change", predict);
  const zone = $("drop-zone");
  for (const name of ["dragenter", "dragover"]) {
    zone.addEventListener(name, (event) => { event.preventDefault(); zone.classList.add("dragging"); });
  }
  for (const name of ["dragleave", "drop"]) {
    zone.addEventListener(name, () => zone.classList.remove("dragging"));
  }
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    choose(event.dataTransfer.files[0]);
  });
  // a file dropped beside the zone would make the browser open it and leave the page
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());
}

setUp();
