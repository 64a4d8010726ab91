/* mitherm dashboard: shared helpers (no framework, no build step). */
"use strict";

const MT = (() => {
  let session = null;

  async function getSession(force) {
    if (!session || force) {
      const r = await fetch("/api/session", { credentials: "same-origin", cache: "no-store" });
      session = await r.json();
    }
    return session;
  }

  /** JSON API call; state-changing methods carry the CSRF token. Resolves to {ok, status, data}. */
  async function api(method, url, body) {
    const headers = { Accept: "application/json" };
    if (method !== "GET") {
      headers["X-CSRF-Token"] = (await getSession()).csrf;
      headers["Content-Type"] = "application/json";
    }
    const r = await fetch(url, {
      method,
      headers,
      credentials: "same-origin",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (r.status === 401 && url !== "/api/login" && location.pathname !== "/login") {
      location.href = "/login?next=" + encodeURIComponent(location.pathname + location.search);
    }
    let data = null;
    try { data = await r.json(); } catch (e) { data = null; }
    return { ok: r.ok, status: r.status, data };
  }

  const QUANTITY = {
    temperature_c: { label: "Temperature", unit: "°C", digits: 1 },
    humidity_pct: { label: "Humidity", unit: "%", digits: 0 },
    battery_pct: { label: "Battery", unit: "%", digits: 0 },
    voltage_v: { label: "Battery voltage", unit: "V", digits: 2 },
  };

  function fmtValue(q, v) {
    if (v === null || v === undefined || v === "") return "–";
    const spec = QUANTITY[q];
    if (typeof v !== "number" || !spec) return String(v);
    return v.toFixed(spec.digits) + (spec.unit === "°C" ? " °C" : " " + spec.unit);
  }

  function fmtAge(clock, t) {
    if (!t) return "never";
    const s = Math.max(0, clock - t);
    if (s < 60) return Math.round(s) + " s ago";
    if (s < 3600) return Math.round(s / 60) + " min ago";
    if (s < 86400 * 2) return (s / 3600).toFixed(1) + " h ago";
    return Math.round(s / 86400) + " d ago";
  }

  function fmtTime(t) {
    if (!t) return "–";
    return new Date(t * 1000).toLocaleString();
  }

  const KEY_LABEL = {
    verified: "verified",
    key_failed: "key failed",
    missing: "key missing",
    not_needed: "not needed",
    unknown: "waiting",
  };

  const VERDICT = {
    ok: "The key works",
    wrong_key: "Wrong key",
    key_of_other_device: "Key of another device",
    key_outdated: "Key outdated (device re-paired)",
    looks_like_token: "That is a token, not a bindkey",
    placeholder_key: "Placeholder key (no key in the cloud)",
    not_encrypted: "No key needed",
    no_encrypted_frames: "Waiting for an encrypted reading",
    device_not_seen: "Device not seen yet",
    invalid_key: "Not a valid key",
  };
  const VERDICT_UNDECIDED = new Set(["no_encrypted_frames", "device_not_seen"]);

  function keyBadge(d) {
    const span = document.createElement("span");
    const status = d.online === false ? "unknown" : d.key_status;
    span.className = "badge " + status;
    span.dataset.status = status;
    let text = d.online === false ? "not seen" : KEY_LABEL[status] || status;
    if (status === "key_failed" && d.key_verdict) text += ": " + (VERDICT[d.key_verdict] || d.key_verdict);
    span.textContent = text;
    if (d.key_verdict) span.title = d.key_verdict;
    return span;
  }

  /** Fill a .verdict element from a Diagnosis JSON (or clear it with null). */
  function showVerdict(el, dx, extra) {
    el.innerHTML = "";
    if (!dx) { el.className = "verdict hidden"; return; }
    const cls = dx.verdict === "ok" ? "ok"
      : VERDICT_UNDECIDED.has(dx.verdict) || dx.verdict === "not_encrypted" ? "wait" : "bad";
    el.className = "verdict " + cls;
    el.dataset.verdict = dx.verdict;
    const head = document.createElement("div");
    const code = document.createElement("span");
    code.className = "code";
    code.textContent = VERDICT[dx.verdict] || dx.verdict;
    head.append(code, document.createTextNode(" "));
    const tag = document.createElement("code");
    tag.textContent = dx.verdict;
    head.append(tag);
    if (dx.frames && dx.frames.total) {
      const f = document.createElement("span");
      f.className = "muted";
      f.textContent = ` — ${dx.frames.total} frame(s) seen, ${dx.frames.with_data} with data` +
        (dx.frames.decrypted || dx.frames.failed ? `, ${dx.frames.decrypted} decrypted, ${dx.frames.failed} failed` : "");
      head.append(f);
    }
    const p = document.createElement("p");
    p.textContent = dx.advice || "";
    el.append(head, p);
    if (extra && extra.message) {
      const m = document.createElement("p");
      m.className = "outcome";
      m.textContent = extra.message;
      el.append(m);
    }
  }

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else if (k.startsWith("data-")) e.dataset[k.slice(5).replace(/-([a-z])/g, (_, c) => c.toUpperCase())] = v;
      else e.setAttribute(k, v);
    }
    for (const c of children) if (c !== null && c !== undefined) e.append(c);
    return e;
  }

  /** Live device store fed by /api/events; calls onChange(devicesMap, clock, changedMacs). */
  function live(onChange) {
    const devices = new Map();
    let clock = Date.now() / 1000;
    const status = document.getElementById("live");
    let es = null;
    function connect() {
      es = new EventSource("/api/events");
      es.addEventListener("open", () => { if (status) { status.className = "on"; status.textContent = "live"; } });
      es.addEventListener("error", () => { if (status) { status.className = "off"; status.textContent = "reconnecting"; } });
      es.addEventListener("snapshot", (ev) => {
        const msg = JSON.parse(ev.data);
        devices.clear();
        for (const d of msg.devices) devices.set(d.mac, d);
        clock = msg.clock;
        onChange(devices, clock, new Set(devices.keys()), true);
      });
      es.addEventListener("update", (ev) => {
        const msg = JSON.parse(ev.data);
        const changed = new Set();
        for (const d of msg.devices) { devices.set(d.mac, d); changed.add(d.mac); }
        for (const m of msg.removed || []) { devices.delete(m); changed.add(m); }
        for (const [m, s] of Object.entries(msg.seen || {})) {
          const d = devices.get(m);
          if (d) { d.last_seen = s[0]; d.rssi = s[1]; d.receiver = s[2]; }
        }
        clock = msg.clock;
        onChange(devices, clock, changed, false);
      });
    }
    connect();
    return { devices, close: () => es && es.close() };
  }

  async function setupHeader() {
    const s = await getSession();
    const out = document.getElementById("logout");
    if (out && s.auth_required) {
      out.classList.remove("hidden");
      out.addEventListener("click", async (e) => {
        e.preventDefault();
        await api("POST", "/api/logout", {});
        location.href = "/login";
      });
    }
  }

  function macFromPath() {
    const parts = location.pathname.split("/");
    return decodeURIComponent(parts[parts.length - 1] || "").toUpperCase();
  }

  return { api, getSession, QUANTITY, fmtValue, fmtAge, fmtTime, KEY_LABEL, VERDICT, VERDICT_UNDECIDED, keyBadge,
    showVerdict, el, live, setupHeader, macFromPath };
})();

document.addEventListener("DOMContentLoaded", () => { MT.setupHeader(); });
