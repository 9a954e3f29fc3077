// The backstream inspector page: a live list (Server-Sent Events), a detail view,
// replay (as it was or edited), HAR and curl export. It only talks to the JSON API
// of the client that served it. Everything shown is set with textContent: a
// relayed request can never inject markup here.
"use strict";

const state = { records: new Map(), keep: 200, selected: null, detail: null };
const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

function size(n) {
  if (n < 1000) return `${n} B`;
  let value = n / 1000;
  for (const unit of ["kB", "MB"]) {
    if (value < 1000) return `${value.toFixed(1)} ${unit}`;
    value /= 1000;
  }
  return `${value.toFixed(1)} GB`;
}

function clock(seconds) {
  const d = new Date(seconds * 1000);
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

function duration(ms) {
  if (ms == null) return "…";
  return ms < 1000 ? `${ms.toFixed(ms < 10 ? 1 : 0)} ms` : `${(ms / 1000).toFixed(2)} s`;
}

async function api(path, options) {
  const response = await fetch(path, options);
  const type = response.headers.get("Content-Type") || "";
  const body = type.startsWith("application/json") ? await response.json() : await response.text();
  if (!response.ok) throw new Error((body && body.error) || `${response.status} ${response.statusText}`);
  return body;
}

// -- the list -----------------------------------------------------------------------

function matches(r) {
  const text = $("filter-text").value.trim().toLowerCase();
  const method = $("filter-method").value;
  const status = $("filter-status").value;
  if (method && r.method !== method) return false;
  if (status && r.class !== status) return false;
  if (text && !`${r.method} ${r.path} ${r.status}`.toLowerCase().includes(text)) return false;
  return true;
}

function row(r) {
  const path = el("td", { class: "path", title: r.path, text: r.path });
  if (r.replay_of != null) path.append(el("span", { class: "badge", text: `replay of #${r.replay_of}` }));
  const status = r.status ? String(r.status) : (r.class === "pending" ? "…" : "failed");
  const tr = el("tr", { "data-id": String(r.id), "data-path": r.path, class: r.replay_of != null ? "replay" : "" },
    el("td", { text: clock(r.time) }),
    el("td", { text: r.method }),
    path,
    el("td", { class: `s${r.class}`, text: status, title: r.error || r.reason || "" }),
    el("td", { class: "num", text: duration(r.duration_ms) }),
    el("td", { class: "num", text: size(r.request_size) }),
    el("td", { class: "num", text: size(r.response_size) }));
  if (r.id === state.selected) tr.classList.add("selected");
  tr.addEventListener("click", () => select(r.id));
  return tr;
}

function render() {
  const ids = [...state.records.keys()].sort((a, b) => b - a);
  for (const id of ids.slice(state.keep)) state.records.delete(id);
  const shown = ids.slice(0, state.keep).map((id) => state.records.get(id)).filter(matches);
  $("requests").tBodies[0].replaceChildren(...shown.map(row));
  $("empty").hidden = state.records.size > 0;
  $("count").textContent = `${shown.length} of ${state.records.size}`;
}

let pending = false;
function renderSoon() {
  if (!pending) {
    pending = true;
    requestAnimationFrame(() => { pending = false; render(); });
  }
}

async function load() {
  const data = await api("/api/requests");
  state.keep = data.keep;
  $("destination").textContent = `→ ${data.destination}${data.unmasked ? " (secrets shown)" : ""}`;
  state.records = new Map(data.requests.map((r) => [r.id, r]));
  render();
}

function connect() {
  const events = new EventSource("/api/events");
  events.addEventListener("open", () => {
    $("live").className = "live on";
    $("live").textContent = "live";
    load().catch(() => {});
  });
  events.addEventListener("error", () => {
    $("live").className = "live off";
    $("live").textContent = "reconnecting";
  });
  events.addEventListener("request", (event) => {
    const r = JSON.parse(event.data);
    state.records.set(r.id, r);
    renderSoon();
    if (r.id === state.selected && r.duration_ms != null && state.detail && state.detail.duration_ms == null) {
      select(r.id);  // it finished while open
    }
  });
}

// -- the detail view ----------------------------------------------------------------

function headersTable(headers) {
  return el("table", { class: "headers" },
    ...headers.map(([name, value]) => el("tr", {}, el("td", { text: name }), el("td", { text: value }))));
}

function bodyView(body) {
  const box = el("div", { class: "body" });
  if (body.kind === "empty") {
    box.append(el("p", { class: "note", text: "no body" }));
    return box;
  }
  const notes = [`${body.content_type || "no Content-Type"}, ${size(body.size)}`];
  if (body.decoded) notes.push(`shown decoded (${body.decoded})`);
  if (body.truncated) notes.push(`only the first ${size(body.kept)} of ${size(body.size)} were kept`);
  box.append(el("p", { class: "note", text: notes.join(" · ") }));
  if (body.kind === "image") box.append(el("img", { class: "body", src: body.url, alt: "image body" }));
  else if (body.kind === "json") box.append(el("pre", { class: "json", text: body.pretty }));
  else if (body.kind === "form") {
    box.append(el("table", { class: "headers form" },
      ...body.form.map(([k, v]) => el("tr", {}, el("td", { text: k }), el("td", { text: v })))));
  } else if (body.kind === "text") box.append(el("pre", { class: "text", text: body.text }));
  else {
    box.append(el("pre", { class: "hex", text: body.hex }));
    if (body.size > 1024) box.append(el("p", { class: "note", text: "hex preview of the first 1 kB" }));
  }
  return box;
}

function exchange(d, title) {
  const req = d.request;
  const resp = d.response;
  const column = el("div", {});
  if (title) column.append(el("h2", { text: title }));
  column.append(el("h2", { text: "Request" }),
    el("div", { class: "start-line", text: `${req.method} ${req.target} ${req.http_version}` }),
    headersTable(req.headers), bodyView(req.body),
    el("h2", { text: "Response" }));
  const line = d.status ? `${resp.http_version} ${resp.status} ${resp.reason}`
    : (d.error ? `no response: ${d.error}` : "waiting for the response…");
  column.append(el("div", { class: `start-line status-line s${d.class}`, text: line }),
    el("p", { class: "note", text: `${duration(d.duration_ms)}${d.wait_ms != null ? `, first byte after ${duration(d.wait_ms)}` : ""}` }),
    headersTable(resp.headers), bodyView(resp.body));
  return column;
}

async function select(id) {
  state.selected = id;
  for (const tr of $("requests").tBodies[0].rows) tr.classList.toggle("selected", tr.dataset.id === String(id));
  let d;
  try {
    d = await api(`/api/requests/${id}`);
  } catch (e) {
    $("detail-note").textContent = String(e.message || e);
    return;
  }
  if (state.selected !== id) return;
  const changed = !state.detail || state.detail.id !== id;
  state.detail = d;
  $("detail").hidden = false;
  $("detail-title").textContent = `#${d.id} ${d.method} ${d.path}`;
  $("detail-note").textContent = d.replay_of != null ? `a replay of request #${d.replay_of}` : "";
  $("export-har").href = `/api/requests/${id}/har`;
  $("export-har").setAttribute("download", `backstream-${id}.har`);
  $("original").replaceChildren(exchange(d, "Original"));
  if (changed) {
    $("replay-result").hidden = true;
    $("curl").hidden = true;
    $("editor").hidden = true;
  }
}

// -- replay and export --------------------------------------------------------------

async function replay(edits) {
  const id = state.selected;
  const box = $("replay-result");
  box.hidden = false;
  box.replaceChildren(el("p", { class: "note", text: "replaying…" }));
  try {
    const d = await api(`/api/requests/${id}/replay`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(edits),
    });
    box.replaceChildren(exchange(d, `Replay #${d.id}`));
  } catch (e) {
    box.replaceChildren(el("p", { class: "note sfailed", text: `replay failed: ${e.message || e}` }));
  }
}

