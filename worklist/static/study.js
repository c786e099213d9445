// Study detail: mark read/unread, set the user's priority and record the read finding (keys 1-5 or buttons).
"use strict";
(function () {
  const uid = document.getElementById("study").dataset.uid;
  const status = document.getElementById("action-status");
  const base = "/api/studies/" + encodeURIComponent(uid);

  async function put(path, body) {
    const resp = await fetch(base + path, {
      method: "PUT", credentials: "same-origin",
      headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    if (resp.status === 401) { window.location.reload(); return null; }
    if (!resp.ok) { status.textContent = "Could not save (" + resp.status + ")."; return null; }
    return resp.json();
  }

  const button = document.getElementById("toggle-read");
  button.addEventListener("click", async () => {
    const study = await put("/read", { read: button.dataset.read !== "true" });
    if (!study) return;
    button.dataset.read = study.read ? "true" : "false";
    button.textContent = study.read ? "Mark unread" : "Mark read";
    document.getElementById("read-state").textContent = study.read ? "read by " + study.read_by : "unread";
    status.textContent = study.read ? "Marked read." : "Marked unread.";
  });

  document.getElementById("user-priority").addEventListener("change", async (ev) => {
    const study = await put("/priority", { priority: ev.target.value || null });
    if (study) window.location.reload();
  });

  // --- the read finding ---
  const choices = Array.from(document.querySelectorAll(".finding-choice"));
  const current = document.getElementById("finding-current");
  const meta = document.getElementById("finding-meta");
  const history = document.getElementById("finding-history");

  function when(iso) {  // the same form as the server's: 2026-12-01 08:30:00 UTC
    return new Date(iso).toISOString().replace("T", " ").slice(0, 19) + " UTC";
  }

  function describe(h) {
    return h.finding + " by " + h.username + ", " + when(h.recorded_at) + "; AI label then " + (h.ai_label || "-");
  }

  function showFinding(study) {
    const f = study.finding;
    current.textContent = f ? f.finding : "none recorded";
    meta.textContent = f ? "by " + f.username + ", " + when(f.recorded_at) + "; AI label then " + (f.ai_label || "-") : "";
    choices.forEach((c) => c.setAttribute("aria-pressed", f && c.dataset.finding === f.finding ? "true" : "false"));
    history.replaceChildren(...study.finding_history.slice().reverse().map((h) => {
      const li = document.createElement("li");
      li.className = h.superseded_at ? "superseded" : "current";
      li.textContent = describe(h) + (h.superseded_at ? " (superseded)" : "");
      return li;
    }));
  }

  const section = document.getElementById("finding");
  let latest = { finding: section.dataset.finding, by: section.dataset.by };
  let saving = false;
  async function record(finding) {
    if (saving) return;
    if (latest.finding === finding && latest.by === section.dataset.me) {  // a repeated key adds no history
      status.textContent = "Already recorded: " + finding + ".";
      return;
    }
    saving = true;
    try {
      status.textContent = "Saving finding...";
      const study = await put("/finding", { finding: finding });
      if (!study) return;
      showFinding(study);
      latest = study.finding ? { finding: study.finding.finding, by: study.finding.username } : latest;
      status.textContent = "Finding recorded: " + finding + ".";
    } finally {
      saving = false;
    }
  }

  choices.forEach((c) => c.addEventListener("click", () => record(c.dataset.finding)));

  document.addEventListener("keydown", (ev) => {
    const tag = (ev.target.tagName || "").toLowerCase();
    if (tag === "input" || tag === "select" || tag === "textarea" || ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const choice = choices.find((c) => c.dataset.key === ev.key);
    if (!choice) return;
    ev.preventDefault();
    record(choice.dataset.finding);
  });
})();
