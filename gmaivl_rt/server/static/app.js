// The gmaivl-rt page: pick a file, see what the model sees (rendered by the server), ask, watch the answer stream.
// Plain browser JavaScript, no build step; it talks only to the server that served it.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { dataUri: null, meta: null, model: null, archive: null };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "muted";
}

async function errorText(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || response.statusText;
  } catch (e) {
    return response.status + " " + response.statusText;
  }
}

// The browser may not know DICOM / NIfTI types; the server sniffs the bytes, so octet-stream is fine.
function readAsDataUri(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => {
      const text = String(reader.result);
      const payload = text.slice(text.indexOf("base64,") + 7);
      resolve("data:" + (file.type || "application/octet-stream") + ";base64," + payload);
    };
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// The image part as the chat request and the preview both send it, with the chosen frame / slice and window.
function imageUrl(withIndex) {
  const part = { url: state.dataUri };
  const meta = state.meta;
  if (withIndex && meta) {
    const index = Number($("index").value);
    if (meta.format === "nifti") part.slice_index = index; else part.frame = index;
  }
  if (meta && meta.format === "nifti") part.plane = $("plane").value;
  if ($("window").value) part.window = $("window").value;
  return part;
}

function showMeta(meta) {
  const rows = [
    ["Format", meta.format], ["Modality", meta.modality && meta.modality_name !== meta.modality ? meta.modality_name + " (" + meta.modality + ")" : meta.modality],
    ["Body part", meta.body_part], ["Size", meta.width + " × " + meta.height + " px"],
    [meta.format === "nifti" ? "Slices" : "Frames", meta.count], ["Plane", meta.orientation],
    ["Pixel spacing", meta.pixel_spacing ? meta.pixel_spacing.map((v) => v.toFixed(3)).join(" × ") + " mm" : null],
    ["Window", meta.window ? meta.window_name + " (" + meta.window.map((v) => Math.round(v)).join(" / ") + ")" : meta.window_name],
  ];
  const dl = $("meta");
  dl.replaceChildren();
  for (const [name, value] of rows) {
    if (value === null || value === undefined || value === "") continue;
    const dt = document.createElement("dt"); dt.textContent = name;
    const dd = document.createElement("dd"); dd.textContent = String(value);
    dl.append(dt, dd);
  }
}

async function refreshPreview(withIndex) {
  setStatus("Rendering…");
  const response = await fetch("/v1/gmaivl/preview", {
    method: "POST", headers: headers(), body: JSON.stringify({ image_url: imageUrl(withIndex) }),
  });
  if (!response.ok) {
    setStatus(await errorText(response), true);
    $("ask").disabled = true;
    return;
  }
  const body = await response.json();
  state.meta = body.metadata;
  const meta = body.metadata;
  $("preview").src = body.image;
  $("preview").hidden = false;
  $("preview-caption").textContent = "As the model sees it: " + meta.width + " × " + meta.height + " px";
  $("controls").hidden = false;
  $("index-row").hidden = meta.count <= 1;
  $("index-label").textContent = meta.format === "nifti" ? "Slice" : "Frame";
  $("index").max = String(meta.count - 1);
  $("index").value = String(meta.index);
  $("index-value").textContent = (meta.index + 1) + " / " + meta.count;
  $("plane-row").hidden = meta.format !== "nifti";
  $("window-row").hidden = !(meta.modality === "CT" || meta.format === "nifti");
  showMeta(meta);
  setStatus("Ready.");
  $("ask").disabled = false;
}

async function chooseFile(file) {
  if (!file) return;
  state.archive = null;
  state.dataUri = await readAsDataUri(file);
  state.meta = null;
  $("window").value = "";
  await refreshPreview(false);
}

// "structured": the answer is decoded under the radiology findings schema (the server's copy of
// examples/findings.schema.json) and shown as a table, one row per field (nested fields as "lesion.size_mm").
let findingsSchema = null;
async function structuredFormat() {
  if (findingsSchema === null) {
    const response = await fetch("/static/findings.schema.json");
    if (!response.ok) throw new Error("the findings schema could not be loaded");
    findingsSchema = await response.json();
  }
  return { type: "json_schema", json_schema: { name: "finding", schema: findingsSchema, strict: true } };
}

function flatten(value, prefix, rows) {
  if (value !== null && typeof value === "object" && !Array.isArray(value)) {
    for (const [key, inner] of Object.entries(value)) flatten(inner, prefix ? prefix + "." + key : key, rows);
  } else {
    rows.push([prefix, typeof value === "string" ? value : JSON.stringify(value)]);
  }
  return rows;
}

function showFinding(text, finishReason) {
  const table = $("finding"), body = table.querySelector("tbody");
  body.textContent = "";
  let finding;
  try {
    finding = JSON.parse(text);
  } catch (e) {
    table.hidden = true;
    return finishReason === "length" ? "The answer was cut at max tokens before its JSON was complete." :
      "The answer is not JSON.";
  }
  for (const [field, value] of flatten(finding, "", [])) {
    const row = body.insertRow();
    row.insertCell().textContent = field;
    row.insertCell().textContent = value;
  }
  table.hidden = false;
  return null;
}

async function ask() {
  if (state.archive) return askArchive();
  $("ask").disabled = true;
  $("finding").hidden = true;
  $("answer").textContent = "";
  $("answer").dataset.done = "false";
  $("latency").textContent = "";
  setStatus("Asking…");
  const request = {
    messages: [{ role: "user", content: [
      { type: "image_url", image_url: imageUrl(true) },
      { type: "text", text: $("question").value },
    ] }],
    max_tokens: Number($("max-tokens").value),
    stream: true, stream_options: { include_usage: true },
  };
  if (state.model) request.model = state.model;
  const structured = $("structured").checked;
  const start = performance.now();
  let firstToken = null, usage = null, failed = false, finishReason = null;
  try {
    if (structured) request.response_format = await structuredFormat();
    const response = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(request) });
    if (!response.ok) throw new Error(await errorText(response));
    await readChunks(response, (chunk) => {
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        if (choice.finish_reason) finishReason = choice.finish_reason;
        const text = choice.delta && choice.delta.content;
        if (text) {
          if (firstToken === null) firstToken = performance.now();
          $("answer").textContent += text;
        }
      }
    });
    const problem = structured ? showFinding($("answer").textContent, finishReason) : null;
    setStatus(problem || "Done.", problem !== null);
  } catch (error) {
    failed = true;
    setStatus(String(error.message || error), true);
  }
  const total = (performance.now() - start) / 1000;
  const parts = [];
  if (firstToken !== null) parts.push("first token " + ((firstToken - start) / 1000).toFixed(2) + " s");
  parts.push("total " + total.toFixed(2) + " s");
  if (usage) parts.push(usage.completion_tokens + " tokens");
  $("latency").textContent = parts.join(" · ");
  $("answer").dataset.done = failed ? "error" : "true";
  $("ask").disabled = false;
}

