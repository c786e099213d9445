// Study detail: mark read/unread and set the user's priority through the API.
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
})();
