// Tally's live page: polls GET /v1/windows/{key} and /metrics once a second and draws
// the key's window sums, their total, which windows are final, and pipeline health.
// Plain JS, no dependencies, served from the binary (tally/src/ui.rs).
"use strict";

const POLL_MS = 1000;
const UUID = /^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$/;
const RECENT_KEYS = "tally.recent-keys";

const $ = (id) => document.getElementById(id);
let currentKey = null;
let previousScrape = null; // { at: ms, counted: n, accepted: n }

function recentKeys() {
  try { return JSON.parse(localStorage.getItem(RECENT_KEYS) || "[]"); } catch (_) { return []; }
}

function remember(key) {
  const keys = [key, ...recentKeys().filter((k) => k !== key)].slice(0, 10);
  try { localStorage.setItem(RECENT_KEYS, JSON.stringify(keys)); } catch (_) { /* private mode */ }
  showRecent(keys);
}

function showRecent(keys) {
  const list = $("recent-keys");
  list.replaceChildren(...keys.map((k) => { const o = document.createElement("option"); o.value = k; return o; }));
}

function choose(key) {
  key = key.trim().toLowerCase();
  if (!UUID.test(key)) { $("key-error").textContent = "not a UUID"; return; }
  $("key-error").textContent = "";
  currentKey = key;
  $("key").value = key;
  remember(key);
  const url = new URL(location.href);
  url.searchParams.set("key", key);
  history.replaceState(null, "", url);
  refreshWindows();
}

// ---- windows -------------------------------------------------------------------------

function fmt(n) { return Number(n).toLocaleString("en-US"); }
function time(text) { return text.replace("T", " ").replace(/\.000Z$|Z$/, ""); }

async function refreshWindows() {
  if (!currentKey) return;
  const key = currentKey;
  try {
    const response = await fetch(`/v1/windows/${key}`, { cache: "no-store" });
    const body = await response.json();
    if (key !== currentKey) return;
    if (!response.ok) throw new Error(`${response.status} ${body.error || ""}: ${body.message || ""}`);
    showWindows(body);
    $("read-error").textContent = "";
    $("updated").textContent = new Date().toLocaleTimeString();
  } catch (err) {
    $("read-error").textContent = `read failed: ${err.message}`;
  }
}

function showWindows(body) {
  const windows = (body.windows || []).slice().sort((a, b) => a.window_start.localeCompare(b.window_start));
  // The API may answer a `total` for the whole range (and page the windows); without
  // it the total is the sum of the windows answered.
  const computed = windows.reduce((sum, w) => sum + Number(w.sum), 0);
  const fromApi = body.total && typeof body.total.sum === "number";
  const total = fromApi ? body.total.sum : computed;
  const out = $("total");
  out.textContent = String(total);
  out.dataset.state = windows.length ? "loaded" : "empty";
  out.dataset.key = body.key || currentKey;
  const exact = Number.isSafeInteger(total) && windows.every((w) => Number.isSafeInteger(w.sum));
  $("total-note").textContent = (fromApi ? "from the API's total" : "sum of the windows shown")
    + (exact ? "" : " (shown rounded: beyond 2^53)");
  const finals = windows.filter((w) => w.final).length;
  $("window-count").textContent = String(windows.length);
  $("final-count").textContent = String(finals);
  $("open-count").textContent = String(windows.length - finals);

  const rows = windows.slice().reverse().map((w) => {
    const tr = document.createElement("tr");
    tr.className = w.final ? "final" : "open";
    for (const [text, cls] of [[time(w.window_start)], [time(w.window_end)], [fmt(w.sum), "num"], [fmt(w.count), "num"], [w.final ? "final" : "open"]]) {
      const td = document.createElement("td");
      td.textContent = text;
      if (cls) td.className = cls;
      tr.append(td);
    }
    return tr;
  });
  $("windows").tBodies[0].replaceChildren(...rows);
  drawChart(windows);
}

