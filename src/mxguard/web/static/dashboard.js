// The overview's chart and live refresh. The page reads without it; this only
// draws the per-minute chart (Chart.js, vendored) and polls /api/overview.
(function () {
  "use strict";
  var REFRESH_MS = 10000;
  var COLORS = {
    accept: "#3a9a3a", add_header: "#a050c0", rewrite_subject: "#c070d0",
    quarantine: "#7a3d8a", defer: "#e0a020", defer_if_permit: "#c08010",
    tempfail: "#d07000", reject: "#c83232", discard: "#801818"
  };
  var holder = document.getElementById("overview-data");
  var canvas = document.getElementById("timeline");
  if (!holder || !canvas || typeof Chart === "undefined") { return; }
  var hours = JSON.parse(holder.textContent).hours;

  function label(ts) {
    var d = new Date(ts * 1000);
    return d.toISOString().substring(11, 16);
  }
  function datasets(data) {
    return Object.keys(data.timeline.series).sort().map(function (action) {
      return {
        label: action, data: data.timeline.series[action],
        borderColor: COLORS[action] || "#557", backgroundColor: COLORS[action] || "#557",
        borderWidth: 0, barPercentage: 1.0, categoryPercentage: 0.9
      };
    });
  }
  var first = JSON.parse(holder.textContent);
  var chart = new Chart(canvas, {
    type: "bar",
    data: { labels: first.timeline.starts.map(label), datasets: datasets(first) },
    options: {
      animation: false, responsive: true, maintainAspectRatio: false,
      interaction: { mode: "index", intersect: false },
      scales: { y: { stacked: true, beginAtZero: true,
                     title: { display: true, text: "messages / min" } },
                x: { stacked: true, ticks: { maxTicksLimit: 12 } } },
      plugins: { legend: { position: "bottom" } }
    }
  });

  function fillTable(id, rows, href) {
    var body = document.querySelector("#" + id + " tbody");
    if (!body) { return; }
    while (body.firstChild) { body.removeChild(body.firstChild); }
    if (!rows.length) {
      var tr0 = body.insertRow(); var td0 = tr0.insertCell();
      td0.colSpan = 2; td0.className = "muted"; td0.textContent = "none";
      return;
    }
    rows.forEach(function (row) {
      var tr = body.insertRow();
      var a = document.createElement("a");
      a.href = href + encodeURIComponent(row[0]);
      a.textContent = row[0] || "<>";
      tr.insertCell().appendChild(a);
      var n = tr.insertCell(); n.className = "num"; n.textContent = row[1];
    });
  }
  function update(data) {
    chart.data.labels = data.timeline.starts.map(label);
    chart.data.datasets = datasets(data);
    chart.update();
    fillTable("top-symbols", data.top_symbols, "/history?symbol=");
    fillTable("top-senders", data.top_senders, "/history?action=reject&sender=");
    fillTable("top-clients", data.top_clients, "/history?action=reject&client=");
    var totals = document.getElementById("totals");
    if (totals) {
      var parts = Object.keys(data.totals).sort().map(function (a) { return a + " " + data.totals[a]; });
      totals.textContent = parts.length ? parts.join(" \u00b7 ") : "No messages in this time.";
    }
    var stamp = document.getElementById("refreshed");
    if (stamp) { stamp.textContent = "live, as of " + new Date(data.now * 1000).toISOString().substring(0, 19).replace("T", " ") + " UTC"; }
  }
  function poll() {
    fetch("/api/overview?hours=" + hours, { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (data) { if (data) { update(data); } })
      .catch(function () { /* the daemon is restarting: try again later */ })
      .then(function () { window.setTimeout(poll, REFRESH_MS); });
  }
  window.setTimeout(poll, REFRESH_MS);
}());
