// The orchestrator's read-only page. "/" shows nodes and jobs, "/jobs/ID" one job's phase
// timeline as an SVG chart. Data comes from /api/* on the same server; everything a user typed
// (ids, reasons, notes) goes in as text nodes, never as HTML.
"use strict";

const REFRESH_MS = 2000;
const SVG_NS = "http://www.w3.org/2000/svg";
const TERMINAL = new Set(["COMPLETED", "ROLLED_BACK", "FAILED", "CANCELLED"]);
const PHASE_COLORS = {
  PENDING: "var(--pending)", PREPARING: "var(--preparing)", PRECOPY: "var(--precopy)",
  DIRTY_ITERATION: "var(--dirty)", STOP_AND_COPY: "var(--stop)", COMMIT: "var(--commit)",
  RESUMING: "var(--resuming)", COMPLETED: "var(--completed)", ROLLED_BACK: "var(--rolled-back)",
  FAILED: "var(--failed)", CANCELLED: "var(--cancelled)",
};

// ---- small helpers ---------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value !== undefined && value !== null) node.setAttribute(key, value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  for (const child of children.flat(Infinity)) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function humanBytes(n) {
  const units = ["KiB", "MiB", "GiB", "TiB", "PiB"];
  if (Math.abs(n) < 1024) return `${Math.round(n)} B`;
  let value = n;
  for (const unit of units) {
    value /= 1024;
    if (Math.abs(value) < 1024 || unit === units[units.length - 1]) return `${value.toFixed(1)} ${unit}`;
  }
  return `${n} B`;
}

