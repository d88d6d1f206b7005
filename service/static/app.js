// The compress dashboard: plain JavaScript against the REST API (no build step).
"use strict";

const $ = (sel) => document.querySelector(sel);
const FINISHED = ["succeeded", "gate_failed", "failed", "cancelled"];
const state = { token: "", selected: null, logOffset: 0, reportShown: null, recipes: [] };

// ------------------------------------------------------------------ API access

function loadToken() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    localStorage.setItem("compress-token", decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname);  // keep the token out of the address bar
  }
  state.token = localStorage.getItem("compress-token") || "";
  $("#token").value = state.token;
}

async function api(path, options = {}) {
  const headers = Object.assign({ Authorization: `Bearer ${state.token}` }, options.headers || {});
  const resp = await fetch(path, Object.assign({}, options, { headers }));
  if (!resp.ok) {
    let body = {};
    try { body = await resp.json(); } catch (e) { /* not JSON */ }
    const err = new Error((body.error && body.error.message) || `HTTP ${resp.status}`);
    err.status = resp.status;
    err.errors = (body.error && body.error.errors) || [];
    throw err;
  }
  return resp;
}

function showErrors(list, err) {
  list.replaceChildren();
  const items = err.errors && err.errors.length ? err.errors.map((e) => `${e.loc}: ${e.msg}`)
    : [err.message];
  for (const text of items) {
    const li = document.createElement("li");
    li.textContent = text;
    list.appendChild(li);
  }
}

// --------------------------------------------------------------------- recipes

async function loadRecipes() {
  const select = $("#recipe-select");
  try {
    state.recipes = await (await api("/v1/recipes")).json();
  } catch (e) {
    $("#recipe-status").textContent = e.status === 401 ? "Enter your API token above." : e.message;
    return;
  }
  select.querySelectorAll("option[data-bundled]").forEach((o) => o.remove());
  for (const r of state.recipes) {
    const opt = document.createElement("option");
    opt.value = r.name;
    opt.dataset.bundled = "1";
    opt.textContent = `${r.name} — ${r.description || r.title}`;
    select.appendChild(opt);
  }
}

function chosenUploads() {
  const uploads = [];
  if ($("#model-file").files.length) uploads.push("model");
  if ($("#calib-file").files.length) uploads.push("calib");
  if ($("#eval-file").files.length) uploads.push("eval");
  return uploads;
}

let validateTimer = null;
function scheduleValidate() {
  clearTimeout(validateTimer);
  validateTimer = setTimeout(validateRecipe, 300);
}

async function validateRecipe() {
  const yaml = $("#recipe-yaml").value;
  const status = $("#recipe-status");
  const list = $("#recipe-errors");
  if (!yaml.trim()) {
    status.textContent = "";
    list.replaceChildren();
    return;
  }
  try {
    const body = JSON.stringify({ yaml, uploads: chosenUploads() });
    const res = await (await api("/v1/recipes/validate", {
      method: "POST", body, headers: { "Content-Type": "application/json" } })).json();
    list.replaceChildren();
    status.className = "status ok";
    status.textContent = `valid: ${res.model_source} model, passes: ${res.passes.join(", ") || "none"}`;
    $("#recipe-yaml").classList.remove("invalid");
  } catch (e) {
    status.className = "status bad";
    status.textContent = "recipe has problems:";
    $("#recipe-yaml").classList.add("invalid");
    showErrors(list, e);
  }
}

// ---------------------------------------------------------------------- submit

function submitJob(event) {
  event.preventDefault();
  const form = new FormData();
  form.append("recipe", $("#recipe-yaml").value);
  for (const [field, input] of [["model", "#model-file"], ["calib", "#calib-file"],
                                ["eval", "#eval-file"]]) {
    const files = $(input).files;
    if (files.length) form.append(field, files[0], files[0].name);
  }
  const bar = $("#upload-progress");
  const errors = $("#submit-errors");
  errors.replaceChildren();
  bar.hidden = false;
  bar.value = 0;
  $("#submit").disabled = true;
  // XMLHttpRequest rather than fetch: it reports upload progress.
  const xhr = new XMLHttpRequest();
  xhr.open("POST", "/v1/jobs");
  xhr.setRequestHeader("Authorization", `Bearer ${state.token}`);
  xhr.upload.onprogress = (e) => { if (e.lengthComputable) bar.value = e.loaded / e.total; };
  xhr.onload = () => {
    $("#submit").disabled = false;
    bar.hidden = true;
    let body = {};
    try { body = JSON.parse(xhr.responseText); } catch (e) { /* not JSON */ }
    if (xhr.status === 202) {
      selectJob(body.id);
      refreshJobs();
    } else {
      const err = new Error((body.error && body.error.message) || `HTTP ${xhr.status}`);
      err.errors = (body.error && body.error.errors) || [];
      showErrors(errors, err);
    }
  };
  xhr.onerror = () => {
    $("#submit").disabled = false;
    bar.hidden = true;
    showErrors(errors, new Error("upload failed: the service did not answer"));
  };
  xhr.send(form);
}

// ------------------------------------------------------------------------ jobs

function fmtEta(s) {
  if (s === null || s === undefined) return "";
  return s < 90 ? `${Math.round(s)} s` : `${Math.round(s / 60)} min`;
}

