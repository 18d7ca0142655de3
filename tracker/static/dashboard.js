// Operator dashboard: polls /v1/stats every REFRESH_MS and redraws cards, table and charts.
// Plain canvas drawing, no libraries: the tracker serves everything itself (no CDN links).
// Each chart also records what it drew in data-* attributes, so tests can check the page.
"use strict";
const REFRESH_MS = 2000;
const LOAD_POINTS = 60;
const loadHistory = [];
// one colour per line of a time chart (builds, releases)
const SERIES_COLORS = ["#264653", "#2a9d8f", "#e9c46a", "#f4a261", "#e76f51", "#8d5fd3",
                       "#4a7bd0", "#9aa0a6"];

function fmtBytes(n) {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return (i ? n.toFixed(1) : String(n)) + " " + units[i];
}
function pct(x) { return (100 * x).toFixed(1) + "%"; }
function setText(id, text) { document.getElementById(id).textContent = text; }

function clear(canvas) {
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.font = "11px system-ui, sans-serif";
  return ctx;
}

// A round step for about `parts` ticks up to `max`: 1, 2 or 5 times a power of ten.
function tickStep(max, parts) {
  const raw = max / parts, p = Math.pow(10, Math.floor(Math.log10(raw)));
  return [1, 2, 5, 10].map(k => k * p).find(s => s >= raw);
}

// Byte ticks in one decimal unit, chosen from the top tick: [unit name, divisor].
function byteUnit(top) {
  const units = [["B", 1], ["KB", 1e3], ["MB", 1e6], ["GB", 1e9], ["TB", 1e12]];
  return units.filter(([, d]) => top >= d).pop() || units[0];
}

// Legend entries (name and colour of each series) under the chart, as HTML so that they are
// read as text, not pixels.
function legend(canvas, names, colors) {
  const id = canvas.id + "-legend";
  let ul = document.getElementById(id);
  if (!ul) {
    ul = document.createElement("ul");
    ul.id = id;
    ul.className = "legend";
    canvas.after(ul);
  }
  ul.replaceChildren(...names.map((name, i) => {
    const li = document.createElement("li"), swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = colors[i];
    li.append(swatch, name);
    return li;
  }));
}

function barChart(canvas, labels, series, colors, axes) {
  // series: list of arrays (stacked), one value per label. axes: {x, y: axis titles,
  // bytes: the values are bytes (ticks in one unit, named in the y title), names: a legend}
  const ctx = clear(canvas);
  const w = canvas.width, h = canvas.height;
  const left = 56, right = 8, top = 10, bottom = 38;
  const totals = labels.map((_, i) => series.reduce((s, arr) => s + arr[i], 0));
  const step = Math.max(1, tickStep(Math.max(1, ...totals), 4));  // counts: whole ticks
  const max = step * Math.max(1, Math.ceil(Math.max(1, ...totals) / step));
  const [unit, div] = axes.bytes ? byteUnit(max) : ["", 1];
  const yTitle = axes.bytes ? axes.y + " (" + unit + ")" : axes.y;
  const sy = v => h - bottom - (v / max) * (h - top - bottom);
  // y axis: gridlines and tick values in the chosen unit
  const ticks = [];
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (let v = 0; v <= max + step / 2; v += step) {
    const label = String(+(v / div).toFixed(2));
    ticks.push(label);
    ctx.strokeStyle = v ? "#e3e6ea" : "#667";
    ctx.beginPath(); ctx.moveTo(left, sy(v)); ctx.lineTo(w - right, sy(v)); ctx.stroke();
    ctx.fillStyle = "#445";
    ctx.fillText(label, left - 4, sy(v));
  }
  ctx.strokeStyle = "#667";
  ctx.beginPath(); ctx.moveTo(left, top); ctx.lineTo(left, h - bottom); ctx.stroke();
  const slot = (w - left - right) / Math.max(1, labels.length);
  const bw = Math.max(4, Math.min(60, slot - 8));
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  labels.forEach((label, i) => {
    let y = h - bottom;
    const x = left + i * slot + (slot - bw) / 2;
    series.forEach((arr, s) => {
      const bh = (arr[i] / max) * (h - top - bottom);
      ctx.fillStyle = colors[s];
      ctx.fillRect(x, y - bh, bw, bh);
      y -= bh;
    });
    ctx.fillStyle = "#334";
    ctx.fillText(label, x + bw / 2, h - bottom + 4, slot);
  });
  // axis titles: x under the bar labels, y turned along the axis
  ctx.fillStyle = "#1d2430";
  ctx.textBaseline = "bottom";
  ctx.fillText(axes.x, left + (w - left - right) / 2, h - 2);
  ctx.save();
  ctx.translate(12, top + (h - top - bottom) / 2);
  ctx.rotate(-Math.PI / 2);
  ctx.textBaseline = "middle";
  ctx.fillText(yTitle, 0, 0);
  ctx.restore();
  if (axes.names) legend(canvas, axes.names, colors);
  canvas.dataset.bars = JSON.stringify(totals);
  canvas.dataset.xLabel = axes.x;
  canvas.dataset.yLabel = yTitle;
  canvas.dataset.yTicks = JSON.stringify(ticks);
  canvas.setAttribute("aria-label", canvas.closest("figure").querySelector("figcaption")
    .textContent + ". " + yTitle + " by " + axes.x);
}

