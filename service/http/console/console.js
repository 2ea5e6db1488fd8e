// certserve console: talks only to the public API (/v1/models, /v1/certify, /v1/jobs...).
// No framework, no build step, nothing fetched from elsewhere.
"use strict";

const KEY_STORAGE = "certserve-api-key";
const POLL_MS = 1000;
const $ = (id) => document.getElementById(id);

const state = {
  models: new Map(), // id → ModelInfo
  certificate: null, // the last /v1/certify answer
  pixels: null, // { data: Float32Array (C·H·W, in [0, 1]), shape: [C, H, W] } of the last image
  jobId: null,
  pollTimer: null,
  plotUrl: null,
};

// -- talking to the API ---------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, detail, retryAfter) {
    super(describeError(status, detail, retryAfter));
    this.status = status;
  }
}

function describeError(status, detail, retryAfter) {
  const said = detail ? ` (${detail})` : "";
  switch (status) {
    case 401: return `401 — this service needs an API key: enter it above and press "Use key"${said}.`;
    case 403: return `403 — the API key was refused${said}.`;
    case 404: return `404 — not found${said}.`;
    case 409: return `409 — ${detail || "not possible yet"}.`;
    case 413: return `413 — too large${said}.`;
    case 415: return `415 — unsupported file or content type${said}.`;
    case 422: return `422 — invalid input${said}.`;
    case 503: return `503 — the service is busy${retryAfter ? `; retry in ${retryAfter} s` : ""}${said}.`;
    case 504: return `504 — the request took too long and was stopped${said}.`;
    default: return `${status} — the request failed${said}.`;
  }
}

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// fetch relative to the page (so that a reverse-proxy prefix keeps working); an ApiError on any non-2xx.
async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  } catch (e) {
    throw new Error(`cannot reach the service (${e.message})`);
  }
  if (!response.ok) {
    let detail = "";
    try { detail = (await response.json()).detail || ""; } catch { /* not JSON */ }
    throw new ApiError(response.status, detail, response.headers.get("Retry-After"));
  }
  return response;
}

function showMessage(text) {
  $("message-text").textContent = text;
  $("message").hidden = false;
}

function clearMessage() { $("message").hidden = true; }

// Run an async UI action: errors become the message, the button is disabled meanwhile.
async function guarded(button, action) {
  if (button) button.disabled = true;
  try {
    clearMessage();
    await action();
  } catch (e) {
    showMessage(e.message);
  } finally {
    if (button) button.disabled = false;
  }
}

// -- parameters and models ------------------------------------------------------------------------

function params() {
  const fields = {};
  for (const name of ["n0", "n", "alpha"]) {
    const value = $(name).value.trim();
    if (value !== "") fields[name] = value;
  }
  return fields;
}

function fmt(x, digits = 3) { return Number(x).toFixed(digits); }

function selectedModel() { return state.models.get($("model").value); }

async function loadModels() {
  const query = new URLSearchParams();
  const { n, alpha } = params();
  if (n) query.set("n", n);
  if (alpha) query.set("alpha", alpha);
  const answer = await (await api(`v1/models?${query}`)).json();
  const select = $("model");
  const previous = select.value;
  state.models = new Map(answer.models.map((m) => [m.id, m]));
  select.replaceChildren(...answer.models.map((m) => new Option(`${m.id} (σ = ${m.sigma})`, m.id)));
  if (state.models.has(previous)) select.value = previous;
  showModel();
}

function showModel() {
  const model = selectedModel();
  const info = $("model-info");
  info.replaceChildren();
  if (!model) return;
  const ceiling = model.max_certifiable_radius;
  const facts = [
    ["dataset", model.dataset],
    ["architecture", model.architecture],
    ["σ", model.sigma],
    ["input shape (C×H×W)", model.input_shape.join("×")],
    ["classes", model.classes.join(", ")],
    ["largest certifiable radius", `${fmt(ceiling.radius)} (n = ${ceiling.n}, α = ${ceiling.alpha})`],
    ["device", `${model.device}, ${model.precision}`],
  ];
  for (const [term, value] of facts) {
    const dt = document.createElement("dt");
    dt.textContent = term;
    const dd = document.createElement("dd");
    dd.textContent = value;
    info.append(dt, dd);
  }
  $("n").placeholder = String(ceiling.n);
  $("alpha").placeholder = String(ceiling.alpha);
  const slider = $("radius-slider");
  slider.max = String(ceiling.radius);
  slider.step = String(ceiling.radius / 200);
  showRadiusVerdict();
}

