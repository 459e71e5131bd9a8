// kongtask dashboard: live counts over server-sent events (pausable), and the
// "select all" box of the job list. Served by the dashboard itself (CSP: 'self').
(function () {
  "use strict";
  var root = document.documentElement.getAttribute("data-base") || "";
  var status = document.getElementById("live");
  var toggle = document.getElementById("live-toggle");
  var source = null;
  var paused = window.localStorage.getItem("kongtask-live") === "paused";

  function show(text, isPaused) {
    if (!status) return;
    status.textContent = text;
    status.className = isPaused ? "paused" : "";
  }

  function onTotals(event) {
    var data = JSON.parse(event.data);
    Object.keys(data.totals).forEach(function (state) {
      document.querySelectorAll('[data-state="' + state + '"]').forEach(function (node) {
        node.textContent = String(data.totals[state]);
      });
    });
    show("live · " + data.now, false);
    document.body.setAttribute("data-updated", data.now);
  }

  function start() {
    if (source || !window.EventSource) return;
    source = new EventSource(root + "/events");
    source.addEventListener("totals", onTotals);
    source.onerror = function () { show("live · reconnecting", false); };
  }

  function stop() {
    if (source) { source.close(); source = null; }
    show("paused", true);
  }

  if (toggle) {
    toggle.addEventListener("click", function () {
      paused = !paused;
      window.localStorage.setItem("kongtask-live", paused ? "paused" : "live");
      toggle.textContent = paused ? "Resume live updates" : "Pause live updates";
      if (paused) { stop(); } else { start(); }
    });
    toggle.textContent = paused ? "Resume live updates" : "Pause live updates";
  }
  if (paused) { stop(); } else { start(); }

  var all = document.getElementById("select-all");
  if (all) {
    all.addEventListener("change", function () {
      document.querySelectorAll('input[name="ids"]').forEach(function (box) {
        box.checked = all.checked;
      });
    });
  }
}());
