// Live worklist: re-reads /api/worklist every few seconds, keeps keyboard focus, announces new studies.
"use strict";
(function () {
  const table = document.getElementById("worklist");
  const tbody = document.getElementById("rows");
  const labels = ["COVID-19", "Pneumonia", "No finding"];
  const pollMs = Math.max(500, parseFloat(table.dataset.pollS || "3") * 1000);
  let known = new Set(Array.from(tbody.rows, (r) => r.dataset.uid));
  let lastSignature = null;

  function waiting(seconds) {
    const m = Math.floor(seconds / 60);
    if (m < 60) return m + " min";
    return Math.floor(m / 60) + " h " + (m % 60) + " min";
  }

  // DICOM Family^Given^Middle -> "Family, Given Middle" (same as the server's person_name filter)
  function personName(value) {
    if (!value) return "(no name)";
    const parts = value.split("^");
    const given = parts.slice(1).filter(Boolean).join(" ");
    return parts[0] && given ? parts[0] + ", " + given : parts[0] || given;
  }

  function cell(tr, text, cls) {
    const td = tr.insertCell();
    if (text !== undefined && text !== null) td.textContent = text;
    if (cls) td.className = cls;
    return td;
  }

  function sub(td, text, cls) {
    const div = document.createElement("div");
    div.className = cls || "sub";
    div.textContent = text || "";
    td.appendChild(div);
  }

  function row(item, isNew) {
    const tr = document.createElement("tr");
    tr.dataset.uid = item.study_instance_uid;
    if (item.read) tr.classList.add("is-read");
    if (isNew) tr.classList.add("is-new");
    const p = cell(tr);
    const badge = document.createElement("span");
    badge.className = "prio prio-" + item.priority;
    badge.textContent = item.priority.toUpperCase();
    p.appendChild(badge);
    if (item.rule) sub(p, item.rule, "rule");
    const w = cell(tr, waiting(item.waiting_s), "waiting");
    w.dataset.arrived = item.arrived_at;
    const who = cell(tr);
    const a = document.createElement("a");
    a.className = "open";
    a.href = "/studies/" + encodeURIComponent(item.study_instance_uid);
    a.textContent = personName(item.patient_name);
    who.appendChild(a);
    sub(who, item.patient_id);
    const st = cell(tr, item.study_description || "");
    sub(st, item.accession_number);
    const lab = cell(tr, item.label || "-");
    if (item.not_for_clinical_use) sub(lab, "demo model", "demo");
    if (item.heatmap_url) {
      const img = document.createElement("img");
      img.className = "thumb";
      img.src = item.heatmap_url;
      img.alt = "Heatmap";
      lab.appendChild(img);
    }
    const sc = cell(tr, null, "scores");
    if (item.probabilities) {
      labels.forEach((l) => {
        sc.appendChild(document.createTextNode(l + " " + (item.probabilities[l] || 0).toFixed(2)));
        sc.appendChild(document.createElement("br"));
      });
    } else {
      sc.textContent = "-";
    }
    cell(tr, item.status);
    cell(tr, item.read ? "read" : "unread");
    return tr;
  }

  // The header's drift warnings (the last day's STAT or OOD rate outside the range of the previous weeks).
  function showWarnings(warnings) {
    const box = document.getElementById("drift-warning");
    if (!box) return;
    const shown = Array.from(box.querySelectorAll("p"), (p) => p.textContent);
    if (JSON.stringify(shown) === JSON.stringify(warnings)) return;
    box.replaceChildren(...warnings.map((w) => {
      const p = document.createElement("p");
      p.textContent = w;
      return p;
    }));
    box.hidden = warnings.length === 0;
  }

  function focusedUid() {
    const el = document.activeElement;
    const tr = el && el.closest ? el.closest("tr[data-uid]") : null;
    return tr ? tr.dataset.uid : null;
  }

  async function refresh() {
    const params = new URLSearchParams(window.location.search);
    params.set("limit", "100");
    let resp;
    try {
      resp = await fetch("/api/worklist?" + params.toString(), { credentials: "same-origin", cache: "no-store" });
    } catch (e) {
      document.getElementById("updated").textContent = "Connection lost; retrying.";
      return;
    }
    if (resp.status === 401) { window.location.reload(); return; }
    if (!resp.ok) return;
    const page = await resp.json();
    showWarnings(page.warnings || []);
    const now = new Date().toLocaleTimeString();
    const signature = JSON.stringify(page.items.map((i) => Object.assign({}, i, { waiting_s: 0 })));
    if (signature === lastSignature) {  // nothing changed: only the waiting times move
      page.items.forEach((item, n) => {
        const w = tbody.rows[n] && tbody.rows[n].querySelector(".waiting");
        if (w) w.textContent = waiting(item.waiting_s);
      });
      document.getElementById("updated").textContent = "Updated " + now + ".";
      return;
    }
    lastSignature = signature;
    const keep = focusedUid();
    const fresh = page.items.filter((i) => !known.has(i.study_instance_uid));
    const rows = page.items.map((i) => row(i, !known.has(i.study_instance_uid)));
    tbody.replaceChildren(...rows);
    known = new Set(page.items.map((i) => i.study_instance_uid));
    document.getElementById("count").textContent = page.total;
    document.getElementById("disclaimer").hidden = !page.disclaimer;
    document.getElementById("updated").textContent =
      (fresh.length ? fresh.length + " new stud" + (fresh.length > 1 ? "ies" : "y") + ". " : "") + "Updated " + now + ".";
    if (keep) {
      const again = tbody.querySelector('tr[data-uid="' + CSS.escape(keep) + '"] a.open');
      if (again) again.focus();
    }
  }

  function links() { return Array.from(tbody.querySelectorAll("a.open")); }

  async function toggleRead(uid) {
    const tr = tbody.querySelector('tr[data-uid="' + CSS.escape(uid) + '"]');
    const read = !(tr && tr.classList.contains("is-read"));
    await fetch("/api/studies/" + encodeURIComponent(uid) + "/read", {
      method: "PUT", credentials: "same-origin",
      headers: { "Content-Type": "application/json" }, body: JSON.stringify({ read: read }),
    });
    await refresh();
  }

  document.addEventListener("keydown", (ev) => {
    const tag = (ev.target.tagName || "").toLowerCase();
    if (tag === "input" || tag === "select" || tag === "textarea" || ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const all = links();
    const at = all.indexOf(document.activeElement);
    if (ev.key === "j" || ev.key === "ArrowDown") {
      if (all.length) all[Math.min(all.length - 1, at + 1)].focus();
      ev.preventDefault();
    } else if (ev.key === "k" || ev.key === "ArrowUp") {
      if (all.length) all[Math.max(0, at - 1)].focus();
      ev.preventDefault();
    } else if (ev.key === "r") {
      const uid = focusedUid();
      if (uid) toggleRead(uid);
    }
  });

  window.setInterval(refresh, pollMs);
  refresh();
})();
