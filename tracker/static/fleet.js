// Fleet view and alerts banner (issue 18): follows dashboard.js's refreshes. For each refresh
// of /v1/stats it shows the alerts the tracker evaluated (stats.alerts, the conditions of
// docs/alerts.yml) and the chosen app's fleet (/v1/apps/APP/fleet): nodes per build, client
// versions and the adoption curve of each build. Uses dashboard.js's helpers (timeChart,
// pct, setText). What a chart drew is in data-* attributes, for the tests.
"use strict";
const FLEET_LINES = SERIES_COLORS.length;  // builds drawn at most (the newest)

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
  if (!chosen) {  // no node seen yet: the chart's axes and "no samples yet", not a blank box
    timeChart(document.getElementById("chart-fleet"), [],
              { x: "Time (UTC)", y: "Nodes running the build" });
    return;
  }
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
