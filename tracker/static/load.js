// Bandwidth and load (issue 18): follows dashboard.js's refreshes, for the app chosen in the
// fleet section. From /v1/apps/APP/load: the forecast recorded at each recent event of a build
// (publish, promote, rollout raise) beside what followed (a table, and a chart of one event's
// CDN egress per minute, predicted and actual), and the recommended release hour with the
// hour-of-day histogram it comes from.
// Uses dashboard.js's helpers (fmtBytes, byteUnit, barChart, setText) and fleet.js's
// timeChart. What a chart drew is in data-* attributes, for the tests.
"use strict";
const LOAD_COLORS = ["#4a7bd0", "#e76f51"];  // predicted, actual (the CDN's orange)
const LOAD_MINUTES = 1440;                   // minutes drawn at most per line
let loadEvent = null;                        // the event whose chart is shown (null: newest)

// [[minute, bytes], ...] with the minutes nothing was counted filled with 0, from `start`
// for `minutes` minutes
function perMinute(points, start, minutes) {
  const byMinute = new Map(points.map(([t, b]) => [t, b]));
  const out = [];
  for (let i = 0; i < Math.min(minutes, LOAD_MINUTES); i++) {
    const t = start + 60 * i;
    out.push([t, byMinute.get(t) || 0]);
  }
  return out;
}

function hh(h) { return String(h).padStart(2, "0") + ":00"; }

function renderHour(hour) {
  const days = hour.days === 1 ? "1 day" : hour.days + " days";
  setText("load-hour", hour.recommended_hour === null ? "no announces counted yet" :
    "Recommended release hour: " + hh(hour.recommended_hour) + " UTC (the busiest " +
    hour.window_hours + " h of the fleet start then: " + pct(hour.recommended_share) +
    " of " + hour.announces + " announces over " + days + "); quietest hour: " +
    hh(hour.quietest_hour) + " UTC");
  const el = document.getElementById("load-hour");
  el.className = hour.recommended_hour === null ? "muted" : "";
  el.dataset.hour = hour.recommended_hour === null ? "" : String(hour.recommended_hour);
  barChart(document.getElementById("chart-hours"), hour.histogram.map((_, h) => String(h)),
           [hour.histogram], [LOAD_COLORS[0]],
           { x: "Hour of day (UTC)", y: "Announces", names: ["Announces (nodes online)"] });
}

// what a forecast was made at, in words (forecasts older than events were publishes)
function eventName(f) {
  if (f.event === "promote") return "promote";
  if (f.event === "rollout-raise") return "rollout " + f.was_percent + "% → " + f.percent + "%";
  if (f.event === "rollout-complete") return "rollout " + f.was_percent + "% → 100%";
  return f.percent < 100 ? "publish at " + f.percent + "%" : "publish";
}

function eventKey(f) { return f.build + "/" + f.channel + "/" + f.at; }

function forecastRow(f) {
  const a = f.actual;
  const ratio = a.total_ratio === null ? "–" : a.total_ratio.toFixed(2);
  const cells = ["build " + f.build, f.channel, eventName(f),
    new Date(f.at * 1000).toISOString().slice(0, 16).replace("T", " "),
    String(Math.round(f.adopters)), fmtBytes(f.need_bytes), fmtBytes(f.cdn_total),
    fmtBytes(a.cdn_predicted_so_far), fmtBytes(a.cdn_actual_total),
    fmtBytes(f.cdn_peak_per_min) + " / " + fmtBytes(a.cdn_actual_peak_per_min), ratio,
    fmtBytes(f.patches_total || 0) + " / " + fmtBytes(a.patches_actual_total || 0)];
  const tr = document.createElement("tr");
  tr.dataset.build = String(f.build);
  tr.dataset.event = f.event || "publish";
  tr.title = "show this event's chart";
  cells.forEach(v => { const td = document.createElement("td"); td.textContent = v; tr.append(td); });
  tr.addEventListener("click", () => { loadEvent = eventKey(f); refresh(); });
  return tr;
}

function renderForecasts(list) {
  const tbody = document.querySelector("#load-forecasts tbody");
  if (!list.length) {
    tbody.replaceChildren(emptyRow(12, "no forecast yet"));
  } else {
    tbody.replaceChildren(...list.map(forecastRow));
  }
  const f = list.find(x => eventKey(x) === loadEvent) || list[0];
  const canvas = document.getElementById("chart-forecast");
  const caption = canvas.closest("figure").querySelector("figcaption");
  if (!f) {
    caption.textContent = "CDN egress per minute: predicted at each event vs actual";
    timeChart(canvas, [], { x: "Time (UTC, per minute)", y: "CDN egress per minute" },
              LOAD_COLORS);
    return;
  }
  caption.textContent = "CDN egress per minute of build " + f.build + " on " + f.channel +
    ": predicted at " + eventName(f) + " vs actual";
  const start = Math.floor(f.at / 60) * 60;
  const lastPredicted = f.predicted.length ? f.predicted[f.predicted.length - 1][0] : start;
  const elapsed = Math.floor(f.actual.elapsed_s / 60);
  const predicted = perMinute(f.predicted, start, Math.max((lastPredicted - start) / 60 + 1,
                                                           elapsed));
  const actual = perMinute(f.actual.actual, start, elapsed);
  const top = Math.max(1, ...predicted.map(p => p[1]), ...actual.map(p => p[1]));
  const [unit, div] = byteUnit(top);
  const scale = pts => pts.map(([t, b]) => [t, +(b / div).toFixed(3)]);
  timeChart(canvas, [
    // the forecast wide underneath, so that it shows around the actual line where they agree
    { name: "Predicted at " + eventName(f) + " (total " + fmtBytes(f.cdn_total) + ")",
      points: scale(predicted), width: 5 },
    { name: "Actual (so far " + fmtBytes(f.actual.cdn_actual_total) + ")", points: scale(actual) },
  ], { x: "Time (UTC, per minute)", y: "CDN egress per minute (" + unit + ")" }, LOAD_COLORS);
  canvas.dataset.build = String(f.build);
  canvas.dataset.event = f.event || "publish";
}

async function renderLoad(stats) {
  const select = document.getElementById("fleet-app");
  const app = select.value || [...new Set(stats.releases.map(r => r.app))].sort()[0];
  if (!app) {  // no node seen yet: empty charts with their axes, not blank boxes
    renderHour({ recommended_hour: null, histogram: new Array(24).fill(0) });
    renderForecasts([]);
    return;
  }
  const resp = await fetch("/v1/apps/" + encodeURIComponent(app) + "/load", { cache: "no-store" });
  if (!resp.ok) return;
  const load = await resp.json();
  renderHour(load.release_hour);
  renderForecasts(load.forecasts);
  const section = document.getElementById("load");
  section.dataset.refreshes = String(Number(section.dataset.refreshes || 0) + 1);
}

// chained after fleet.js's render, as it chains after dashboard.js's
const renderBeforeLoad = render;
render = function (stats) {  // eslint-disable-line no-global-assign
  renderBeforeLoad(stats);
  renderLoad(stats);
};
if (document.body.dataset.refreshes) refresh();  // the first refresh came before this script
