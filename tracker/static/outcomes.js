// Install outcomes over time (issue 18): follows dashboard.js's refreshes. For each refresh it
// reads every build's hourly series (/v1/outcomes?hours=OUTCOME_HOURS) and draws the success
// rate of each build per hour, and the failures by code and the rollbacks per hour. Uses
// dashboard.js's helpers (timeChart, barChart, SERIES_COLORS). What a chart drew is in data-*
// attributes, for the tests.
"use strict";
const OUTCOME_HOURS = 48;

function hourLabel(t, span) {
  const iso = new Date(t * 1000).toISOString();
  return (span >= 86400 ? iso.slice(5, 10) + " " : "") + iso.slice(11, 13) + ":00";
}

function renderOutcomeSeries(releases) {
  const built = releases.filter(b => b.series && b.series.length).slice(0, SERIES_COLORS.length);
  const rate = document.getElementById("chart-outcome-rate");
  timeChart(rate, built.map(b => ({
    name: b.app + " " + (b.version || "?") + " (build " + b.build + ")",
    points: b.series.filter(h => h.success + h.failure)
      .map(h => [h.at, +(100 * h.success / (h.success + h.failure)).toFixed(1)]),
  })), { x: "Hour (UTC)", y: "Success rate (% of the hour's attempts)" });
  rate.dataset.builds = JSON.stringify(built.map(b => b.build));

  // failures by code and rollbacks from any build, per hour, stacked
  const hours = [...new Set(built.flatMap(b => b.series.map(h => h.at)))].sort((a, b) => a - b);
  const codes = [...new Set(built.flatMap(b => b.series.flatMap(h => Object.keys(h.failure_codes))))]
    .sort();
  const sum = (at, pick) => built.reduce((s, b) => s + b.series.filter(h => h.at === at)
    .reduce((t, h) => t + pick(h), 0), 0);
  const series = codes.map(c => hours.map(at => sum(at, h => h.failure_codes[c] || 0)));
  series.push(hours.map(at => sum(at, h => h.rollbacks_from)));
  const span = hours.length ? hours[hours.length - 1] - hours[0] : 0;
  const colors = series.map((_, i) => i === codes.length ? "#9aa0a6" :
                            SERIES_COLORS[(i + 4) % SERIES_COLORS.length]);
  barChart(document.getElementById("chart-outcome-codes"), hours.map(t => hourLabel(t, span)),
           series, colors,
           { x: "Hour (UTC)", y: "Reports per hour",
             names: [...codes.map(c => "Failed: " + c), "Rolled back from the build"] });
}

async function renderOutcomes() {
  const resp = await fetch("/v1/outcomes?hours=" + OUTCOME_HOURS, { cache: "no-store" });
  if (!resp.ok) return;
  renderOutcomeSeries((await resp.json()).releases);
  const figure = document.getElementById("outcome-charts");
  figure.dataset.refreshes = String(Number(figure.dataset.refreshes || 0) + 1);
}

// chained after load.js's render, as it chains after fleet.js's and dashboard.js's
const renderBeforeOutcomes = render;
render = function (stats) {  // eslint-disable-line no-global-assign
  renderBeforeOutcomes(stats);
  renderOutcomes();
};
if (document.body.dataset.refreshes) refresh();  // the first refresh came before this script