function openEditor() {
  const d = state.detail;
  const body = d.request.body;
  $("edit-method").value = d.request.method;
  $("edit-path").value = d.request.target;
  $("edit-headers").value = d.request.headers.map(([n, v]) => `${n}: ${v}`).join("\n");
  const editable = body.kind === "empty" || (body.text != null && !body.truncated && !body.decoded);
  $("edit-body").value = editable ? (body.text || "") : "";
  $("edit-body-note").textContent = editable ? "" : "(binary or cut: sent as captured unless you replace it)";
  $("edit-body").dataset.original = $("edit-body").value;
  $("edit-headers").dataset.original = $("edit-headers").value;
  $("editor").hidden = false;
  $("edit-path").focus();
}

function editedRequest() {
  const edits = { method: $("edit-method").value.trim(), path: $("edit-path").value.trim() };
  const headers = $("edit-headers");
  if (headers.value !== headers.dataset.original) {
    edits.headers = headers.value.split("\n").filter((line) => line.trim()).map((line) => {
      const at = line.indexOf(":");
      return at < 0 ? [line.trim(), ""] : [line.slice(0, at).trim(), line.slice(at + 1).trim()];
    });
  }
  const body = $("edit-body");
  if (body.value !== body.dataset.original) edits.body = body.value;
  return edits;
}

async function showCurl() {
  const box = $("curl");
  box.textContent = await api(`/api/requests/${state.selected}/curl`);
  box.hidden = false;
  try { await navigator.clipboard.writeText(box.textContent); } catch (e) { /* not on http */ }
}

document.addEventListener("DOMContentLoaded", () => {
  for (const id of ["filter-text", "filter-method", "filter-status"]) $(id).addEventListener("input", render);
  $("replay").addEventListener("click", () => replay({}));
  $("edit").addEventListener("click", openEditor);
  $("edit-cancel").addEventListener("click", () => { $("editor").hidden = true; });
  $("editor").addEventListener("submit", (event) => { event.preventDefault(); replay(editedRequest()); });
  $("export-curl").addEventListener("click", () => showCurl().catch((e) => { $("detail-note").textContent = e.message; }));
  load().catch((e) => { $("empty").textContent = `cannot load: ${e.message}`; });
  connect();
});
