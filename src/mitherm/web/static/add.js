/* "Add a sensor": pick the device, learn its firmware, where its key comes from, paste it, verdict at once. */
"use strict";

(() => {
  let chosen = null; // device JSON (or {mac} for a typed address)
  let source = "manual";
  let checkTimer = null;
  let lastChecked = "";

  const $ = (id) => document.getElementById(id);

  function needsKey(d) {
    return !d.firmware || d.firmware.encrypted !== false;
  }

  async function loadCandidates() {
    const r = await MT.api("GET", "/api/devices");
    const box = $("candidates");
    if (!r.ok) { box.textContent = "Cannot reach the gateway."; return; }
    const list = r.data.devices
      .filter((d) => d.online !== false && (!d.known || d.key_status === "missing" || d.key_status === "key_failed"))
      .sort((a, b) => (b.rssi ?? -999) - (a.rssi ?? -999));
    box.replaceChildren();
    if (!list.length) { box.append(MT.el("span", { class: "muted", text: "No unconfigured device heard yet." })); }
    for (const d of list) {
      const radio = MT.el("input", { type: "radio", name: "device", value: d.mac });
      if (chosen && chosen.mac === d.mac) radio.checked = true;
      radio.addEventListener("change", () => choose(d));
      const label = MT.el("label", { class: "choice", "data-mac": d.mac }, radio,
        MT.el("span", { class: "mono", text: d.mac }),
        MT.el("span", { text: [d.name, d.model].filter(Boolean).join(" · ") || "unnamed" }),
        MT.el("span", { class: "muted", text: (d.firmware ? d.firmware.label : "") + (typeof d.rssi === "number" ? ` · ${d.rssi} dBm` : "") }),
        MT.keyBadge(d));
      box.append(label);
    }
    const want = new URLSearchParams(location.search).get("mac");
    if (want && !chosen) {
      const d = r.data.devices.find((x) => x.mac === want.toUpperCase());
      choose(d || { mac: want.toUpperCase() });
      const radio = document.querySelector(`input[name=device][value="${want.toUpperCase()}"]`);
      if (radio) radio.checked = true;
    }
  }

  async function choose(d) {
    chosen = d;
    let info = d;
    const r = await MT.api("GET", "/api/devices/" + encodeURIComponent(d.mac));
    if (r.ok) info = r.data.device;
    chosen = info;
    showFirmware(info);
  }

  function showFirmware(d) {
    const fw = d.firmware || { kind: "unknown", label: "Not known yet", encrypted: null };
    const box = $("firmware");
    box.replaceChildren();
    const p = (text) => MT.el("p", { text });
    box.append(MT.el("p", {}, MT.el("b", { text: fw.label }), ` — ${d.mac}` + (d.model ? ` (${d.model})` : "")));
    let recommended = null;
    if (fw.kind === "stock" && fw.encrypted) {
      box.append(p("This sensor runs the manufacturer's firmware and encrypts its readings: you need its bindkey, " +
        "a per-device key made when it was paired."));
      recommended = "cloud";
    } else if ((fw.kind === "custom" || fw.kind === "bthome") && fw.encrypted) {
      box.append(p("This sensor encrypts with a key set in its firmware (custom firmware or BTHome): use that key."));
      recommended = "pvvx";
    } else if (fw.encrypted === false) {
      box.append(p("This sensor sends its readings in the clear: no key is needed. Give it a name to track it."));
    } else {
      box.append(p("No reading from this sensor has been received yet, so its firmware is not known. Stock Xiaomi " +
        "sensors send an encrypted reading about every 10 minutes; you can still add its key now."));
    }
    if (d.catalogue) {
      const c = d.catalogue;
      box.append(p(`${c.manufacturer} ${c.name}.` + (c.stock_encrypted ? " Stock firmware encrypts." : " Stock firmware sends plain readings.") +
        (c.custom_firmware ? ` Custom firmware: ${c.custom_firmware}.` : "")));
      if (c.notes) box.append(MT.el("p", { class: "muted", text: c.notes }));
    }
    $("step-firmware").classList.remove("hidden");
    const keyless = fw.encrypted === false;
    $("step-source").classList.toggle("hidden", keyless);
    for (const card of document.querySelectorAll("#sources .card")) {
      card.classList.toggle("recommended", card.dataset.source === recommended);
    }
    if (recommended) source = recommended;
    $("step-key").classList.remove("hidden");
    $("add-key").classList.toggle("hidden", keyless);
    $("key-hint").classList.toggle("hidden", keyless);
    $("key-title").textContent = keyless ? "Name it" : "Paste the key";
    $("add-name").value = d.name && d.known ? d.name : "";
    MT.showVerdict($("add-verdict"), null);
    $("add-done").classList.add("hidden");
    lastChecked = "";
  }

  for (const b of document.querySelectorAll("#sources [data-pick]")) {
    b.addEventListener("click", () => {
      source = b.dataset.pick;
      for (const card of document.querySelectorAll("#sources .card")) card.classList.toggle("recommended", card.dataset.source === source);
      $("add-key").focus();
    });
  }

  function cleanKey(text) { return text.replace(/0x|[\s:,-]/gi, "").toLowerCase(); }

  async function check() {
    const key = $("add-key").value;
    const clean = cleanKey(key);
    if (!chosen || clean === lastChecked) return;
    if (!(clean.length === 24 || clean.length === 32)) return;
    lastChecked = clean;
    const r = await MT.api("POST", "/api/doctor", { mac: chosen.mac, key });
    if (r.ok) MT.showVerdict($("add-verdict"), r.data.diagnosis);
  }

  $("add-key").addEventListener("input", () => {
    clearTimeout(checkTimer);
    checkTimer = setTimeout(check, 250);
  });

  $("add-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    if (!chosen) return;
    const mac = encodeURIComponent(chosen.mac);
    const name = $("add-name").value.trim();
    const done = $("add-done");
    let ok = true;
    if (needsKey(chosen) || $("add-key").value.trim()) {
      const r = await MT.api("POST", `/api/devices/${mac}/key`, { key: $("add-key").value, source });
      if (!r.data || !r.data.diagnosis) {
        MT.showVerdict($("add-verdict"), { verdict: "invalid_key", advice: (r.data && r.data.error) || "request failed" });
        return;
      }
      MT.showVerdict($("add-verdict"), r.data.diagnosis, {
        message: r.data.saved ? "Saved." : "Not saved: fix the key first (or save it anyway on the device page).",
      });
      ok = r.data.saved;
    }
    if (ok && (name || !needsKey(chosen))) {
      const r = await MT.api("POST", `/api/devices/${mac}/name`, { name: name || chosen.name || chosen.mac });
      ok = r.ok;
    }
    if (ok) {
      done.replaceChildren("Added. ", MT.el("a", { href: "/device/" + chosen.mac, text: "Open the device page" }),
        " or ", MT.el("a", { href: "/", text: "go back to the devices" }), ".");
      done.classList.remove("hidden");
      loadCandidates();
    }
  });

  $("mac-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const v = $("mac-input").value.trim().toUpperCase();
    if (v) choose({ mac: v });
  });
  $("refresh").addEventListener("click", loadCandidates);

  loadCandidates().then(() => { document.body.dataset.ready = "1"; });
})();
