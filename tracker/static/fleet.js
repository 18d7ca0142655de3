// Fleet view and alerts banner (issue 18): follows dashboard.js's refreshes. For each refresh
// of /v1/stats it shows the alerts the tracker evaluated (stats.alerts, the conditions of
// docs/alerts.yml) and the chosen app's fleet (/v1/apps/APP/fleet): nodes per build, client
// versions and the adoption curve of each build. Uses dashboard.js's helpers (legend,
// tickStep, pct, setText). What a chart drew is in data-* attributes, for the tests.
"use strict";
const FLEET_COLORS = ["#264653", "#2a9d8f", "#e9c46a", "#f4a261", "#e76f51", "#8d5fd3",
                      "#4a7bd0", "#9aa0a6"];
const FLEET_LINES = FLEET_COLORS.length;  // builds drawn at most (the newest)

function renderAlerts(all) {
  // a halted rollout has its own banner (dashboard.js: its percentage and why): not twice
  const rolloutBanner = document.getElementById("rollout-banner");
  const alerts = all.filter(a => !(a.name === "RolloutHalted" && rolloutBanner));
  const ul = document.getElementById("alerts");
  ul.hidden = !alerts.length;
  ul.replaceChildren(...alerts.map(a => {
    const li = document.createElement("li");
    li.className = a.severity;
    li.dataset.alert = a.name;
    li.textContent = a.summary;
    return li;
  }));
}

// A tick's UTC time: the clock time, with the day when the chart spans more than one
function when(t, span) {
  const iso = new Date(t * 1000).toISOString();
  return span > 86400 ? iso.slice(5, 10) + " " + iso.slice(11, 16) : iso.slice(11, 16);
}

// Lines over time with both axes titled, ticks in their units and a legend.
// lines: [{name, points: [[unix s, value], ...], width (px, default 2), dash ([on, off] px)}];
// colors: one per line
function timeChart(canvas, lines, axes, colors = FLEET_COLORS) {
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

function renderFleetView(view) {
  const tbody = document.querySelector("#fleet-builds tbody");
  setText("fleet-summary", view.nodes + " nodes seen in the last " +
          Math.round(view.ttl_s / 3600) + " h, " + view.updating + " downloading their first build");
  tbody.replaceChildren(...view.builds.map(b => {
    const tr = document.createElement("tr");
    tr.dataset.build = String(b.build);
    [b.build, b.manifest_id.slice(0, 12) + "…", b.nodes, pct(b.share),
     b.last_seen ? new Date(b.last_seen * 1000).toISOString().slice(0, 16).replace("T", " ") : "–"]
      .forEach(v => { const td = document.createElement("td"); td.textContent = v; tr.append(td); });
    return tr;
  }));
  const clients = Object.entries(view.clients).map(([c, n]) => c + " × " + n).join(", ");
  const span = document.getElementById("fleet-clients");
  span.textContent = clients || "–";
  span.className = clients ? "" : "muted";
  const minutes = Math.round(view.bucket_s / 60);
  timeChart(document.getElementById("chart-fleet"),
            view.builds.slice(0, FLEET_LINES).map(b => ({
              name: (b.version ? b.version + " (build " + b.build + ")" : "build " + b.build),
              points: b.adoption })),
            { x: "Time (UTC, one sample per " + (minutes >= 60 ? minutes / 60 + " h" : minutes +
               " min") + ")", y: "Nodes running the build" });
}

async function renderFleet(stats) {
  renderAlerts(stats.alerts || []);
  const select = document.getElementById("fleet-app");
  const apps = [...new Set(stats.releases.map(r => r.app))].sort();
  const chosen = select.value || apps[0];
  if ([...select.options].map(o => o.value).join() !== apps.join()) {
    select.replaceChildren(...apps.map(a => new Option(a, a)));
  }
  if (!chosen) return;
  select.value = chosen;
  const resp = await fetch("/v1/apps/" + encodeURIComponent(chosen) + "/fleet",
                           { cache: "no-store" });
  if (resp.ok) renderFleetView(await resp.json());
  document.getElementById("fleet").dataset.refreshes =
    String(Number(document.getElementById("fleet").dataset.refreshes || 0) + 1);
}

// dashboard.js calls render(stats) on every refresh: the fleet view and the alerts follow it.
const renderOverview = render;
render = function (stats) {  // eslint-disable-line no-global-assign
  renderOverview(stats);
  renderFleet(stats);
};
if (document.body.dataset.refreshes) refresh();  // the first refresh came before this script

document.getElementById("fleet-app").addEventListener("change", () => refresh());
document.getElementById("fleet-node-form").addEventListener("submit", async ev => {
  ev.preventDefault();
  const out = document.getElementById("fleet-node-out");
  const id = document.getElementById("fleet-node-id").value.trim().toLowerCase();
  const resp = await fetch("/v1/nodes/" + encodeURIComponent(id), { cache: "no-store" });
  const body = await resp.json();
  out.hidden = false;
  out.textContent = resp.ok ? JSON.stringify(body, null, 2) : body.message;
});
