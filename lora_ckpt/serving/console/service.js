// lora-ckpt console: the Service view (GET /console/stats every few seconds, plots drawn as SVG).
import { api, state } from "./api.js";
import { $, colorOf, displayName, el, ms, svg } from "./util.js";

const STATS_EVERY_MS = 3000;

export function startStats() {
  if (state.statsTimer !== null || !state.who) return;
  const tick = async () => {
    await refreshStats();
    if (state.statsTimer !== null) state.statsTimer = setTimeout(tick, STATS_EVERY_MS);
  };
  state.statsTimer = 0;
  tick();
}

export function stopStats() {
  if (state.statsTimer !== null) clearTimeout(state.statsTimer);
  state.statsTimer = null;
}

async function refreshStats() {
  let stats;
  try {
    stats = await api("/console/stats");
  } catch (error) {
    if (error.status !== 401) $("service-updated").textContent = `Cannot read the statistics: ${error.message}`;
    return;
  }
  renderStats(stats);
}

function card(label, value, sub, kind) {
  return el("div", { class: `card ${kind || ""}` }, el("div", { class: "label", text: label }), el("div", { class: "value", text: value }), sub ? el("div", { class: "sub", text: sub }) : null);
}

function renderStats(stats) {
  const adapters = stats.adapters || {};
  const names = Object.keys(adapters);
  let rps = 0;
  for (const name of names) rps += adapters[name].rps;
  const failed = Object.keys(stats.failed || {});
  const count = (value) => (value === null || value === undefined ? "—" : String(Math.round(value)));
  $("cards").replaceChildren(
    card("Status", stats.ready ? "Ready" : "Not ready", stats.ready ? null : stats.reason, stats.ready ? "ok" : "bad"),
    card("Requests/s", rps.toFixed(2), `last ${Math.round(stats.window_seconds)} s`),
    card("Resident", stats.capacity ? `${stats.resident.length} / ${stats.capacity}` : String(stats.resident.length), "adapters in slots"),
    card("Loads", count(stats.loads), "since start"),
    card("Evictions", count(stats.evictions), "since start"),
    card("Failed", String(failed.length), "adapters", failed.length ? "bad" : "ok"),
  );
  $("service-updated").textContent = `Updated ${new Date(stats.time * 1000).toLocaleTimeString()} · refreshing every ${STATS_EVERY_MS / 1000} s`;

  const allNames = [...new Set([...names, ...stats.resident])].sort();
  const rows = allNames.map((name) => {
    const a = adapters[name] || { rps: 0, p50_ms: null, p99_ms: null, requests: 0, errors: 0 };
    const swatch = el("span", { class: "swatch" });
    swatch.style.background = colorOf(name, allNames);
    return el(
      "tr",
      { "data-adapter": name },
      el("td", { title: name }, swatch, displayName(name)),
      el("td", { text: stats.resident.includes(name) ? "yes" : "no" }),
      el("td", { class: "num", text: a.rps.toFixed(2) }),
      el("td", { class: "num", text: ms(a.p50_ms) }),
      el("td", { class: "num", text: ms(a.p99_ms) }),
      el("td", { class: "num", text: a.requests }),
      el("td", { class: "num", text: a.errors }),
    );
  });
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: 7, class: "empty", text: "No requests in the last minute." })));
  $("service-rows").replaceChildren(...rows);

  $("service-failed").hidden = !failed.length;
  $("failed-list").replaceChildren(...failed.map((name) => el("li", { "data-adapter": name }, el("strong", { text: name }), " — ", el("span", { class: "reason", text: stats.failed[name] }))));

  drawRps(stats, allNames);
  drawLatency(stats);
}

const PLOT = { width: 560, height: 200, left: 44, right: 12, top: 10, bottom: 26 };

function niceMax(value) {
  if (!(value > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 2.5, 5, 10]) if (step * power >= value) return step * power;
  return 10 * power;
}

