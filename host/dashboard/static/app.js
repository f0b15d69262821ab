// sandbus dashboard page. Every value shown comes from the bus (plugin descriptions, errors, log lines and
// audit messages are written by plugin authors and guests): it is only ever put in the page as text
// (textContent, element attributes set one by one), never parsed as HTML.
"use strict";

const MAX_LOG_ROWS = 500;
const MAX_AUDIT_ROWS = 300;
const LEVELS = ["debug", "info", "warning", "error"];
const TRACE = /^[0-9a-f]{32}$/;

const state = {
  info: {}, nodes: [], deploys: {}, audit: [], logs: [], plugins: new Set(),
  debug: null, // {node, plugin}
  pluginTotal: 0,
  token: null,
};

const $ = (id) => document.getElementById(id);

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function cell(tr, text, cls) { const td = el("td", text, cls); tr.appendChild(td); return td; }

function num(v, digits) {
  if (v === null || v === undefined) return "–";
  return digits === undefined ? String(v) : Number(v).toFixed(digits);
}

function bytes(v) {
  if (v === null || v === undefined) return "–";
  if (v >= 1 << 20) return (v / (1 << 20)).toFixed(1) + " MiB";
  if (v >= 1 << 10) return (v / (1 << 10)).toFixed(0) + " KiB";
  return v + " B";
}

function timeOf(epochSeconds) {
  const d = new Date(epochSeconds * 1000);
  return isNaN(d) ? "" : d.toISOString().replace("T", " ").replace("Z", "");
}

function traceCell(tr, id) {
  const td = cell(tr, "");
  if (typeof id !== "string" || !TRACE.test(id)) return td;
  const base = state.info.jaeger_url;
  if (typeof base === "string" && /^https?:\/\//.test(base)) {
    const a = el("a", id.slice(0, 12) + "…");
    a.href = base + "/trace/" + id;
    a.target = "_blank";
    a.rel = "noopener noreferrer";
    a.title = id;
    a.className = "trace";
    td.appendChild(a);
  } else {
    td.textContent = id;
    td.className = "trace";
  }
  return td;
}

// -- nodes and plugins ---------------------------------------------------------------------------------------

function controlAllowed() { return state.info.control === true && !!state.token; }

function renderNodes() {
  const rows = $("node-rows");
  rows.replaceChildren();
  let pluginCount = 0;
  for (const n of state.nodes) {
    const tr = el("tr");
    tr.dataset.node = n.node_id;
    cell(tr, n.node_id);
    cell(tr, n.version);
    cell(tr, n.plugins.length, "num");
    cell(tr, n.reachable ? "yes" : "no (not answering)", n.reachable ? "" : "unreachable");
    cell(tr, n.durable_topics ? "JetStream" : "core NATS");
    cell(tr, num(n.spans_dropped), "num");
    rows.appendChild(tr);
    pluginCount += n.plugins.length;
  }
  $("node-count").textContent = state.nodes.length + (state.nodes.length === 1 ? " node" : " nodes");
  renderPlugins(pluginCount);
}

function renderPlugins(total) {
  const rows = $("plugin-rows");
  const filter = $("plugin-filter").value.trim().toLowerCase();
  const control = controlAllowed();
  $("actions-head").hidden = !control;
  rows.replaceChildren();
  for (const n of state.nodes) {
    for (const p of n.plugins) {
      if (!state.plugins.has(p.name)) addPluginOption(p.name);
      if (filter && !p.name.toLowerCase().includes(filter)) continue;
      const tr = el("tr");
      tr.dataset.node = n.node_id;
      tr.dataset.plugin = p.name;
      if (state.debug && state.debug.node === n.node_id && state.debug.plugin === p.name) tr.className = "open";
      cell(tr, n.node_id);
      cell(tr, p.name, "name");
      cell(tr, p.version);
      cell(tr, p.status, "status status-" + p.status);
      cell(tr, num(p.executions), "num executions");
      cell(tr, num(p.errors), "num errors");
      cell(tr, num(p.rejected), "num rejected");
      cell(tr, num(p.p50_ms, 2), "num p50");
      cell(tr, num(p.p99_ms, 2), "num p99");
      cell(tr, num(p.in_flight), "num");
      cell(tr, num(p.queue_depth), "num");
      cell(tr, num(p.instances), "num");
      cell(tr, bytes(p.memory_bytes), "num");
      cell(tr, p.description, "text description");
      cell(tr, p.last_error ? (p.last_error_code ? p.last_error_code + ": " : "") + p.last_error : "",
           "text error last-error");
      if (control) {
        const td = cell(tr, "");
        for (const verb of ["reload", "unload"]) {
          const b = el("button", verb, verb);
          b.type = "button";
          b.addEventListener("click", (ev) => {
            ev.stopPropagation();
            if (verb === "unload" && !window.confirm("Unload " + p.name + " from " + n.node_id + "?")) return;
            control_(verb, n.node_id, p.name);
          });
          td.appendChild(b);
        }
      }
      tr.addEventListener("click", () => openDebug(n.node_id, p.name));
      rows.appendChild(tr);
    }
  }
  if (total !== undefined) state.pluginTotal = total;
  $("plugin-count").textContent = (state.pluginTotal || 0) + " on all nodes";
}