// A streamed answer's server-sent events: each chunk's JSON to `onChunk` until [DONE]; an error object throws.
async function readChunks(response, onChunk) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end); buffer = buffer.slice(end + 2);
      if (!event.startsWith("data: ")) continue;
      const data = event.slice(6);
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      onChunk(chunk);
    }
  }
}

function init() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => chooseFile(e.target.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); chooseFile(e.dataTransfer.files[0]); });
  $("index").addEventListener("input", () => { $("index-value").textContent = (Number($("index").value) + 1) + " / " + (state.meta ? state.meta.count : 1); });
  $("index").addEventListener("change", () => refreshPreview(true));
  $("plane").addEventListener("change", () => refreshPreview(false));
  $("window").addEventListener("change", () => refreshPreview(true));
  $("ask").addEventListener("click", ask);
  $("api-key").addEventListener("change", checkKey);
  checkKey();
}

// Ask for the key before anything needs it: /v1/models answers 401 on a server started with a key; the field then
// shows, and the page tries again (and shows the model name) once a key is typed.
async function checkKey() {
  let response;
  try {
    response = await fetch("/v1/models", { headers: headers() });
  } catch (e) {
    return;
  }
  const keyRow = $("key-row"), keyStatus = $("key-status");
  if (response.status === 401) {
    const typed = $("api-key").value.trim() !== "";
    keyRow.hidden = false;
    keyStatus.textContent = typed ? "This key is not accepted." : "This server needs an API key: enter it first.";
    keyStatus.className = "error";
    $("file").disabled = true;
    $("api-key").focus();
    return;
  }
  keyStatus.textContent = "";
  $("file").disabled = false;
  const body = response.ok ? await response.json() : null;
  if (body && body.data && body.data.length) { state.model = body.data[0].id; $("model").textContent = "model: " + state.model; }
  if (response.ok) loadStudies();
}

init();

// The archive (`gmaivl-rt serve --dicomweb`): the studies list (dates, modality codes and counts only: no patient
// value is sent to the page), a study's series, the chosen series' picture as the model sees it (the server renders
// it as it renders uploads), and asking about it (streamed, optionally written back to the study as a Structured
// Report). UIDs travel in request bodies, never in URLs.
function cell(row, text) { row.insertCell().textContent = text === null || text === undefined ? "" : String(text); }

