/* Devices page: every known device, live over SSE, sortable; unknown nearby devices apart. */
"use strict";

(() => {
  const KEY_ORDER = { key_failed: 0, missing: 1, unknown: 2, verified: 3, not_needed: 4 };
  const sortState = { devices: { key: "name", dir: 1 }, nearby: { key: "rssi", dir: -1 } };
  let store = null;
  let clock = 0;

  function sortValue(d, key) {
    switch (key) {
      case "name": return (d.name || d.mac).toLowerCase();
      case "firmware": return d.firmware ? d.firmware.label : "";
      case "key": return KEY_ORDER[d.online === false ? "unknown" : d.key_status] ?? 9;
      case "temperature_c": case "humidity_pct": case "battery_pct": {
        const v = d.values ? d.values[key] : null;
        return typeof v === "number" ? v : null;
      }
      case "rssi": return typeof d.rssi === "number" ? d.rssi : null;
      case "last_seen": return d.last_seen || 0;
      default: return (d[key] || "").toString().toLowerCase();
    }
  }

  function sorted(list, table) {
    const { key, dir } = sortState[table];
    return list.sort((a, b) => {
      const va = sortValue(a, key), vb = sortValue(b, key);
      if (va === vb) return a.mac < b.mac ? -1 : 1;
      if (va === null) return 1;
      if (vb === null) return -1;
      return (va < vb ? -1 : 1) * dir;
    });
  }

  function cell(row, field, content, cls) {
    let td = row.querySelector(`td[data-field="${field}"]`);
    if (!td) {
      td = document.createElement("td");
      td.dataset.field = field;
      if (cls) td.className = cls;
      row.append(td);
    }
    if (typeof content === "string") {
      if (td.textContent !== content) {
        const had = td.textContent !== "";
        td.textContent = content;
        if (had && cls === "num") { td.classList.remove("flash"); void td.offsetWidth; td.classList.add("flash"); }
      }
    } else if (!(td.childNodes.length === 1 && td.firstChild.isEqualNode(content))) {
      td.replaceChildren(content);
    }
    return td;
  }

  function renderRow(tbody, d, nearby) {
    let row = tbody.querySelector(`tr[data-mac="${d.mac}"]`);
    if (!row) {
      row = document.createElement("tr");
      row.dataset.mac = d.mac;
    }
    row.classList.toggle("offline", d.online === false);
    row.dataset.keyStatus = d.online === false ? "unknown" : d.key_status;
    const v = d.values || {};
    if (nearby) {
      cell(row, "mac", MT.el("a", { href: "/device/" + d.mac, class: "mono", text: d.mac }));
      cell(row, "name", d.name || "–");
    } else {
      const link = MT.el("a", { href: "/device/" + d.mac, text: d.name || d.mac });
      cell(row, "name", link);
    }
    cell(row, "model", d.model || "–");
    cell(row, "firmware", d.firmware ? d.firmware.label : "–");
    const stale = d.stale || {};
    for (const q of nearby ? ["temperature_c"] : ["temperature_c", "humidity_pct", "battery_pct"]) {
      const td = cell(row, q, MT.fmtValue(q, v[q]), "num");
      td.classList.toggle("stale", q in stale);
      td.title = q in stale ? "last recorded " + MT.fmtTime(stale[q]) + " (not received since the gateway started)" : "";
    }
    cell(row, "rssi", typeof d.rssi === "number" ? d.rssi + " dBm" : "–", "num");
    if (!nearby) cell(row, "receiver", d.receiver || "–");
    const seen = cell(row, "last_seen", MT.fmtAge(clock, d.last_seen));
    seen.title = MT.fmtTime(d.last_seen);
    cell(row, "key", MT.keyBadge(d));
    if (nearby) cell(row, "add", MT.el("a", { href: "/add?mac=" + encodeURIComponent(d.mac), class: "button", text: "Add" }));
    return row;
  }

  function renderTable(id, list, nearby) {
    const table = document.getElementById(id);
    const tbody = table.querySelector("tbody");
    const rows = sorted(list, id).map((d) => renderRow(tbody, d, nearby));
    const keep = new Set(rows);
    for (const r of [...tbody.children]) if (!keep.has(r)) r.remove();
    rows.forEach((r, i) => { if (tbody.children[i] !== r) tbody.insertBefore(r, tbody.children[i] || null); });
    document.getElementById(id === "devices" ? "no-devices" : "no-nearby").classList.toggle("hidden", list.length > 0);
    for (const th of table.querySelectorAll("th[data-sort]")) {
      const s = sortState[id];
      th.setAttribute("aria-sort", th.dataset.sort === s.key ? (s.dir > 0 ? "ascending" : "descending") : "none");
    }
  }

  function render() {
    if (!store) return;
    const all = [...store.devices.values()];
    renderTable("devices", all.filter((d) => d.known), false);
    renderTable("nearby", all.filter((d) => !d.known), true);
    document.body.dataset.ready = "1";
  }

  for (const id of ["devices", "nearby"]) {
    for (const th of document.querySelectorAll(`#${id} th[data-sort]`)) {
      th.addEventListener("click", () => {
        const s = sortState[id];
        if (s.key === th.dataset.sort) s.dir = -s.dir;
        else { s.key = th.dataset.sort; s.dir = 1; }
        render();
      });
    }
  }

  store = MT.live((devices, c) => { clock = c; render(); });
})();