function addPluginOption(name) {
  state.plugins.add(name);
  const select = $("log-plugin");
  if (select.options.length > 1025) return;
  const o = el("option", name);
  o.value = name;
  select.appendChild(o);
}

async function control_(verb, node, plugin) {
  const msg = $("control-message");
  msg.textContent = verb + " " + plugin + " on " + node + "…";
  try {
    const r = await fetch("/api/control", {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-Sandbus-Token": state.token },
      body: JSON.stringify({ verb: verb, node: node, plugin: plugin }),
    });
    const body = await r.json();
    msg.textContent = r.ok ? verb + " of " + plugin + " on " + node + ": done"
                           : verb + " of " + plugin + " on " + node + " refused: " + (body.error && body.error.message);
    msg.className = r.ok ? "muted ok" : "error";
  } catch (e) {
    msg.textContent = verb + " failed: " + e;
    msg.className = "error";
  }
}

// -- debug view ----------------------------------------------------------------------------------------------

let debugTimer = null;

function openDebug(node, plugin) {
  state.debug = { node: node, plugin: plugin };
  $("debug-section").hidden = false;
  $("debug-title").textContent = plugin + " on " + node;
  for (const tr of $("plugin-rows").children) {
    tr.className = (tr.dataset.node === node && tr.dataset.plugin === plugin) ? "open" : "";
  }
  loadDebug();
  if (debugTimer) clearInterval(debugTimer);
  debugTimer = setInterval(loadDebug, Math.max(1000, (state.info.interval || 2) * 1000));
}

function closeDebug() {
  state.debug = null;
  if (debugTimer) clearInterval(debugTimer);
  debugTimer = null;
  $("debug-section").hidden = true;
  for (const tr of $("plugin-rows").children) tr.className = "";
}

async function loadDebug() {
  const want = state.debug;
  if (!want) return;
  const q = new URLSearchParams({ node: want.node, plugin: want.plugin });
  let body;
  try {
    const r = await fetch("/api/debug?" + q.toString(),
                          { credentials: "same-origin", headers: { "X-Sandbus-Dashboard": "1" } });
    body = await r.json();
    if (!r.ok) throw new Error((body.error && body.error.message) || ("HTTP " + r.status));
  } catch (e) {
    if (state.debug === want) $("debug-error").textContent = "debug state not available: " + e.message;
    return;
  }
  if (state.debug !== want) return;
  $("debug-error").textContent = "";
  renderDebug(body);
}

function fact(value) {
  if (typeof value === "object" && value !== null) return JSON.stringify(value);
  if (typeof value === "number" && !Number.isInteger(value)) return value.toFixed(3);
  return num(value);
}

function factRow(tbody, key, value) {
  const tr = el("tr");
  tr.appendChild(el("th", key));
  const td = cell(tr, fact(value), "text");
  td.dataset.key = key;
  tbody.appendChild(tr);
}

const DEBUG_LOG_ROWS = 10;

function renderDebug(d) {
  const facts = $("debug-facts").querySelector("tbody");
  facts.replaceChildren();
  for (const key of ["status", "version", "kind", "isolation", "sha256", "last_loaded", "reloads", "in_flight",
                     "queue_depth"]) factRow(facts, key, d[key]);
  const counters = d.counters || {};
  for (const key of Object.keys(counters)) factRow(facts, key, counters[key]);
  const limits = d.limits || {};
  const box = $("debug-limits");
  box.replaceChildren();
  for (const key of Object.keys(limits)) factRow(box, key, limits[key]);
  histogram($("debug-latency"), d.latency_ms);
  histogram($("debug-fuel"), d.fuel);
  const inst = $("debug-instances").querySelector("tbody");
  inst.replaceChildren();
  for (const i of (Array.isArray(d.instances) ? d.instances : [])) {
    const tr = el("tr");
    cell(tr, num(i.id), "num"); cell(tr, bytes(i.memory_bytes), "num"); cell(tr, i.busy ? "busy" : "idle");
    cell(tr, num(i.calls), "num");
    inst.appendChild(tr);
  }
  const errs = $("debug-errors").querySelector("tbody");
  errs.replaceChildren();
  for (const e of (Array.isArray(d.recent_errors) ? d.recent_errors : []).slice().reverse()) {
    const tr = el("tr");
    cell(tr, e.at); cell(tr, e.code, "error"); cell(tr, e.function); cell(tr, e.message, "text");
    errs.appendChild(tr);
  }
  const logs = $("debug-logs").querySelector("tbody");
  logs.replaceChildren();
  for (const l of (Array.isArray(d.recent_logs) ? d.recent_logs : []).slice(-DEBUG_LOG_ROWS).reverse()) {
    const tr = el("tr");
    cell(tr, l.ts); cell(tr, l.level, "level-" + l.level); cell(tr, l.message, "text");
    logs.appendChild(tr);
  }
  const audit = $("debug-audit").querySelector("tbody");
  audit.replaceChildren();
  for (const a of (Array.isArray(d.recent_audit) ? d.recent_audit : []).slice().reverse()) {
    const tr = el("tr");
    cell(tr, typeof a.timestamp === "number" ? timeOf(a.timestamp) : a.timestamp);
    cell(tr, a.level, "level-" + a.level); cell(tr, a.kind); cell(tr, a.message, "text");
    audit.appendChild(tr);
  }
}