// A tick's UTC time: the clock time, with the day when the chart spans more than one, with
// the seconds when it spans minutes (the load chart: ticks would repeat a minute)
function when(t, span) {
  const iso = new Date(t * 1000).toISOString();
  if (span > 86400) return iso.slice(5, 10) + " " + iso.slice(11, 16);
  return span < 600 ? iso.slice(11, 19) : iso.slice(11, 16);
}

// Lines over time with both axes titled, ticks in their units and a legend.
// lines: [{name, points: [[unix s, value], ...], width (px, default 2), dash ([on, off] px)}];
// colors: one per line
function timeChart(canvas, lines, axes, colors = SERIES_COLORS) {
  const ctx = clear(canvas);
  const w = canvas.width, h = canvas.height;
  const left = 56, right = 12, top = 10, bottom = 40;
  const pts = lines.flatMap(l => l.points);
  const xs = pts.map(p => p[0]);
  const x0 = pts.length ? Math.min(...xs) : 0, x1 = pts.length ? Math.max(...xs) : 1;
  const step = Math.max(1, tickStep(Math.max(1, ...pts.map(p => p[1])), 4));
  const ymax = step * Math.max(1, Math.ceil(Math.max(1, ...pts.map(p => p[1])) / step));
  const sx = x => left + (x1 === x0 ? 0.5 : (x - x0) / (x1 - x0)) * (w - left - right);
  const sy = y => h - bottom - (y / ymax) * (h - top - bottom);
  ctx.textAlign = "right"; ctx.textBaseline = "middle";
  const yTicks = [];
  for (let v = 0; v <= ymax + step / 2; v += step) {
    yTicks.push(String(v));
    ctx.strokeStyle = v ? "#e3e6ea" : "#667";
    ctx.beginPath(); ctx.moveTo(left, sy(v)); ctx.lineTo(w - right, sy(v)); ctx.stroke();
    ctx.fillStyle = "#445"; ctx.fillText(String(v), left - 4, sy(v));
  }
  ctx.strokeStyle = "#667";
  ctx.beginPath(); ctx.moveTo(left, top); ctx.lineTo(left, h - bottom); ctx.stroke();
  // x ticks: the first and last sample and up to three between, as UTC clock times
  const xTicks = [];
  ctx.textAlign = "center"; ctx.textBaseline = "top";
  const n = x1 === x0 ? 1 : 4;
  for (let i = 0; i <= n && pts.length; i++) {
    const t = x0 + (x1 - x0) * i / n;
    const label = when(t, x1 - x0);
    xTicks.push(label);
    // the end ticks lean inwards, so that none is cut at the canvas's edge
    ctx.textAlign = n > 1 && i === 0 ? "left" : n > 1 && i === n ? "right" : "center";
    ctx.fillStyle = "#445"; ctx.fillText(label, sx(t), h - bottom + 4);
  }
  if (!pts.length) { ctx.fillStyle = "#889"; ctx.fillText("no samples yet", w / 2, h / 2); }
  lines.forEach((line, i) => {
    ctx.strokeStyle = ctx.fillStyle = colors[i % colors.length];
    ctx.lineWidth = line.width || 2;
    ctx.setLineDash(line.dash || []);
    ctx.beginPath();
    line.points.forEach(([x, y], j) => (j ? ctx.lineTo(sx(x), sy(y)) : ctx.moveTo(sx(x), sy(y))));
    ctx.stroke();
    if (line.points.length <= 200) line.points.forEach(([x, y]) => {  // dots where they fit
      ctx.beginPath(); ctx.arc(sx(x), sy(y), 2.5, 0, 2 * Math.PI); ctx.fill();
    });
  });
  ctx.lineWidth = 1;
  ctx.setLineDash([]);
  ctx.fillStyle = "#1d2430"; ctx.textAlign = "center"; ctx.textBaseline = "bottom";
  ctx.fillText(axes.x, left + (w - left - right) / 2, h - 2);
  ctx.save();
  ctx.translate(12, top + (h - top - bottom) / 2);
  ctx.rotate(-Math.PI / 2);
  ctx.textBaseline = "middle";
  ctx.fillText(axes.y, 0, 0);
  ctx.restore();
  legend(canvas, lines.map(l => l.name), colors);
  canvas.dataset.points = String(pts.length);
  canvas.dataset.lines = String(lines.length);
  canvas.dataset.xLabel = axes.x;
  canvas.dataset.yLabel = axes.y;
  canvas.dataset.yTicks = JSON.stringify(yTicks);
  canvas.dataset.xTicks = JSON.stringify(xTicks);
  canvas.setAttribute("aria-label", canvas.closest("figure").querySelector("figcaption")
    .textContent + ". " + axes.y + " by " + axes.x);
}