// -- one image ------------------------------------------------------------------------------------

async function certifyImage() {
  const file = $("image-file").files[0];
  if (!file) throw new Error("choose an image first");
  const model = selectedModel();
  const body = new FormData();
  body.append("file", file);
  body.append("model", model.id);
  body.append("resize", $("resize").checked ? "true" : "false");
  for (const [k, v] of Object.entries(params())) body.append(k, v);
  state.pixels = await imagePixels(file, model.input_shape).catch(() => null);
  const answer = await (await api("v1/certify", { method: "POST", body })).json();
  state.certificate = answer;
  showCertificate(answer, model);
}

function showCertificate(answer, model) {
  $("certify-result").hidden = false;
  const verdict = $("certify-verdict");
  if (answer.abstained) {
    verdict.textContent = "Abstained: no class is certified.";
    verdict.className = "verdict abstained";
  } else {
    verdict.textContent = `Class ${answer.label}: ${answer.class_name}`;
    verdict.className = "verdict";
  }
  $("certify-radius").textContent = fmt(answer.radius, 4);
  $("certify-pa").textContent = fmt(answer.p_a_lower, 5);
  $("certify-samples").textContent = `${answer.n0} + ${answer.n} (α = ${answer.alpha})${answer.cached ? ", cached" : ""}`;
  $("certify-time").textContent = `${fmt(answer.queued_s + answer.compute_s, 2)} s`;
  const tbody = $("counts-table").tBodies[0];
  tbody.replaceChildren(...model.classes.map((name, i) => {
    const row = tbody.insertRow();
    for (const cell of [`${i} ${name}`, answer.selection_counts[i], answer.estimation_counts[i]]) {
      row.insertCell().textContent = cell;
    }
    return row;
  }));
  drawCounts(answer.estimation_counts, model.classes, answer.abstained ? null : answer.label);
  drawImages();
  $("radius-test-answer").textContent = "";
  showRadiusVerdict();
}

// The image as the model sees it (approximately: the browser resamples, the server uses bilinear with
// antialiasing), as C×H×W floats in [0, 1]; one channel is Pillow's "L" luma (ITU-R 601-2).
async function imagePixels(file, shape) {
  const [channels, height, width] = shape;
  const bitmap = await createImageBitmap(file);
  const canvas = new OffscreenCanvas(width, height);
  const context = canvas.getContext("2d");
  context.imageSmoothingQuality = "high";
  context.drawImage(bitmap, 0, 0, width, height);
  const rgba = context.getImageData(0, 0, width, height).data;
  const data = new Float32Array(channels * height * width);
  const plane = height * width;
  for (let p = 0; p < plane; p++) {
    const [r, g, b] = [rgba[4 * p], rgba[4 * p + 1], rgba[4 * p + 2]];
    if (channels === 1) {
      data[p] = (r * 299 + g * 587 + b * 114) / 1000 / 255;
    } else {
      data[p] = r / 255; data[plane + p] = g / 255; data[2 * plane + p] = b / 255;
    }
  }
  return { data, shape };
}

function gaussian() {
  // Box–Muller: one standard normal draw.
  const u = 1 - Math.random();
  return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * Math.random());
}

// x + δ with δ a uniformly random direction scaled to ‖δ‖₂ = radius, clipped to [0, 1] for display.
function perturb(data, radius) {
  const delta = Float32Array.from(data, () => gaussian());
  let squares = 0;
  for (const d of delta) squares += d * d;
  const norm = Math.sqrt(squares);
  const out = new Float32Array(data.length);
  let clippedSquares = 0;
  for (let i = 0; i < data.length; i++) {
    out[i] = Math.min(1, Math.max(0, data[i] + (delta[i] * radius) / norm));
    clippedSquares += (out[i] - data[i]) ** 2;
  }
  return { out, shownNorm: Math.sqrt(clippedSquares) };
}