function histogram(box, h) {
  box.replaceChildren();
  if (!h || !Array.isArray(h.bounds) || !Array.isArray(h.counts)) { box.appendChild(el("span", "–", "muted")); return; }
  const counts = h.counts.map((c) => Number(c) || 0);
  const max = Math.max(1, ...counts);
  // the buckets between the first and the last that hold a call (the rest are zero)
  const first = counts.findIndex((c) => c > 0);
  if (first < 0) { box.appendChild(el("span", "no calls yet", "muted")); return; }
  let last = counts.length - 1;
  while (counts[last] === 0) last -= 1;
  counts.forEach((c, i) => {
    if (i < first || i > last) return;
    const label = i < h.bounds.length ? "≤ " + h.bounds[i] : "> " + h.bounds[h.bounds.length - 1];
    box.appendChild(el("span", label, "muted"));
    const bar = el("div", null, "bar");
    bar.style.width = (100 * (Number(c) || 0) / max) + "%";
    box.appendChild(bar);
    box.appendChild(el("span", num(c), "num"));
  });
}

// -- deploys -------------------------------------------------------------------------------------------------

function renderDeploys() {
  const d = state.deploys || {};
  const rows = $("deploy-rows");
  rows.replaceChildren();
  const invalid = Object.keys(d.invalid || {}).length;
  $("deploy-note").textContent = !d.available ? "(no cluster deploy bucket on this bus)"
    : invalid === 1 ? "(1 entry in the bucket is not a valid deploy)"
    : invalid ? "(" + invalid + " entries in the bucket are not valid deploys)" : "";
  const reports = d.reports || {};
  for (const dep of (d.deploys || [])) {
    const tr = el("tr");
    tr.dataset.plugin = dep.plugin;
    cell(tr, dep.plugin); cell(tr, dep.version); cell(tr, dep.range); cell(tr, dep.previous || "");
    cell(tr, dep.replicas === null ? "every node" : dep.replicas, "num");
    cell(tr, Object.entries(dep.labels || {}).map(([k, v]) => k + "=" + v).join(", "));
    cell(tr, dep.deployed_at);
    const where = [];
    for (const [node, report] of Object.entries(reports)) {
      const p = (report.plugins || {})[dep.plugin];
      if (p) where.push(node + ": " + p.state + (p.version ? " " + p.version : "") + (p.reason ? " (" + p.reason + ")" : ""));
    }
    cell(tr, where.join("; "), "text");
    rows.appendChild(tr);
  }
}

// -- audit and logs ------------------------------------------------------------------------------------------

function auditRow(a) {
  const tr = el("tr");
  cell(tr, timeOf(a.timestamp));
  cell(tr, a.node);
  cell(tr, a.level, "level-" + a.level);
  cell(tr, a.kind, "kind");
  cell(tr, a.plugin);
  cell(tr, a.message + (a.count > 1 ? " (×" + a.count + ")" : ""), "text message");
  traceCell(tr, a.trace_id);
  return tr;
}

function addAudit(events) {
  const rows = $("audit-rows");
  for (const a of events) {
    state.audit.push(a);
    rows.insertBefore(auditRow(a), rows.firstChild);
  }
  if (state.audit.length > MAX_AUDIT_ROWS) state.audit.splice(0, state.audit.length - MAX_AUDIT_ROWS);
  while (rows.children.length > MAX_AUDIT_ROWS) rows.removeChild(rows.lastChild);
}

function logPasses(l) {
  const plugin = $("log-plugin").value;
  const level = $("log-level").value;
  const text = $("log-text").value;
  if (plugin && l.plugin !== plugin) return false;
  if (LEVELS.indexOf(l.level) < LEVELS.indexOf(level)) return false;
  return !text || l.message.includes(text);
}