function chooseButton(row, label, onClick) {
  const button = document.createElement("button");
  button.type = "button"; button.textContent = label; button.addEventListener("click", onClick);
  row.insertCell().append(button);
}

async function loadStudies() {
  const response = await fetch("/v1/gmaivl/archive/studies?limit=100", { headers: headers() });
  if (response.status === 404) return;  // this server has no archive
  $("archive").hidden = false;
  if (!response.ok) { $("archive-status").textContent = await errorText(response); return; }
  const body = await response.json();
  const rows = $("studies").querySelector("tbody");
  rows.replaceChildren();
  for (const study of body.data) {
    const row = rows.insertRow();
    row.dataset.study = study.study;
    cell(row, study.date); cell(row, study.modalities.join(", ")); cell(row, study.series); cell(row, study.instances);
    chooseButton(row, "Series", () => loadSeries(study));
  }
  $("archive-status").textContent = body.data.length ? "" : "The archive holds no studies.";
}

async function loadSeries(study) {
  const response = await fetch("/v1/gmaivl/archive/series", { method: "POST", headers: headers(),
    body: JSON.stringify({ study: study.study }) });
  if (!response.ok) { $("archive-status").textContent = await errorText(response); return; }
  const rows = $("series").querySelector("tbody");
  rows.replaceChildren();
  for (const series of (await response.json()).data) {
    const row = rows.insertRow();
    row.dataset.series = series.series;
    cell(row, series.number); cell(row, series.modality); cell(row, series.instances);
    chooseButton(row, "Choose", async () => {
      state.archive = { study: study.study, series: series.series };
      $("archive-status").textContent = "Chosen: " + [study.date, series.modality, "series " + series.number,
        series.instances + " instances"].filter(Boolean).join(" · ") + ". Ask about it.";
      $("ask").disabled = false;
      await previewArchive();
    });
  }
  $("series").hidden = false;
}

async function previewArchive() {
  const chosen = state.archive;
  const response = await fetch("/v1/gmaivl/archive/preview", { method: "POST", headers: headers(),
    body: JSON.stringify({ dicomweb: chosen }) });
  if (state.archive !== chosen) return;  // another choice was made meanwhile
  if (!response.ok) { $("archive-status").textContent = await errorText(response); return; }
  const body = await response.json();
  $("preview").src = body.image;
  $("preview").hidden = false;
  $("preview-caption").textContent = "As the model sees it (archive): " + body.metadata.width + " × " +
    body.metadata.height + " px";
  $("controls").hidden = true;
  showMeta(body.metadata);
}

async function askArchive() {
  $("ask").disabled = true;
  $("answer").textContent = ""; $("answer").dataset.done = "false"; $("report").textContent = "";
  $("latency").textContent = "";
  setStatus("Asking (archive)…");
  const request = { messages: [{ role: "user", content: $("question").value }], max_tokens: Number($("max-tokens").value),
    dicomweb: state.archive, write_sr: $("write-sr").checked,
    stream: true, stream_options: { include_usage: true } };
  if (state.model) request.model = state.model;
  const start = performance.now();
  let failed = false, usage = null, finishReason = null;
  try {
    if ($("structured").checked) request.response_format = await structuredFormat();
    const response = await fetch("/v1/gmaivl/archive/chat/completions", { method: "POST", headers: headers(),
      body: JSON.stringify(request) });
    if (!response.ok) throw new Error(await errorText(response));
    await readChunks(response, (chunk) => {
      if (chunk.usage) usage = chunk.usage;
      if (chunk.report) $("report").textContent = "Structured report stored in the study (SOP Instance UID " +
        chunk.report.sop_instance_uid + "), unverified.";
      for (const choice of chunk.choices || []) {
        if (choice.finish_reason) finishReason = choice.finish_reason;
        if (choice.delta && choice.delta.content) $("answer").textContent += choice.delta.content;
      }
    });
    const problem = $("structured").checked ? showFinding($("answer").textContent, finishReason) : null;
    setStatus(problem || "Done.", problem !== null);
    $("latency").textContent = "total " + ((performance.now() - start) / 1000).toFixed(2) + " s" +
      (usage ? " · " + usage.completion_tokens + " tokens" : "");
  } catch (error) {
    failed = true;
    setStatus(String(error.message || error), true);
  }
  $("answer").dataset.done = failed ? "error" : "true";
  $("ask").disabled = false;
}