function paint(canvas, data, shape) {
  const [channels, height, width] = shape;
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d");
  const image = context.createImageData(width, height);
  const plane = height * width;
  for (let p = 0; p < plane; p++) {
    for (let c = 0; c < 3; c++) image.data[4 * p + c] = Math.round(255 * data[(channels === 1 ? 0 : c) * plane + p]);
    image.data[4 * p + 3] = 255;
  }
  context.putImageData(image, 0, 0);
}

function drawImages() {
  const caption = $("perturbed-caption");
  if (!state.pixels || !state.certificate) {
    caption.textContent = "this browser could not decode the image for display";
    return;
  }
  const { data, shape } = state.pixels;
  const radius = state.certificate.radius;
  paint($("image-original"), data, shape);
  const { out, shownNorm } = perturb(data, radius);
  paint($("image-perturbed"), out, shape);
  caption.textContent = radius > 0
    ? `plus a random perturbation δ with ‖δ‖₂ = ${fmt(radius, 4)}, the certified radius: with probability ≥ 1 − α `
      + `the smoothed classifier gives the same class to every input closer than that. Pixels are clipped to [0, 1] `
      + `for display, which may shrink it: the one shown has ‖δ‖₂ = ${fmt(shownNorm, 4)}.`
    : "no radius is certified: there is no perturbation to show";
}

function drawCounts(counts, classes, winner) {
  const canvas = $("counts-chart");
  const scale = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 400;
  const height = canvas.clientHeight || 192;
  canvas.width = Math.round(width * scale);
  canvas.height = Math.round(height * scale);
  const context = canvas.getContext("2d");
  context.setTransform(scale, 0, 0, scale, 0, 0);
  context.clearRect(0, 0, width, height);
  const top = Math.max(1, ...counts);
  const pad = { left: 8, right: 8, top: 18, bottom: 34 };
  const slot = (width - pad.left - pad.right) / counts.length;
  const plotHeight = height - pad.top - pad.bottom;
  context.font = "11px system-ui, sans-serif";
  context.textAlign = "center";
  counts.forEach((count, i) => {
    const barHeight = (count / top) * plotHeight;
    const x = pad.left + i * slot;
    context.fillStyle = i === winner ? "#1a7f37" : "#0b5cad";
    context.fillRect(x + slot * 0.15, pad.top + plotHeight - barHeight, slot * 0.7, barHeight);
    context.fillStyle = "#1b1f24";
    context.fillText(String(count), x + slot / 2, pad.top + plotHeight - barHeight - 4);
    context.fillText(String(i), x + slot / 2, height - pad.bottom + 14);
    const name = fitted(context, classes[i], slot - 4);
    if (name) context.fillText(name, x + slot / 2, height - pad.bottom + 28);
  });
  canvas.setAttribute("aria-label", `estimation counts: ${counts.map((c, i) => `${classes[i]} ${c}`).join(", ")}`);
}

// ``text`` shortened with an ellipsis to fit ``width`` pixels; "" when not even one letter fits.
function fitted(context, text, width) {
  if (context.measureText(text).width <= width) return text;
  for (let keep = text.length - 1; keep >= 1; keep--) {
    const short = `${text.slice(0, keep)}…`;
    if (context.measureText(short).width <= width) return short;
  }
  return "";
}

function showRadiusVerdict() {
  const r = Number($("radius-slider").value);
  $("radius-value").textContent = fmt(r, 3);
  const verdict = $("radius-verdict");
  const answer = state.certificate;
  if (!answer) { verdict.textContent = ""; return; }
  const yes = !answer.abstained && answer.radius >= r;
  verdict.className = yes ? "yes" : "no";
  verdict.textContent = yes
    ? `Yes: the certificate above (radius ${fmt(answer.radius, 4)}) covers r = ${fmt(r, 3)}.`
    : `Not by the certificate above (radius ${fmt(answer.radius, 4)}); the radius test may still decide it.`;
}