function frame(maxY, bucketSeconds, count, unit) {
  const root = svg("svg", { viewBox: `0 0 ${PLOT.width} ${PLOT.height}`, role: "img" });
  const w = PLOT.width - PLOT.left - PLOT.right;
  const h = PLOT.height - PLOT.top - PLOT.bottom;
  for (let i = 0; i <= 4; i += 1) {
    const y = PLOT.top + h - (h * i) / 4;
    root.append(svg("line", { class: i === 0 ? "axis" : "grid", x1: PLOT.left, x2: PLOT.left + w, y1: y, y2: y }));
    const label = svg("text", { class: "tick", x: PLOT.left - 6, y: y + 4, "text-anchor": "end" });
    const value = (maxY * i) / 4;
    label.textContent = value >= 10 ? value.toFixed(0) : String(Number(value.toPrecision(3)));
    root.append(label);
  }
  const span = bucketSeconds * count;
  for (let minute = 0; minute * 60 <= span; minute += 1) {
    const x = PLOT.left + w - (w * minute * 60) / span;
    const label = svg("text", { class: "tick", x, y: PLOT.height - 6, "text-anchor": minute === 0 ? "end" : "middle" });
    label.textContent = minute === 0 ? "now" : `−${minute} min`;
    root.append(label);
  }
  const unitLabel = svg("text", { class: "tick", x: PLOT.left + 4, y: PLOT.top + 10 });
  unitLabel.textContent = unit;
  root.append(unitLabel);
  const x = (index) => PLOT.left + (w * index) / Math.max(1, count - 1);
  const y = (value) => PLOT.top + h - (h * Math.min(value, maxY)) / maxY;
  return { root, x, y, bottom: PLOT.top + h };
}

function path(points, x, y) {
  let d = "";
  let pen = false;
  points.forEach((value, index) => {
    if (value === null || value === undefined) {
      pen = false;
      return;
    }
    d += `${pen ? "L" : "M"}${x(index).toFixed(1)},${y(value).toFixed(1)}`;
    pen = true;
  });
  return d;
}

// A line, and a dot on each point: a point between two empty buckets has no line.
function series(plot, points, color) {
  plot.root.append(svg("path", { class: "line", stroke: color, d: path(points, plot.x, plot.y) }));
  points.forEach((value, index) => {
    if (value === null || value === undefined) return;
    plot.root.append(svg("circle", { cx: plot.x(index).toFixed(1), cy: plot.y(value).toFixed(1), r: 2.2, fill: color }));
  });
}

function legend(entries) {
  return el(
    "div",
    { class: "legend" },
    entries.map(([name, color]) => {
      const swatch = el("span", { class: "swatch" });
      swatch.style.background = color;
      return el("span", {}, swatch, name);
    }),
  );
}

function drawRps(stats, names) {
  const history = stats.history || [];
  const perAdapter = names.map((name) => history.map((bucket) => (bucket.adapters[name] || 0) / stats.bucket_seconds));
  const totals = history.map((bucket) => bucket.requests / stats.bucket_seconds);
  const maxY = niceMax(Math.max(0, ...totals));
  const plot = frame(maxY, stats.bucket_seconds, history.length, "req/s");
  const area = path(totals, plot.x, plot.y);
  if (area) {
    plot.root.append(svg("path", { class: "area", fill: "#3b5bdb", d: `${area}L${plot.x(history.length - 1)},${plot.bottom}L${plot.x(0)},${plot.bottom}Z` }));
  }
  names.forEach((name, index) => {
    plot.root.append(svg("path", { class: "line", stroke: colorOf(name, names), d: path(perAdapter[index], plot.x, plot.y) }));
  });
  plot.root.setAttribute("aria-label", `Requests per second over the last ${Math.round((history.length * stats.bucket_seconds) / 60)} minutes`);
  $("plot-rps").replaceChildren(plot.root, legend(names.map((name) => [displayName(name), colorOf(name, names)])));
}

function drawLatency(stats) {
  const history = stats.history || [];
  const p50 = history.map((bucket) => bucket.p50_ms);
  const p99 = history.map((bucket) => bucket.p99_ms);
  const maxY = niceMax(Math.max(0, ...p99.filter((v) => v !== null)));
  const plot = frame(maxY, stats.bucket_seconds, history.length, "ms");
  series(plot, p99, "#f76707");
  series(plot, p50, "#3b5bdb");
  plot.root.setAttribute("aria-label", "Latency p50 and p99 in milliseconds over the last minutes");
  $("plot-latency").replaceChildren(plot.root, legend([["p50", "#3b5bdb"], ["p99", "#f76707"]]));
}