function logRow(l) {
  const tr = el("tr");
  tr.dataset.plugin = l.plugin;
  tr.dataset.level = l.level;
  cell(tr, l.ts);
  cell(tr, l.node);
  cell(tr, l.plugin);
  cell(tr, l.version || "");
  cell(tr, l.level, "level-" + l.level);
  cell(tr, (l.stream ? "[" + l.stream + "] " : "") + l.message + (l.dropped ? " (" + l.dropped + " lines dropped before)" : ""),
       "text message");
  traceCell(tr, l.trace_id);
  return tr;
}

function addLogs(lines) {
  const rows = $("log-rows");
  for (const l of lines) {
    state.logs.push(l);
    if (!state.plugins.has(l.plugin)) addPluginOption(l.plugin);
    if (logPasses(l)) rows.insertBefore(logRow(l), rows.firstChild);
  }
  if (state.logs.length > 2 * MAX_LOG_ROWS) state.logs.splice(0, state.logs.length - 2 * MAX_LOG_ROWS);
  while (rows.children.length > MAX_LOG_ROWS) rows.removeChild(rows.lastChild);
}

function renderLogs() {
  const rows = $("log-rows");
  rows.replaceChildren();
  const shown = state.logs.filter(logPasses).slice(-MAX_LOG_ROWS).reverse();
  for (const l of shown) rows.appendChild(logRow(l));
}

function noteDropped(dropped) {
  if (!dropped) return;
  if (dropped.logs) $("log-note").textContent = "(" + dropped.logs + " lines came too fast to show)";
  if (dropped.audit) $("audit-note").textContent = "(" + dropped.audit + " events came too fast to show)";
}

// -- the live stream -----------------------------------------------------------------------------------------

function setConn(live) {
  const c = $("conn");
  c.textContent = live ? "live" : "reconnecting…";
  c.className = "pill " + (live ? "on" : "off");
}

function applySnapshot(s) {
  state.info = s.info || {};
  state.nodes = s.nodes || [];
  state.deploys = s.deploys || {};
  state.audit = [];
  state.logs = [];
  readToken();
  setStatus(s.status);
  $("audit-rows").replaceChildren();
  renderNodes();
  renderDeploys();
  addAudit(s.audit || []);
  state.logs = (s.logs || []).slice();
  for (const l of state.logs) if (!state.plugins.has(l.plugin)) addPluginOption(l.plugin);
  renderLogs();
  noteDropped(s.dropped);
  stamp(s.updated_at);
}

function setStatus(status) {
  const box = $("bus-status");
  const ok = !status || status.ok !== false;
  box.hidden = ok;
  box.textContent = ok ? "" : String(status.message || "cannot poll the nodes");
}

function stamp(t) {
  $("updated").textContent = t ? "updated " + timeOf(t) : "";
}

function connect() {
  const es = new EventSource("/api/events");
  es.addEventListener("open", () => setConn(true));
  es.addEventListener("error", () => setConn(false));
  es.addEventListener("snapshot", (ev) => { applySnapshot(JSON.parse(ev.data)); setConn(true); });
  es.addEventListener("nodes", (ev) => {
    const d = JSON.parse(ev.data);
    state.nodes = d.nodes || [];
    renderNodes();
    stamp(d.updated_at);
  });
  es.addEventListener("status", (ev) => setStatus(JSON.parse(ev.data)));
  es.addEventListener("deploys", (ev) => { state.deploys = JSON.parse(ev.data); renderDeploys(); });
  es.addEventListener("audit", (ev) => {
    const d = JSON.parse(ev.data);
    addAudit(d.events || []);
    noteDropped({ audit: d.dropped });
  });
  es.addEventListener("logs", (ev) => {
    const d = JSON.parse(ev.data);
    addLogs(d.lines || []);
    noteDropped({ logs: d.dropped });
  });
}

function readToken() {
  // the token arrives in the URL's fragment (never sent to any server, never in a Referer); kept for this
  // tab only, and taken out of the address bar
  const m = /(?:^#|&)token=([A-Za-z0-9_-]{16,128})/.exec(location.hash);
  if (m) {
    sessionStorage.setItem("sandbus-token", m[1]);
    history.replaceState(null, "", location.pathname + location.search);
  }
  state.token = sessionStorage.getItem("sandbus-token");
  $("mode").textContent = state.info.control ? (state.token ? "control allowed" : "control needs the token URL")
                                             : "read-only";
}

document.addEventListener("DOMContentLoaded", () => {
  readToken();
  window.addEventListener("hashchange", () => { readToken(); renderPlugins(); });
  $("plugin-filter").addEventListener("input", () => renderPlugins());
  for (const id of ["log-plugin", "log-level", "log-text"]) {
    $(id).addEventListener("input", renderLogs);
    $(id).addEventListener("change", renderLogs);
  }
  $("debug-close").addEventListener("click", closeDebug);
  $("debug-refresh").addEventListener("click", loadDebug);
  connect();
});