async function radiusTest() {
  const file = $("image-file").files[0];
  if (!file) throw new Error("choose an image first");
  const model = selectedModel();
  const r = $("radius-slider").value;
  const body = new FormData();
  body.append("file", file);
  body.append("model", model.id);
  body.append("resize", $("resize").checked ? "true" : "false");
  body.append("mode", "adaptive");
  body.append("radius", r);
  for (const [k, v] of Object.entries(params())) body.append(k, v);
  const answer = await (await api("v1/certify", { method: "POST", body })).json();
  const out = $("radius-test-answer");
  out.className = answer.certified_at_radius ? "yes" : "no";
  out.textContent = `${answer.certified_at_radius ? "Certified" : "Not certified"} at r = ${fmt(r, 3)} after `
    + `${answer.samples} samples of at most ${answer.n0 + answer.n_max} `
    + `(the test can certify up to ${fmt(answer.max_certifiable_radius, 3)}).`;
}

// -- batch jobs -----------------------------------------------------------------------------------

async function startJob() {
  const file = $("job-file").files[0];
  if (!file) throw new Error("choose an archive first");
  const body = new FormData();
  body.append("file", file);
  body.append("model", selectedModel().id);
  for (const [k, v] of Object.entries(params())) body.append(k, v);
  const created = await (await api("v1/jobs", { method: "POST", body })).json();
  watchJob(created.id);
  await listJobs();
}