function humanMs(ms) {
  if (ms < 10) return `${ms.toFixed(1)} ms`;
  if (ms < 1000) return `${Math.round(ms)} ms`;
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(1)} s`;
  const whole = Math.round(s);
  if (whole < 3600) return `${Math.floor(whole / 60)}m ${String(whole % 60).padStart(2, "0")}s`;
  return `${Math.floor(whole / 3600)}h ${String(Math.floor((whole % 3600) / 60)).padStart(2, "0")}m`;
}

function clock(unixS) {
  if (!unixS) return "-";
  return new Date(unixS * 1000).toLocaleTimeString([], { hour12: false });
}

function badge(phase) {
  return el("span", { class: "badge", style: `background:${PHASE_COLORS[phase] || "var(--muted)"}` }, phase);
}

async function getJSON(url) {
  const reply = await fetch(url, { cache: "no-store" });
  const body = await reply.json().catch(() => ({}));
  if (!reply.ok) throw new Error(body.error || `${url}: HTTP ${reply.status}`);
  return body;
}

function jobElapsedMs(job, nowS) {
  const end = job.terminal ? job.updated_at : nowS;
  return Math.max(end - job.created_at, 0) * 1000;
}

// ---- overview: nodes and jobs ---------------------------------------------------------------

function nodesTable(nodes) {
  if (!nodes.length) return el("p", { class: "muted" }, "no agents registered");
  const rows = nodes.map((n) => {
    const pct = n.capacity_bytes ? Math.min(100, (100 * n.allocated_bytes) / n.capacity_bytes) : 0;
    return el("tr", { "data-node": n.name },
      el("td", {}, el("strong", {}, n.name)),
      el("td", { class: "mono" }, n.address),
      el("td", {}, n.cordoned ? "cordoned" : "schedulable"),
      el("td", {}, el("span", { class: "bar" }, el("span", { style: `width:${pct.toFixed(1)}%` })),
        `${humanBytes(n.allocated_bytes)} of ${humanBytes(n.capacity_bytes)}`),
      el("td", { class: "wrap" }, n.controllers.length ? n.controllers.join(", ") : "-"));
  });
  return el("table", { id: "nodes" },
    el("thead", {}, el("tr", {}, ["node", "agent address", "state", "allocated", "controllers"].map((h) => el("th", {}, h)))),
    el("tbody", {}, rows));
}

function jobsTable(jobs, nowS) {
  if (!jobs.length) return el("p", { class: "muted" }, "no migrations yet");
  const rows = jobs.map((j) => el("tr", { "data-job": j.id },
    el("td", { class: "mono" }, el("a", { href: `/jobs/${j.id}` }, j.id)),
    el("td", {}, j.controller_id),
    el("td", {}, `${j.source_node} \u2192 ${j.destination_node || "?"}`),
    el("td", {}, badge(j.phase)),
    el("td", { class: "num" }, humanBytes(j.bytes_transferred)),
    el("td", { class: "num" }, String(j.rounds)),
    el("td", {}, clock(j.created_at)),
    el("td", { class: "num" }, humanMs(jobElapsedMs(j, nowS))),
    el("td", { class: "wrap" }, j.reason || "")));
  return el("table", { id: "jobs" },
    el("thead", {}, el("tr", {}, [["job"], ["controller"], ["route"], ["phase"], ["sent", "num"], ["rounds", "num"],
      ["started"], ["took", "num"], ["reason"]].map(([h, cls]) => el("th", { class: cls }, h)))),
    el("tbody", {}, rows));
}

async function renderOverview(root) {
  const [nodes, jobs] = await Promise.all([getJSON("/api/nodes"), getJSON("/api/jobs")]);
  const nowS = Date.now() / 1000;
  document.title = "nvmigrate";
  root.replaceChildren(
    el("h2", {}, `Nodes (${nodes.nodes.length})`), nodesTable(nodes.nodes),
    el("h2", {}, `Migrations (${jobs.jobs.length})`), jobsTable(jobs.jobs, nowS));
  return true; // the overview keeps refreshing
}

// ---- one job: fields and the phase timeline -------------------------------------------------

function jobFields(job, nowS) {
  const pairs = [
    ["job", el("span", { class: "mono", id: "job-id" }, job.id)], ["phase", badge(job.phase)],
    ["controller", job.controller_id], ["route", `${job.source_node} \u2192 ${job.destination_node || "?"}`],
    ["trace id", el("span", { class: "mono", id: "trace-id" }, job.trace_id || "- (tracing was off)")],
    [job.terminal ? "took" : "elapsed", humanMs(jobElapsedMs(job, nowS))],
    ["sent", `${humanBytes(job.bytes_transferred)} (namespace ${humanBytes(job.namespace_bytes)})`],
    ["rounds", String(job.rounds)], ["throttle", `${job.throttle_percent}%`],
    ["dirty rate", `${humanBytes(job.dirty_rate_bytes_per_s)}/s`],
    ["downtime", job.downtime_ms ? humanMs(job.downtime_ms) : "-"],
    ["guest blackout", job.guest_blackout_ms ? humanMs(job.guest_blackout_ms) : "-"],
    ["epoch", String(job.epoch)], ["reason", job.reason || "-"],
  ];
  return el("dl", { class: "fields card" }, pairs.map(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}

function niceStep(totalMs, wanted) {
  const raw = totalMs / wanted;
  const power = 10 ** Math.floor(Math.log10(raw));
  for (const m of [1, 2, 5, 10]) if (raw <= m * power) return m * power;
  return 10 * power;
}

// The chart: one row per phase record, a bar from its start (offset from the job's first
// phase) for its duration; the running phase drawn up to now, hatched; the outcome as a marker.
function timelineChart(job, nowS) {
  const width = 1000, left = 150, right = 110, top = 34, rowH = 30;
  const plotW = width - left - right;
  const labelX = width - right + 16; // durations and the outcome's time, clear of the bars
  const t0 = job.phases.length ? job.phases[0].started_at : job.created_at;
  const spans = job.phases.map((p, i) => {
    const running = !job.terminal && i === job.phases.length - 1;
    const durationMs = running ? Math.max(nowS - p.started_at, 0) * 1000 : p.duration_ms;
    return { p, offsetMs: (p.started_at - t0) * 1000, durationMs, running };
  });
  const totalMs = Math.max(1, ...spans.map((s) => s.offsetMs + s.durationMs));
  const x = (ms) => left + (ms / totalMs) * plotW;
  const height = top + rowH * spans.length + 12;
  const chart = svg("svg", { class: "timeline", id: "timeline", viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": `phase timeline of ${job.id}` });
  chart.append(svg("defs", {}, svg("pattern", { id: "hatch", width: 6, height: 6, patternUnits: "userSpaceOnUse",
    patternTransform: "rotate(45)" }, svg("rect", { width: 3, height: 6, fill: "white", opacity: 0.45 }))));

  const step = niceStep(totalMs, 8);
  const axis = svg("g", { class: "axis" });
  for (let t = 0; t <= totalMs + 1e-9; t += step) {
    axis.append(svg("line", { class: "grid", x1: x(t), x2: x(t), y1: top - 8, y2: height - 8 }));
    axis.append(svg("text", { x: x(t), y: top - 14, "text-anchor": "middle" }, humanMs(t)));
  }
  chart.append(axis);

  spans.forEach((s, i) => {
    const y = top + i * rowH;
    const row = svg("g", { class: "phase", "data-phase": s.p.phase });
    const color = PHASE_COLORS[s.p.phase] || "var(--muted)";
    row.append(svg("text", { x: 8, y: y + rowH / 2 + 4 }, s.p.phase));
    if (TERMINAL.has(s.p.phase) && !s.durationMs) {
      const cx = x(s.offsetMs);
      row.append(svg("path", { d: `M${cx} ${y + 5} L${cx + 9} ${y + rowH / 2} L${cx} ${y + rowH - 5} L${cx - 9} ${y + rowH / 2} Z`,
        fill: color }));
      row.append(svg("text", { x: Math.max(cx + 14, labelX), y: y + rowH / 2 + 4 }, `at ${clock(s.p.started_at)}`));
    } else {
      const barW = Math.max(x(s.offsetMs + s.durationMs) - x(s.offsetMs), 2);
      const bar = svg("rect", { x: x(s.offsetMs), y: y + 6, width: barW, height: rowH - 12, rx: 3, fill: color });
      bar.append(svg("title", {}, `${s.p.phase}: ${humanMs(s.durationMs)}${s.p.bytes ? `, ${humanBytes(s.p.bytes)}` : ""}` +
        `${s.p.rounds ? `, ${s.p.rounds} rounds` : ""}${s.p.note ? ` \u2014 ${s.p.note}` : ""}`));
      row.append(bar);
      if (s.running) row.append(svg("rect", { x: x(s.offsetMs), y: y + 6, width: barW, height: rowH - 12, rx: 3,
        fill: "url(#hatch)" }));
      row.append(svg("text", { x: labelX, y: y + rowH / 2 + 4 },
        `${humanMs(s.durationMs)}${s.running ? "+" : ""}`));
    }
    chart.append(row);
  });
  return chart;
}

function phaseTable(job) {
  return el("table", { id: "phases" },
    el("thead", {}, el("tr", {}, [["phase"], ["started"], ["duration", "num"], ["bytes", "num"], ["rounds", "num"],
      ["note"]].map(([h, cls]) => el("th", { class: cls }, h)))),
    el("tbody", {}, job.phases.map((p) => el("tr", {},
      el("td", {}, badge(p.phase)), el("td", {}, clock(p.started_at)),
      el("td", { class: "num" }, p.duration_ms ? humanMs(p.duration_ms) : "-"),
      el("td", { class: "num" }, p.bytes ? humanBytes(p.bytes) : "-"),
      el("td", { class: "num" }, p.rounds ? String(p.rounds) : "-"),
      el("td", { class: "wrap" }, p.note || "")))));
}

async function renderJob(root, jobId) {
  const job = await getJSON(`/api/jobs/${encodeURIComponent(jobId)}`);
  const nowS = Date.now() / 1000;
  document.title = `${job.id} \u00b7 nvmigrate`;
  root.replaceChildren(
    el("p", {}, el("a", { href: "/" }, "\u2190 all nodes and jobs")),
    jobFields(job, nowS),
    el("h2", {}, "Phase timeline"), timelineChart(job, nowS),
    el("h2", {}, "Phases"), phaseTable(job));
  return !job.terminal; // a finished job does not change any more
}

// ---- routing and refresh --------------------------------------------------------------------

async function refresh() {
  const root = document.getElementById("app");
  const banner = document.getElementById("error");
  const match = window.location.pathname.match(/^\/jobs\/([^/]+)$/);
  let again = true;
  try {
    again = match ? await renderJob(root, decodeURIComponent(match[1])) : await renderOverview(root);
    banner.hidden = true;
    document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString([], { hour12: false })}`;
  } catch (err) {
    banner.textContent = `could not load: ${err.message}`;
    banner.hidden = false;
  }
  if (again) setTimeout(refresh, REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", refresh);
