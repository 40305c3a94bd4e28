// VRAMancer dashboard: history from /api/history, then live snapshots from /api/events (SSE).
// Charts: uPlot (vendored, MIT, see uPlot.LICENSE.txt). No network access beyond this server.
// For tests and people: <body data-samples> counts snapshots taken in, each card carries
// data-device, data-points (points in its chart) and data-last-used (bytes).
(function () {
  "use strict";
  const GiB = 1073741824;
  const WINDOW = 600;             // points kept per chart
  const cards = new Map();        // device id -> {el, chart, xs, used, total}
  let lastTs = -Infinity;
  let samples = 0;
  let historyLoaded = false;
  const pending = [];

  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function setStatus(text) { document.getElementById("status").textContent = text; }

  function chartWidth(card) { return Math.max(300, card.el.querySelector(".chart").clientWidth || 400); }

  function makeCard(id) {
    const waiting = document.getElementById("waiting");
    if (waiting) waiting.remove();
    const root = el("div", {class: "card", "data-device": id, "data-points": "0"});
    root.append(el("h3", {class: "title"}, id), el("div", {class: "usage"}, ""),
                el("div", {class: "bar"}), el("div", {class: "details"}, ""), el("div", {class: "chart"}));
    root.querySelector(".bar").append(el("div"));
    document.getElementById("devices").append(root);
    const card = {el: root, xs: [], used: [], total: [], chart: null};
    const opts = {
      width: chartWidth(card), height: 200,
      legend: {live: false},
      cursor: {points: {show: false}},
      scales: {x: {time: true}, y: {range: (u, min, max) => [0, Math.max(max || 0, 0.5) * 1.05]}},
      axes: [
        {stroke: "#8a96a6", grid: {stroke: "#2b3340"}, ticks: {stroke: "#2b3340"}},
        {stroke: "#8a96a6", grid: {stroke: "#2b3340"}, ticks: {stroke: "#2b3340"}, label: "GiB",
         values: (u, vals) => vals.map(v => v.toFixed(1))},
      ],
      series: [
        {},
        {label: "used GiB", stroke: "#5ec4ff", width: 2, fill: "rgba(94,196,255,0.15)", points: {show: false},
         value: (u, v) => v == null ? "n/a" : v.toFixed(2)},
        {label: "total GiB", stroke: "#8a96a6", width: 1, dash: [6, 4], points: {show: false},
         value: (u, v) => v == null ? "n/a" : v.toFixed(2)},
      ],
    };
    card.chart = new uPlot(opts, [[], [], []], root.querySelector(".chart"));
    cards.set(id, card);
    return card;
  }

  function card(id) { return cards.get(id) || makeCard(id); }

  function gib(bytes) { return bytes == null ? null : bytes / GiB; }

  function showDevice(sample, display) {
    const c = card(sample.device);
    const d = display || {};
    c.el.querySelector(".title").textContent = d.title || sample.device;
    c.el.querySelector(".usage").textContent = d.usage || "";
    c.el.querySelector(".details").textContent = (d.details || []).join("  ·  ");
    const fill = c.el.querySelector(".bar > div");
    const frac = d.fraction == null ? 0 : d.fraction;
    fill.style.width = (frac * 100).toFixed(1) + "%";
    fill.className = frac >= 0.95 ? "full" : frac >= 0.8 ? "high" : "";
    c.el.classList.toggle("lost", !!sample.lost);
    c.el.dataset.lastUsed = sample.used_bytes == null ? "" : String(sample.used_bytes);
  }

  function addPoint(sample, ts) {
    const c = card(sample.device);
    c.xs.push(ts); c.used.push(gib(sample.used_bytes)); c.total.push(gib(sample.total_bytes));
    if (c.xs.length > WINDOW) { c.xs.shift(); c.used.shift(); c.total.shift(); }
  }

  function redraw() {
    for (const c of cards.values()) {
      c.chart.setData([c.xs, c.used, c.total]);
      c.el.dataset.points = String(c.xs.length);
    }
  }

  function fillTable(id, rows, numericCols, emptyText) {
    const body = document.querySelector("#" + id + " tbody");
    body.replaceChildren();
    if (!rows.length) {
      const tr = el("tr");
      tr.append(el("td", {colspan: "5", class: "muted"}, emptyText));
      body.append(tr);
      return;
    }
    for (const row of rows) {
      const tr = el("tr");
      row.forEach((cell, i) => tr.append(el("td", numericCols.includes(i) ? {class: "num"} : {}, cell)));
      body.append(tr);
    }
  }

  function showDisplay(display) {
    if (!display) return;
    if (display.processes) fillTable("processes", display.processes, [3], display.no_processes || "no process reported");
    if (display.missing !== undefined) {
      const m = document.getElementById("missing");
      m.textContent = display.missing.length ? "missing: " + display.missing.join("; ") : "";
    }
    if (display.peaks) fillTable("peaks", display.peaks, [1, 4], "no samples yet");
    if (display.summary !== undefined) document.getElementById("top-phases").textContent = display.summary;
  }

  // One snapshot in: chart points always; labels and tables when `display` comes with it.
  function ingest(snap, display) {
    if (!snap || snap.timestamp <= lastTs) return false;
    lastTs = snap.timestamp;
    samples += 1;
    for (const s of snap.devices) addPoint(s, snap.timestamp);
    if (display) {
      for (const s of snap.devices) showDevice(s, (display.devices || {})[s.device]);
      showDisplay(display);
    }
    const when = new Date(snap.timestamp * 1000).toLocaleTimeString();
    setStatus("last sample " + when + (snap.phase ? " · phase " + snap.phase : "") + " · " + samples + " samples");
    document.body.dataset.samples = String(samples);
    document.body.dataset.lastTimestamp = String(snap.timestamp);
    return true;
  }

  function onEvent(ev) {
    const msg = JSON.parse(ev.data);
    if (!historyLoaded) { pending.push(msg); return; }
    if (ingest(msg.snapshot, msg.display)) redraw();
  }

  async function start() {
    const events = new EventSource("api/events");
    events.addEventListener("snapshot", onEvent);
    events.onopen = () => { document.body.dataset.connected = "true"; };
    events.onerror = () => { document.body.dataset.connected = "false"; setStatus("disconnected, retrying…"); };
    try {
      const hist = await (await fetch("api/history?limit=" + WINDOW)).json();
      for (const snap of hist.snapshots) ingest(snap, null);
      const now = await (await fetch("api/snapshot")).json();
      if (now.snapshot) {
        for (const s of now.snapshot.devices) showDevice(s, (now.display.devices || {})[s.device]);
        showDisplay(now.display);
      }
    } catch (e) {
      setStatus("could not load history: " + e);
    }
    historyLoaded = true;
    for (const msg of pending.splice(0)) ingest(msg.snapshot, msg.display);
    redraw();
  }

  window.addEventListener("resize", () => {
    for (const c of cards.values()) c.chart.setSize({width: chartWidth(c), height: 200});
  });
  start();
})();