function cumulative(series) {
  let total = 0;
  return series.map(([t, n]) => [t, (total += n)]);
}

// Release notes (up to 16 KiB, the publisher's text): the first NOTES_SHOWN characters in the
// table; when there is more, the whole text one click away. Always set as text, never as HTML.
const NOTES_SHOWN = 80;
function notesCell(notes) {
  const td = document.createElement("td");
  td.className = "notes";
  if (notes.length <= NOTES_SHOWN && !notes.trim().includes("\n")) {
    td.textContent = notes.trim() || "–";
    return td;
  }
  const details = document.createElement("details"), summary = document.createElement("summary");
  const full = document.createElement("div");
  summary.textContent = notes.trim().split("\n")[0].slice(0, NOTES_SHOWN) + "…";
  full.className = "notes-full";
  full.textContent = notes;
  details.append(summary, full);
  td.append(details);
  return td;
}

// How many of a release's bytes from peers or the CDN ("peers" / "cdn") were delta patches, as
// its install outcomes say (announces count patches with chunks; outcomes split them). Capped
// at the announced total: the two are counted apart and may differ for a while.
function patchBytes(stats, r, source) {
  const b = (stats.outcomes || []).find(o => o.manifest_id === r.manifest_id);
  const total = source === "peers" ? r.bytes_from_peers : r.bytes_from_cdn;
  return Math.min(total, b && b.bytes ? b.bytes["patches_" + source] || 0 : 0);
}

function withPatches(total, patches) {
  return fmtBytes(total) + (patches ? " (patches " + fmtBytes(patches) + ")" : "");
}

function render(stats) {
  const rel = stats.releases;
  const seeders = rel.reduce((s, r) => s + r.seeders, 0);
  const leechers = rel.reduce((s, r) => s + r.leechers, 0);
  const fromPeers = rel.reduce((s, r) => s + r.bytes_from_peers, 0);
  const fromCdn = rel.reduce((s, r) => s + r.bytes_from_cdn, 0);
  setText("k-releases", rel.length);
  setText("k-seeders", seeders);
  setText("k-leechers", leechers);
  setText("k-offload", fromPeers + fromCdn ? pct(fromPeers / (fromPeers + fromCdn)) : "–");
  setText("k-rps", stats.load.requests_per_s.toFixed(1));
  setText("k-p99", stats.load.p99_ms.toFixed(1) + " ms");
  setText("k-flagged", stats.quality.flagged.length);

  const tbody = document.querySelector("#releases tbody");
  tbody.replaceChildren(...rel.map(r => {
    const tr = document.createElement("tr");
    tr.dataset.manifest = r.manifest_id;
    [r.app, r.version, r.build, r.seeders, r.leechers, r.completed,
     withPatches(r.bytes_from_peers, patchBytes(stats, r, "peers")),
     withPatches(r.bytes_from_cdn, patchBytes(stats, r, "cdn")), pct(r.offload_ratio)]
      .forEach(v => { const td = document.createElement("td"); td.textContent = v; tr.append(td); });
    const type = document.createElement("td");
    type.textContent = r.update_type || "–";
    type.className = r.update_type ? "type-" + r.update_type : "muted";
    tr.append(type, notesCell(r.notes || ""));
    return tr;
  }));

  const labels = rel.map(r => r.app + " " + r.version);
  const peerPatches = rel.map(r => patchBytes(stats, r, "peers"));
  const cdnPatches = rel.map(r => patchBytes(stats, r, "cdn"));
  barChart(document.getElementById("chart-offload"), labels,
           [rel.map((r, i) => r.bytes_from_peers - peerPatches[i]), peerPatches,
            rel.map((r, i) => r.bytes_from_cdn - cdnPatches[i]), cdnPatches],
           ["#2a9d8f", "#8fd3c9", "#e76f51", "#f4b8a1"],
           { x: "Release (app and version)", y: "Bytes received", bytes: true,
             names: ["From peers: chunks", "From peers: delta patches",
                     "From the CDN: chunks", "From the CDN: delta patches"] });
  timeChart(document.getElementById("chart-adoption"),
            rel.slice(0, SERIES_COLORS.length).map(r => ({
              name: r.app + " " + r.version + " (build " + r.build + ")",
              points: cumulative(r.adoption) })),
            { x: "Time (UTC, per minute with completions)", y: "Completed installs (total)" });
  barChart(document.getElementById("chart-quality"),
           stats.quality.histogram.map((_, i) => (i / 10).toFixed(1)),
           [stats.quality.histogram], ["#264653"],
           { x: "Quality score (bucket's lower bound)", y: "Peers",
             names: ["Peers scored by their reporters"] });
  loadHistory.push([Date.now() / 1000, stats.load.requests_per_s]);
  if (loadHistory.length > LOAD_POINTS) loadHistory.shift();
  timeChart(document.getElementById("chart-load"),
            [{ name: "Requests/s, both ports (every " + REFRESH_MS / 1000 + " s)",
               points: loadHistory }],
            { x: "Time (UTC)", y: "Requests per second" }, ["#e76f51"]);

  const ul = document.getElementById("flagged");
  ul.replaceChildren(...(stats.quality.flagged.length ? stats.quality.flagged : [null]).map(n => {
    const li = document.createElement("li");
    if (n === null) { li.className = "muted"; li.textContent = "none"; }
    else { const c = document.createElement("code"); c.textContent = n; li.append(c); }
    return li;
  }));
}

