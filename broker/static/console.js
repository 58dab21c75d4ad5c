// medbroker console: live refresh of lists, countdowns, the live terminal view, copy buttons.
"use strict";

(function () {
  // Lists that refresh when the server says something changed (server-sent events).
  const live = document.querySelector("[data-live-topic]");
  if (live && window.EventSource) {
    const note = document.getElementById("live-note");
    let busy = false;
    const refresh = () => {
      if (busy) return;
      busy = true;
      fetch(live.dataset.liveUrl, { credentials: "same-origin", cache: "no-store" })
        .then((r) => (r.ok ? r.text() : Promise.reject(r.status)))
        .then((html) => {
          const focused = document.activeElement && document.activeElement.id;
          live.innerHTML = html;
          if (focused && document.getElementById(focused)) document.getElementById(focused).focus();
          countdowns();
        })
        .catch(() => {})
        .finally(() => { busy = false; });
    };
    const es = new EventSource("/events/" + live.dataset.liveTopic);
    es.addEventListener("changed", refresh);
    es.addEventListener("signedout", () => {
      es.close();
      if (note) note.textContent = "Signed out: reload the page to sign in again.";
    });
    es.onerror = () => { if (note) note.textContent = "Live updates paused; reconnecting…"; };
    es.onopen = () => { if (note) note.textContent = "Live: updates appear by themselves."; };
  }

  // Countdowns: <span data-ends="ISO">.
  function countdowns() {
    document.querySelectorAll("[data-ends]").forEach((el) => {
      const end = Date.parse(el.dataset.ends);
      if (Number.isNaN(end)) return;
      const left = Math.max(0, Math.round((end - Date.now()) / 1000));
      const h = Math.floor(left / 3600), m = Math.floor((left % 3600) / 60), s = left % 60;
      el.textContent = left === 0 ? "window ended" : (h ? h + "h " : "") + (h || m ? m + "m " : "") + s + "s left";
      el.classList.toggle("soon", left > 0 && left < 300);
    });
  }
  countdowns();
  setInterval(countdowns, 1000);

  // Copy buttons: <button data-copy="#id">.
  document.querySelectorAll("[data-copy]").forEach((btn) => {
    btn.addEventListener("click", () => {
      const el = document.querySelector(btn.dataset.copy);
      if (!el) return;
      el.select && el.select();
      if (navigator.clipboard) navigator.clipboard.writeText(el.value || el.textContent).then(() => { btn.textContent = "Copied"; });
    });
  });

  // Live terminal (read-only).
  const watch = document.getElementById("watch");
  if (watch && window.EventSource) {
    const screen = document.getElementById("screen");
    const state = document.getElementById("watch-status");
    const marks = document.getElementById("marks");
    const term = new window.MedbrokerTerm(screen, 80, 24);
    let pending = false;
    const paint = () => { if (!pending) { pending = true; requestAnimationFrame(() => { pending = false; term.render(); }); } };
    const es = new EventSource(watch.dataset.stream);
    es.addEventListener("o", (ev) => { term.write(JSON.parse(ev.data).d); paint(); });
    es.addEventListener("r", (ev) => {
      const d = JSON.parse(ev.data);
      if (d.cols && d.rows && (d.cols !== term.cols || d.rows !== term.rows)) { term.cols = d.cols; term.rows = d.rows; term.resize(d.cols, d.rows); }
      paint();
    });
    es.addEventListener("m", (ev) => {
      const d = JSON.parse(ev.data);
      const li = document.createElement("li"); li.textContent = d.d; marks.appendChild(li);
    });
    const finish = (text) => {
      es.close(); state.textContent = text; watch.dataset.ended = "1";
      // The page was drawn while the session was live: it is not any more (killed, revoked, expired, closed).
      const badge = document.getElementById("session-state");
      if (badge) { badge.textContent = "ended"; badge.className = "badge warn"; }
      const left = document.getElementById("session-left");
      if (left) left.remove();
      const kill = document.getElementById("kill-card");
      if (kill) kill.remove();
    };
    es.addEventListener("end", (ev) => finish("Session ended: " + (JSON.parse(ev.data).reason || "closed")));
    es.addEventListener("failed", (ev) => finish("Cannot follow this session: " + JSON.parse(ev.data).reason));
    es.onopen = () => { state.textContent = "Watching live (read-only)."; watch.dataset.open = "1"; };
    es.onerror = () => { if (!watch.dataset.ended) state.textContent = "Connection lost; reconnecting…"; };
  }
})();