async function refreshJobs() {
  if (!state.token) return;
  let page;
  try {
    page = await (await api("/v1/jobs?limit=100")).json();
  } catch (e) {
    return;
  }
  const body = $("#jobs tbody");
  body.replaceChildren();
  $("#jobs-empty").hidden = page.jobs.length > 0;
  $("#jobs-count").textContent = page.total ? `(${page.total})` : "";
  for (const job of page.jobs) {
    const tr = document.createElement("tr");
    tr.dataset.jobId = job.id;
    tr.className = job.id === state.selected ? "selected" : "";
    tr.innerHTML = `<td><a href="#"></a><div class="sub mono"></div></td>
      <td><span class="badge ${job.state}">${job.state}</span></td>
      <td><progress max="100"></progress> <span class="pct"></span></td>
      <td class="eta"></td><td class="sub"></td>`;
    tr.querySelector("a").textContent = job.name;
    tr.querySelector("a").onclick = (e) => { e.preventDefault(); selectJob(job.id); };
    tr.querySelector("div").textContent = job.id.slice(0, 12);
    tr.querySelector("progress").value = job.percent;
    tr.querySelector(".pct").textContent = `${job.percent.toFixed(0)}% ${job.state === "running" ? job.stage : ""}`;
    tr.querySelector(".eta").textContent = job.state === "running" ? fmtEta(job.eta_seconds) : "";
    tr.lastElementChild.textContent = new Date(job.created_at).toLocaleString();
    body.appendChild(tr);
  }
}

function selectJob(id) {
  state.selected = id;
  state.logOffset = 0;
  state.reportShown = null;
  $("#job-log").textContent = "";
  $("#report").hidden = true;
  $("#detail-artifacts").hidden = true;
  $("#job-detail").hidden = false;
  refreshDetail();
  document.querySelectorAll("#jobs tbody tr").forEach(
    (tr) => tr.classList.toggle("selected", tr.dataset.jobId === id));
}

async function refreshDetail() {
  const id = state.selected;
  if (!id) return;
  let job;
  try {
    job = await (await api(`/v1/jobs/${id}`)).json();
  } catch (e) {
    if (e.status === 404) $("#job-detail").hidden = true;
    return;
  }
  if (id !== state.selected) return;
  $("#detail-id").textContent = job.id;
  const badge = $("#detail-state");
  badge.textContent = job.state === "running" ? `running ${job.percent.toFixed(0)}%` : job.state;
  badge.className = `badge ${job.state}`;
  $("#detail-message").textContent = job.message + (job.state === "running" && job.eta_seconds
    ? ` — about ${fmtEta(job.eta_seconds)} left` : "");
  const err = $("#detail-error");
  err.hidden = !job.error;
  err.textContent = job.error ? `${job.error.type}: ${job.error.message}` : "";
  $("#cancel-job").disabled = FINISHED.includes(job.state);
  $("#delete-job").disabled = !FINISHED.includes(job.state);
  try {
    const resp = await api(`/v1/jobs/${id}/log?offset=${state.logOffset}`);
    const text = await resp.text();
    state.logOffset = Number(resp.headers.get("X-Next-Offset")) || state.logOffset + text.length;
    if (text) {
      const log = $("#job-log");
      log.textContent += text;
      log.scrollTop = log.scrollHeight;
    }
  } catch (e) { /* the log appears once the job starts */ }
  if (job.links.report_html && state.reportShown !== id) {
    state.reportShown = id;
    await showReport(job);
  }
}

async function showReport(job) {
  const [html, arts] = await Promise.all([
    api(job.links.report_html).then((r) => r.text()),
    api(job.links.artifacts).then((r) => r.json()),
  ]);
  $("#report-frame").srcdoc = html;
  $("#report").hidden = false;
  const list = $("#artifact-list");
  list.replaceChildren();
  for (const a of arts.artifacts) {
    const li = document.createElement("li");
    const link = document.createElement("a");
    link.href = "#";
    link.textContent = a.name;
    link.onclick = (e) => { e.preventDefault(); downloadArtifact(a); };
    li.append(link, ` ${(a.bytes / 1e6).toFixed(2)} MB `);
    const sum = document.createElement("span");
    sum.className = "sub mono";
    sum.textContent = `sha256 ${a.sha256.slice(0, 16)}…`;
    li.appendChild(sum);
    list.appendChild(li);
  }
  $("#detail-artifacts").hidden = false;
}

async function downloadArtifact(a) {
  // Downloads need the Authorization header, so they go through fetch and a blob URL.
  const blob = await (await api(a.url)).blob();
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url;
  link.download = a.name.split("/").pop();
  document.body.appendChild(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

async function cancelSelected() {
  await api(`/v1/jobs/${state.selected}/cancel`, { method: "POST" }).catch(() => {});
  refreshDetail();
  refreshJobs();
}

async function deleteSelected() {
  await api(`/v1/jobs/${state.selected}`, { method: "DELETE" }).catch(() => {});
  state.selected = null;
  $("#job-detail").hidden = true;
  refreshJobs();
}

// ------------------------------------------------------------------------ wire

function init() {
  loadToken();
  $("#token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.token = $("#token").value.trim();
    localStorage.setItem("compress-token", state.token);
    loadRecipes();
    refreshJobs();
  });
  $("#recipe-select").addEventListener("change", (e) => {
    const r = state.recipes.find((x) => x.name === e.target.value);
    if (r) $("#recipe-yaml").value = r.yaml;
    validateRecipe();
  });
  $("#recipe-yaml").addEventListener("input", scheduleValidate);
  for (const id of ["#model-file", "#calib-file", "#eval-file"]) {
    $(id).addEventListener("change", scheduleValidate);
  }
  $("#new-job").addEventListener("submit", submitJob);
  $("#cancel-job").addEventListener("click", cancelSelected);
  $("#delete-job").addEventListener("click", deleteSelected);
  loadRecipes();
  refreshJobs();
  setInterval(() => { refreshJobs(); refreshDetail(); }, 1000);
}

document.addEventListener("DOMContentLoaded", init);