// Staged rollouts and install outcomes (issue 18): their own tables and the halt banner.
function row(cells, classes) {
  const tr = document.createElement("tr");
  cells.forEach((v, i) => {
    const td = document.createElement("td");
    td.textContent = v;
    if (classes && classes[i]) td.className = classes[i];
    tr.append(td);
  });
  return tr;
}

function emptyRow(cols, text) {
  const tr = document.createElement("tr");
  const td = document.createElement("td");
  td.colSpan = cols; td.className = "muted"; td.textContent = text;
  tr.append(td);
  return tr;
}

function renderOperations(stats) {
  const rollouts = (stats.rollouts || []).filter(r => r.state === "active" || r.state === "halted");
  const rtbody = document.querySelector("#rollouts tbody");
  rtbody.replaceChildren(...(rollouts.length ? rollouts.map(r => {
    const tr = row([r.app + " / " + r.channel, r.state, r.build, r.percent + "%",
                    r.success + " / " + r.failure,
                    r.failure_rate === null ? "–" : pct(r.failure_rate),
                    pct(r.threshold) + " of ≥ " + r.min_outcomes, r.reason || ""],
                   [null, r.state === "halted" ? "halted" : null]);
    tr.dataset.rollout = r.app + "/" + r.channel;
    return tr;
  }) : [emptyRow(8, "none")]));
  const halted = rollouts.filter(r => r.state === "halted");
  const banner = document.getElementById("rollout-banner");
  banner.hidden = !halted.length;
  banner.textContent = halted.map(r => "Rollout of " + r.app + " build " + r.build + " on " +
    r.channel + " halted at " + r.percent + "%: " + r.reason).join(" · ");

  const outcomes = stats.outcomes || [];
  const otbody = document.querySelector("#outcomes tbody");
  otbody.replaceChildren(...(outcomes.length ? outcomes.map(b => {
    const codes = Object.entries(b.failure_codes).map(([c, n]) => c + " × " + n).join(", ");
    const tr = row([b.app, b.version, b.build, b.reports,
                    b.success_rate === null ? "–" : pct(b.success_rate), codes || "–",
                    b.rollbacks_from, b.rollbacks_to], [null, null, null, null, null, "codes"]);
    tr.dataset.outcome = b.manifest_id;
    return tr;
  }) : [emptyRow(8, "no outcomes reported yet")]));
}

async function refresh() {
  const status = document.getElementById("status");
  try {
    const resp = await fetch("/v1/stats", { cache: "no-store" });
    if (!resp.ok) throw new Error("HTTP " + resp.status);
    const stats = await resp.json();
    render(stats);
    renderOperations(stats);
    status.className = "status";
    status.textContent = "updated " + new Date().toLocaleTimeString();
    document.body.dataset.refreshes = String(Number(document.body.dataset.refreshes || 0) + 1);
  } catch (err) {
    status.className = "status error";
    status.textContent = "cannot load stats: " + err.message;
  }
}

refresh();
setInterval(refresh, REFRESH_MS);
