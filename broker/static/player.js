// medbroker: browser player for asciicast v2 recordings (play/pause, speed, seek, skip idle, jump to marks).
"use strict";

(function () {
  const root = document.getElementById("player");
  if (!root) return;
  const screen = document.getElementById("screen");
  const btnPlay = document.getElementById("play");
  const btnEnd = document.getElementById("to-end");
  const speedSel = document.getElementById("speed");
  const seek = document.getElementById("seek");
  const clock = document.getElementById("clock");
  const skipIdle = document.getElementById("skip-idle");
  const status = document.getElementById("player-status");
  const markList = document.getElementById("marks");
  const IDLE_CAP = 1.0;

  let header = { width: 80, height: 24 };
  let events = [];   // [t, code, data]
  let vt = [];       // virtual (idle-skipped) time per event
  let duration = 0;
  let pos = 0;       // virtual seconds
  let fed = 0;       // events fed into the terminal
  let playing = false;
  let last = 0;
  const term = new window.MedbrokerTerm(screen, 80, 24);

  const fmt = (s) => {
    s = Math.max(0, Math.floor(s));
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
    return (h ? h + ":" + String(m).padStart(2, "0") : String(m)) + ":" + String(sec).padStart(2, "0");
  };

  function timeline() {
    vt = [];
    let prev = 0, v = 0;
    for (const e of events) {
      let gap = e[0] - prev;
      if (skipIdle.checked && gap > IDLE_CAP) gap = IDLE_CAP;
      v += Math.max(0, gap);
      prev = e[0];
      vt.push(v);
    }
    duration = vt.length ? vt[vt.length - 1] : 0;
  }

  function toVirtual(real) {
    let i = 0;
    while (i < events.length && events[i][0] < real) i++;
    return i < vt.length ? vt[i] : duration;
  }

  function restart() {
    term.resize(header.width || 80, header.height || 24);
    fed = 0;
  }

  function feedTo(v) {
    if (v < pos) restart();
    while (fed < events.length && vt[fed] <= v) {
      const [, code, data] = events[fed];
      if (code === "o") term.write(data);
      else if (code === "r") {
        const m = /^(\d+)x(\d+)$/.exec(data);
        if (m) { term.resize(+m[1], +m[2]); }
      }
      fed++;
    }
    pos = v;
    term.render();
    seek.value = duration ? Math.round((pos / duration) * 1000) : 0;
    clock.textContent = fmt(pos) + " / " + fmt(duration);
    label();
  }

  function label() {
    btnPlay.textContent = playing ? "Pause" : (pos >= duration && duration > 0 ? "Replay" : "Play");
    btnPlay.setAttribute("aria-pressed", playing ? "true" : "false");
  }

  function seekTo(v) {
    const target = Math.max(0, Math.min(duration, v));
    if (target < pos) { restart(); pos = 0; }
    feedTo(target);
  }

  function tick(now) {
    if (!playing) return;
    const dt = (now - last) / 1000;
    last = now;
    const next = pos + dt * parseFloat(speedSel.value || "1");
    feedTo(Math.min(next, duration));
    if (pos >= duration) { setPlaying(false); return; }
    requestAnimationFrame(tick);
  }

  function setPlaying(on) {
    playing = on && duration > 0;
    if (playing && pos >= duration) { restart(); pos = 0; }
    label();
    if (playing) {
      last = performance.now();
      requestAnimationFrame(tick);
    }
  }

  btnPlay.addEventListener("click", () => setPlaying(!playing));
  btnEnd.addEventListener("click", () => { setPlaying(false); seekTo(duration); });
  seek.addEventListener("input", () => seekTo((seek.value / 1000) * duration));
  skipIdle.addEventListener("change", () => {
    const real = fed ? events[Math.max(0, fed - 1)][0] : 0;
    timeline(); restart(); pos = 0; feedTo(toVirtual(real));
  });
  document.addEventListener("keydown", (ev) => {
    if (ev.target.closest("input, select, textarea, button, a")) return;
    if (ev.key === " ") { ev.preventDefault(); setPlaying(!playing); }
    else if (ev.key === "ArrowRight") seekTo(pos + 5);
    else if (ev.key === "ArrowLeft") seekTo(pos - 5);
  });
  document.querySelectorAll("[data-offset]").forEach((el) => {
    el.addEventListener("click", (ev) => {
      ev.preventDefault();
      setPlaying(false);
      seekTo(toVirtual(parseFloat(el.dataset.offset)));
      screen.focus();
    });
  });

  function addMark(t, text) {
    if (!markList) return;
    const li = document.createElement("li");
    const a = document.createElement("a");
    a.href = "#";
    a.dataset.offset = String(t);
    a.textContent = fmt(t) + "  " + text;
    a.addEventListener("click", (ev) => {
      ev.preventDefault(); setPlaying(false); seekTo(toVirtual(t));
    });
    li.appendChild(a);
    markList.appendChild(li);
  }

  fetch(root.dataset.cast, { credentials: "same-origin", cache: "no-store" })
    .then((r) => {
      if (!r.ok) return r.text().then((t) => { throw new Error(t || ("HTTP " + r.status)); });
      return r.text();
    })
    .then((text) => {
      const lines = text.split("\n").filter((l) => l.trim());
      header = JSON.parse(lines.shift());
      events = lines.map((l) => JSON.parse(l)).filter((e) => Array.isArray(e) && e.length >= 3);
      for (const e of events) if (e[1] === "m") addMark(e[0], e[2]);
      if (markList && !markList.children.length) {
        const li = document.createElement("li"); li.className = "muted"; li.textContent = "No markers in this recording.";
        markList.appendChild(li);
      }
      timeline(); restart(); feedTo(0);
      status.textContent = events.length ? "Ready: " + fmt(duration) + " of activity." : "This recording has no terminal output.";
      root.dataset.ready = "1";
      btnPlay.disabled = false; btnEnd.disabled = false; seek.disabled = false;
    })
    .catch((err) => {
      status.textContent = "Cannot load the recording: " + err.message;
      status.classList.add("error");
    });
})();