function drawChart(windows) {
  const svg = $("chart");
  const ns = "http://www.w3.org/2000/svg";
  const W = 800, H = 240, pad = 24;
  const shapes = [];
  if (windows.length) {
    const max = Math.max(...windows.map((w) => Number(w.sum)), 1);
    const starts = windows.map((w) => Date.parse(w.window_start));
    const ends = windows.map((w) => Date.parse(w.window_end));
    const t0 = Math.min(...starts), t1 = Math.max(...ends);
    const span = Math.max(t1 - t0, 1);
    windows.forEach((w, i) => {
      const x = pad + ((starts[i] - t0) / span) * (W - 2 * pad);
      const width = Math.max(((ends[i] - starts[i]) / span) * (W - 2 * pad) - 1, 1);
      const h = (Number(w.sum) / max) * (H - 2 * pad);
      const rect = document.createElementNS(ns, "rect");
      rect.setAttribute("x", x.toFixed(1));
      rect.setAttribute("y", (H - pad - h).toFixed(1));
      rect.setAttribute("width", width.toFixed(1));
      rect.setAttribute("height", h.toFixed(1));
      rect.setAttribute("class", w.final ? "final" : "open");
      const title = document.createElementNS(ns, "title");
      title.textContent = `${time(w.window_start)}: ${fmt(w.sum)} (${w.final ? "final" : "open"})`;
      rect.append(title);
      shapes.push(rect);
    });
    const label = (x, y, text, anchor) => {
      const t = document.createElementNS(ns, "text");
      t.setAttribute("x", x); t.setAttribute("y", y); t.setAttribute("text-anchor", anchor);
      t.textContent = text; shapes.push(t);
    };
    label(pad, 14, `max ${fmt(max)}`, "start");
    label(pad, H - 6, time(windows[0].window_start), "start");
    label(W - pad, H - 6, time(windows[windows.length - 1].window_end), "end");
  }
  svg.replaceChildren(...shapes);
}

// ---- metrics ---------------------------------------------------------------------------

/// Prometheus text format → [{name, labels, value}].
function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([a-zA-Z_:][\w:]*)(\{([^}]*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    if (m[3]) for (const pair of m[3].matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[pair[1]] = pair[2];
    samples.push({ name: m[1], labels, value: Number(m[4]) });
  }
  return samples;
}

function sum(samples, name, filter = () => true) {
  const found = samples.filter((s) => s.name === name && filter(s.labels));
  return found.length ? found.reduce((a, s) => a + s.value, 0) : null;
}

async function refreshMetrics() {
  let samples;
  try {
    const response = await fetch("/metrics", { cache: "no-store" });
    samples = parseMetrics(await response.text());
  } catch (err) {
    $("health-scope").textContent = `metrics unavailable: ${err.message}`;
    return;
  }
  const now = Date.now();
  const hasAggregator = samples.some((s) => s.name.startsWith("tally_aggregator_"));
  $("health-scope").textContent = hasAggregator
    ? "Ingest and aggregator metrics of this process (tally dev)."
    : "This process is the ingest edge only (tally ingest --store): aggregator health (records counted, lag, dead letters) is on each aggregator's --metrics-listen and in Grafana, not here.";
  const counted = sum(samples, "tally_aggregator_records_total", (l) => l.outcome === "counted");
  const accepted = sum(samples, "tally_ingest_records_accepted_total");
  if (previousScrape) {
    const seconds = Math.max((now - previousScrape.at) / 1000, 0.001);
    const rate = (a, b) => (a === null || b === null ? "n/a" : ((a - b) / seconds).toFixed(1));
    $("records-rate").textContent = rate(counted, previousScrape.counted);
    $("accepted-rate").textContent = rate(accepted, previousScrape.accepted);
  }
  previousScrape = { at: now, counted, accepted };
  const show = (id, value) => { $(id).textContent = value === null ? "n/a" : fmt(value); };
  show("consumer-lag", sum(samples, "tally_aggregator_consumer_lag"));
  show("commit-lag", sum(samples, "tally_aggregator_commit_lag"));
  show("partitions", sum(samples, "tally_aggregator_assigned_partitions"));
  const circuit = sum(samples, "tally_aggregator_circuit_state");
  $("circuit").textContent = circuit === null ? "n/a" : ["closed", "open", "half-open"][circuit] || String(circuit);

  const letters = samples.filter((s) => s.name === "tally_aggregator_dlq_writes_total");
  const body = $("dead-letters").tBodies[0];
  if (!letters.length) {
    const tr = document.createElement("tr");
    const td = document.createElement("td");
    td.className = "note";
    td.textContent = "n/a (no aggregator in this process)";
    tr.append(td);
    body.replaceChildren(tr);
    return;
  }
  letters.sort((a, b) => b.value - a.value || a.labels.reason.localeCompare(b.labels.reason));
  body.replaceChildren(...letters.map((s) => {
    const tr = document.createElement("tr");
    tr.dataset.reason = s.labels.reason;
    const th = document.createElement("th"); th.textContent = s.labels.reason;
    const td = document.createElement("td"); td.className = "num"; td.textContent = fmt(s.value);
    tr.append(th, td);
    return tr;
  }));
}

// ---- start -----------------------------------------------------------------------------

$("pick").addEventListener("submit", (event) => { event.preventDefault(); choose($("key").value); });
showRecent(recentKeys());
const initial = new URL(location.href).searchParams.get("key") || recentKeys()[0];
if (initial) choose(initial);
refreshMetrics();
setInterval(() => { refreshWindows(); refreshMetrics(); }, POLL_MS);