function watchJob(jobId) {
  clearTimeout(state.pollTimer);
  state.jobId = jobId;
  $("job-view").hidden = false;
  $("job-figure").hidden = true;
  $("job-id").textContent = jobId;
  pollJob();
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "unknown yet";
  if (seconds < 90) return `${Math.round(seconds)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

async function pollJob() {
  const jobId = state.jobId;
  let status;
  try {
    status = await (await api(`v1/jobs/${encodeURIComponent(jobId)}`)).json();
  } catch (e) {
    showMessage(e.message);
    if (!(e instanceof ApiError) || e.status >= 500) state.pollTimer = setTimeout(pollJob, 5 * POLL_MS);
    return;
  }
  if (jobId !== state.jobId) return; // another job was opened meanwhile
  const progress = $("job-progress");
  progress.max = status.total;
  progress.value = status.done;
  const percent = status.total ? Math.round((100 * status.done) / status.total) : 0;
  $("job-state").textContent = status.state + (status.error ? ` (${status.error})` : "");
  let text = `${status.done} / ${status.total} images (${percent} %), ${status.abstentions} abstentions`;
  if (status.state === "queued" || status.state === "running") text += `, about ${duration(status.eta_s)} left`;
  $("job-progress-text").textContent = text;
  const active = status.state === "queued" || status.state === "running";
  $("job-cancel").disabled = !active;
  if (active) {
    state.pollTimer = setTimeout(pollJob, POLL_MS);
  } else {
    await listJobs().catch(() => {});
    if (status.done > 0) await showPlot(jobId);
  }
}

async function showPlot(jobId) {
  const blob = await (await api(`v1/jobs/${encodeURIComponent(jobId)}/plot.png`)).blob();
  if (state.plotUrl) URL.revokeObjectURL(state.plotUrl);
  state.plotUrl = URL.createObjectURL(blob);
  const img = $("job-plot");
  img.alt = `plot of job ${jobId}: certified accuracy against radius, or the histogram of radii without labels`;
  img.src = state.plotUrl;
  $("job-plot-caption").textContent =
    "Drawn by the service with the offline analyze code: certified accuracy against radius when the set had "
    + "labels, otherwise the histogram of certified radii.";
  $("job-figure").hidden = false;
}

async function download(format) {
  const jobId = state.jobId;
  const blob = await (await api(`v1/jobs/${encodeURIComponent(jobId)}/results?format=${format}`)).blob();
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url;
  link.download = `job-${jobId}.${format}`;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

async function cancelJob(jobId) {
  await api(`v1/jobs/${encodeURIComponent(jobId)}`, { method: "DELETE" });
  if (jobId === state.jobId) {
    clearTimeout(state.pollTimer);
    await pollJob();
  }
  await listJobs();
}

async function listJobs() {
  const { jobs } = await (await api("v1/jobs")).json();
  const tbody = $("jobs-table").tBodies[0];
  tbody.replaceChildren(...jobs.map((job) => {
    const row = document.createElement("tr");
    const created = new Date(job.created).toLocaleString([], { dateStyle: "short", timeStyle: "short" });
    for (const text of [created, job.model_id, job.state, `${job.done} / ${job.total}`]) {
      row.insertCell().textContent = text;
    }
    row.cells[1].className = "wide-only"; // the model column gives way at a phone's width
    const actions = row.insertCell();
    const show = document.createElement("button");
    show.type = "button";
    show.textContent = "Show";
    show.setAttribute("aria-label", `show job created ${created}`);
    show.addEventListener("click", () => guarded(show, async () => watchJob(job.id)));
    actions.append(show);
    if (job.state === "queued" || job.state === "running") {
      const cancel = document.createElement("button");
      cancel.type = "button";
      cancel.className = "secondary";
      cancel.textContent = "Cancel";
      cancel.setAttribute("aria-label", `cancel job created ${created}`);
      cancel.addEventListener("click", () => guarded(cancel, () => cancelJob(job.id)));
      actions.append(cancel);
    }
    return row;
  }));
}

// -- wiring ---------------------------------------------------------------------------------------

function dropTarget(zone, input, onFile) {
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer.files.length) {
      input.files = e.dataTransfer.files;
      onFile();
    }
  });
}

async function refreshAll() {
  await loadModels();
  await listJobs();
}

function start() {
  $("api-key").value = sessionStorage.getItem(KEY_STORAGE) || "";
  $("save-key").addEventListener("click", (e) => {
    const key = $("api-key").value.trim();
    if (key) sessionStorage.setItem(KEY_STORAGE, key); else sessionStorage.removeItem(KEY_STORAGE);
    $("key-state").textContent = key ? "Using the key for this tab." : "No key: requests are sent without one.";
    guarded(e.target, refreshAll);
  });
  $("forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    $("api-key").value = "";
    $("key-state").textContent = "Key forgotten.";
  });
  $("message-close").addEventListener("click", clearMessage);
  $("model").addEventListener("change", showModel);
  for (const name of ["n", "alpha"]) $(name).addEventListener("change", () => guarded(null, loadModels));
  $("settings-form").addEventListener("submit", (e) => e.preventDefault());

  const certifyForm = $("certify-form");
  const submitCertify = () => guarded($("certify-button"), certifyImage);
  certifyForm.addEventListener("submit", (e) => { e.preventDefault(); submitCertify(); });
  $("image-file").addEventListener("change", submitCertify);
  dropTarget($("image-drop"), $("image-file"), submitCertify);
  $("perturb-again").addEventListener("click", drawImages);
  $("radius-slider").addEventListener("input", showRadiusVerdict);
  $("radius-test").addEventListener("click", (e) => guarded(e.target, radiusTest));

  const submitJob = () => guarded($("job-button"), startJob);
  $("job-form").addEventListener("submit", (e) => { e.preventDefault(); submitJob(); });
  $("job-file").addEventListener("change", submitJob);
  dropTarget($("job-drop"), $("job-file"), submitJob);
  $("job-cancel").addEventListener("click", (e) => guarded(e.target, () => cancelJob(state.jobId)));
  $("job-tsv").addEventListener("click", (e) => guarded(e.target, () => download("tsv")));
  $("job-json").addEventListener("click", (e) => guarded(e.target, () => download("json")));
  $("jobs-refresh").addEventListener("click", (e) => guarded(e.target, listJobs));

  guarded(null, refreshAll);
}

document.addEventListener("DOMContentLoaded", start);
