/* Device page: live values, history plots (uPlot), CSV, rename, bindkey with the doctor's verdict, delete. */
"use strict";

(() => {
  const mac = MT.macFromPath();
  const COLORS = { temperature_c: "#e4572e", humidity_pct: "#2e86de", battery_pct: "#2ca25f", voltage_v: "#8e44ad" };
  const FILL = { temperature_c: "rgba(228,87,46,.15)", humidity_pct: "rgba(46,134,222,.15)",
    battery_pct: "rgba(44,162,95,.15)", voltage_v: "rgba(142,68,173,.15)" };
  let range = "day";
  let device = null;
  let clock = Date.now() / 1000;
  const charts = {};
  window.mithermCharts = charts;
  let syncing = false;

  document.getElementById("mac").textContent = mac;

  function css(name) { return getComputedStyle(document.documentElement).getPropertyValue(name).trim(); }

  function renderDevice(d) {
    device = d;
    document.title = "mitherm — " + (d.name || d.mac);
    document.getElementById("title").textContent = d.name || d.model || d.mac;
    const badge = MT.keyBadge(d), holder = document.getElementById("key-badge");
    if (!(holder.firstChild && holder.firstChild.isEqualNode(badge))) holder.replaceChildren(badge);
    const v = d.values || {};
    const stale = d.stale || {};
    for (const q of ["temperature_c", "humidity_pct", "battery_pct", "voltage_v"]) {
      const e = document.querySelector(`[data-field="${q}"]`);
      e.textContent = MT.fmtValue(q, v[q]);
      e.classList.toggle("stale", q in stale);
      e.title = q in stale ? "last recorded " + MT.fmtTime(stale[q]) : "";
    }
    document.querySelector('[data-field="rssi"]').textContent =
      typeof d.rssi === "number" ? `${d.rssi} dBm via ${d.receiver || "?"}` : "–";
    const seen = document.querySelector('[data-field="last_seen"]');
    seen.textContent = d.online === false ? "not since start" : MT.fmtAge(clock, d.last_seen);
    seen.title = MT.fmtTime(d.last_seen);
    document.querySelector('[data-field="model"]').textContent = d.model || "–";
    document.querySelector('[data-field="firmware"]').textContent = d.firmware ? d.firmware.label : "–";
    const nameInput = document.getElementById("name");
    if (document.activeElement !== nameInput) nameInput.value = d.name || "";
    const cur = document.getElementById("key-current");
    if (d.key) {
      cur.replaceChildren("Stored key: ", MT.el("code", { text: d.key }), ` (${d.key_source || "manual"}). Paste a new one to change it.`);
    } else if (d.firmware && d.firmware.encrypted === false) {
      cur.textContent = "This device sends plain readings: no key needed.";
    } else {
      cur.textContent = "No key stored.";
    }
    document.getElementById("key-remove").classList.toggle("hidden", !d.key);
    document.body.dataset.keyStatus = d.online === false ? "unknown" : d.key_status;
  }

  async function loadDevice() {
    const r = await MT.api("GET", "/api/devices/" + encodeURIComponent(mac));
    if (!r.ok) {
      const nf = document.getElementById("not-found");
      nf.textContent = (r.data && r.data.error) || "This device is unknown.";
      nf.classList.remove("hidden");
      return null;
    }
    clock = r.data.clock;
    renderDevice(r.data.device);
    const cv = document.getElementById("current-verdict");
    if (r.data.device.diagnosis) MT.showVerdict(cv, r.data.device.diagnosis);
    else MT.showVerdict(cv, null);
    return r.data.device;
  }

  // --- charts ---------------------------------------------------------------------------------------
  function chartWidth() { return Math.max(300, document.getElementById("charts").clientWidth - 20); }

  function makeChart(q, data) {
    const spec = MT.QUANTITY[q];
    const s = data.series[q];
    const box = MT.el("div", { class: "chart", id: "chart-" + q }, MT.el("h3", { text: spec.label + " (" + spec.unit + ")" }));
    document.getElementById("charts").append(box);
    const hourly = data.kind === "hourly";
    const fmt = (u, v) => (v === null || v === undefined ? "–" : v.toFixed(spec.digits) + " " + spec.unit);
    const series = [{}, { label: hourly ? "mean" : spec.label, stroke: COLORS[q], width: 2, spanGaps: true, value: fmt,
      points: { show: data.t.length < 80 } }];
    const cols = [data.t, s.value];
    let bands;
    if (hourly) {
      series.push({ label: "min", stroke: FILL[q], width: 1, spanGaps: true, value: fmt },
        { label: "max", stroke: FILL[q], width: 1, spanGaps: true, value: fmt });
      cols.push(s.min, s.max);
      bands = [{ series: [3, 2], fill: FILL[q] }];
    }
    const axis = { stroke: css("--muted"), grid: { stroke: css("--line"), width: 1 }, ticks: { stroke: css("--line") } };
    const opts = {
      width: chartWidth(),
      height: 220,
      series,
      bands,
      cursor: { sync: { key: "mitherm" }, drag: { x: true, y: false } },
      scales: q === "battery_pct" ? { x: { time: true }, y: { range: [0, 100] } } : { x: { time: true } },
      axes: [axis, Object.assign({}, axis, { size: 78, values: (u, vals) => vals.map((v) => +v.toFixed(2) + " " + spec.unit) })],
      hooks: {
        setScale: [(u, key) => {
          if (key !== "x" || syncing) return;
          syncing = true;
          for (const other of Object.values(charts)) {
            if (other !== u) other.setScale("x", { min: u.scales.x.min, max: u.scales.x.max });
          }
          syncing = false;
        }],
      },
    };
    charts[q] = new uPlot(opts, cols, box);
  }

  async function loadHistory() {
    for (const [q, u] of Object.entries(charts)) { u.destroy(); delete charts[q]; }
    const holder = document.getElementById("charts");
    holder.replaceChildren();
    document.getElementById("csv").href = `/api/devices/${encodeURIComponent(mac)}/history.csv?range=${range}`;
    const r = await MT.api("GET", `/api/devices/${encodeURIComponent(mac)}/history?range=${range}`);
    if (!r.ok) return;
    const data = r.data;
    const wanted = ["temperature_c", "humidity_pct", "battery_pct"];
    if (!data.series.battery_pct && data.series.voltage_v) wanted[2] = "voltage_v";
    let any = false;
    for (const q of wanted) {
      if (data.series[q] && data.t.length) { makeChart(q, data); any = true; }
    }
    if (!any) holder.append(MT.el("div", { class: "chart" }, MT.el("div", { class: "nodata", text: "No history for this range yet." })));
    const kind = !any ? "" : data.kind === "hourly" ? "Hourly mean with min–max band. " : "Every reading. ";
    document.getElementById("range-note").textContent = kind + "Drag across a chart to zoom, double-click to zoom out.";
    document.body.dataset.chartsReady = String(Object.keys(charts).length);
  }

  for (const b of document.querySelectorAll("#ranges button[data-range]")) {
    b.addEventListener("click", () => {
      range = b.dataset.range;
      for (const o of document.querySelectorAll("#ranges button[data-range]")) o.setAttribute("aria-pressed", String(o === b));
      loadHistory();
    });
  }
  document.getElementById("reset-zoom").addEventListener("click", () => {
    for (const u of Object.values(charts)) {
      const t = u.data[0];
      if (t.length) u.setScale("x", { min: t[0], max: t[t.length - 1] });
    }
  });
  window.addEventListener("resize", () => {
    for (const u of Object.values(charts)) u.setSize({ width: chartWidth(), height: 220 });
  });

  // --- rename ---------------------------------------------------------------------------------------
  document.getElementById("rename-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const out = document.getElementById("rename-result");
    const r = await MT.api("POST", `/api/devices/${encodeURIComponent(mac)}/name`, { name: document.getElementById("name").value });
    out.textContent = r.ok ? "Saved." : (r.data && r.data.error) || "Failed.";
    if (r.ok) loadDevice();
  });

  // --- key ------------------------------------------------------------------------------------------
  const verdictBox = document.getElementById("verdict");
  const forceBtn = document.getElementById("key-force");

  async function submitKey(force) {
    const keyInput = document.getElementById("key");
    const key = keyInput.value;
    const btn = document.getElementById("key-save");
    btn.disabled = true;
    try {
      const r = await MT.api("POST", `/api/devices/${encodeURIComponent(mac)}/key`,
        { key, source: document.getElementById("key-source").value, force });
      if (!r.data || !r.data.diagnosis) {
        MT.showVerdict(verdictBox, { verdict: "invalid_key", advice: (r.data && r.data.error) || "request failed" });
        return;
      }
      const dx = r.data.diagnosis;
      const message = r.data.saved
        ? "Saved: the gateway uses this key from now on."
        : ["invalid_key", "placeholder_key"].includes(dx.verdict)
          ? "Not saved."
          : "Not saved: the doctor rejects this key. Fix it, or save it anyway if you are sure.";
      MT.showVerdict(verdictBox, dx, { saved: r.data.saved, message });
      verdictBox.dataset.saved = String(r.data.saved);
      forceBtn.classList.toggle("hidden", r.data.saved || ["invalid_key", "placeholder_key"].includes(dx.verdict));
      if (r.data.saved) { keyInput.value = ""; renderDevice(r.data.device); loadDevice(); }
    } finally {
      btn.disabled = false;
    }
  }
  document.getElementById("key-form").addEventListener("submit", (e) => { e.preventDefault(); submitKey(false); });
  forceBtn.addEventListener("click", () => submitKey(true));
  document.getElementById("key-remove").addEventListener("click", async () => {
    if (!confirm("Remove the stored key of " + mac + "?")) return;
    await MT.api("DELETE", `/api/devices/${encodeURIComponent(mac)}/key`);
    MT.showVerdict(verdictBox, null);
    loadDevice();
  });

  // --- delete ---------------------------------------------------------------------------------------
  document.getElementById("delete").addEventListener("click", async () => {
    if (!confirm("Forget " + (device && device.name || mac) + " with its key and all its history?")) return;
    const r = await MT.api("DELETE", `/api/devices/${encodeURIComponent(mac)}`);
    if (r.ok) location.href = "/";
  });

  // --- live -----------------------------------------------------------------------------------------
  MT.live((devices, c, changed) => {
    clock = c;
    const d = devices.get(mac);
    if (d) {
      const was = device && device.key_status;
      renderDevice(d);
      if (was && was !== d.key_status) loadDevice();
    }
  });

  loadDevice().then(() => loadHistory()).then(() => { document.body.dataset.ready = "1"; });
})();
