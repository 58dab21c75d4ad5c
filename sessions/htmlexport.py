"""A self-contained HTML replay page for auditors without tools: inline CSS and a tiny terminal player."""

from __future__ import annotations

import html
import json
from collections.abc import Collection, Iterable
from typing import Any

from sessions.replay import FrameLike, to_asciicast, to_text, verification_summary

__all__ = ["to_html", "PLAYER_LIMITS"]

PLAYER_LIMITS = ("no colours or text attributes (bold, underline, inverse) are shown",
                 "wide characters (CJK, emoji) take one column, so lines holding them look shifted",
                 "only common cursor, erase, insert/delete and scroll-region sequences are interpreted; "
                 "others are ignored",
                 "the alternate screen (full-screen programs) shares the main screen")

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em auto;max-width:80em;padding:0 1em;color:#111}
table.meta{border-collapse:collapse;margin:.5em 0}table.meta td,table.meta th{border:1px solid #bbb;
padding:.2em .5em;text-align:left}table.meta th{background:#eee}
.ok{background:#e6f4e6;border:1px solid #6a6}.bad{background:#fbe6e6;border:1px solid #c44}
.status{padding:.5em .8em;margin:.8em 0;font-weight:bold}
#screen{background:#111;color:#ddd;font:13px/1.2 ui-monospace,Menlo,Consolas,monospace;padding:.5em;
white-space:pre;overflow:auto;display:inline-block;min-width:40em;margin:.5em 0}
#screen .cur{background:#ddd;color:#111}
.controls{display:flex;gap:.6em;align-items:center;flex-wrap:wrap}.controls input[type=range]{flex:1;min-width:15em}
#markers button{font:12px ui-monospace,monospace;text-align:left;border:0;background:none;cursor:pointer;
padding:.1em .3em;display:block;width:100%}#markers button:hover{background:#eef}
#markers{max-height:18em;overflow:auto;border:1px solid #ccc;margin:.5em 0}
pre.transcript{white-space:pre-wrap;background:#f6f6f6;padding:.5em;border:1px solid #ccc}
small,ul.limits{color:#555;font-size:12px}
"""

# The player: reads the asciicast v2 events embedded in #cast and renders "o"/"r" events on a character grid.
_JS = r"""
(function () {
  "use strict";
  var lines = JSON.parse(document.getElementById("cast").textContent);
  var head = lines[0], events = lines.slice(1);
  var out = events.filter(function (e) { return e[1] === "o" || e[1] === "r"; });
  var marks = events.filter(function (e) { return e[1] === "m"; });
  var duration = events.length ? events[events.length - 1][0] : 0;
  var screen = document.getElementById("screen");

  function Term(cols, rows) { this.size(cols, rows); this.reset(); }
  Term.prototype.size = function (cols, rows) {
    this.cols = Math.max(1, Math.min(cols, 500)); this.rows = Math.max(1, Math.min(rows, 300));
  };
  Term.prototype.blank = function () { var l = []; for (var i = 0; i < this.cols; i++) l.push(" "); return l; };
  Term.prototype.reset = function () {
    this.grid = []; for (var r = 0; r < this.rows; r++) this.grid.push(this.blank());
    this.x = 0; this.y = 0; this.top = 0; this.bottom = this.rows - 1; this.st = 0; this.p = ""; this.sx = 0; this.sy = 0;
  };
  Term.prototype.resize = function (cols, rows) {
    var old = this.grid; this.size(cols, rows); this.grid = [];
    for (var r = 0; r < this.rows; r++) {
      var l = this.blank(), src = old[old.length - this.rows + r];
      if (src) for (var c = 0; c < Math.min(this.cols, src.length); c++) l[c] = src[c];
      this.grid.push(l);
    }
    this.top = 0; this.bottom = this.rows - 1; this.clamp();
  };
  Term.prototype.clamp = function () {
    this.x = Math.max(0, Math.min(this.x, this.cols - 1)); this.y = Math.max(0, Math.min(this.y, this.rows - 1));
  };
  Term.prototype.scrollUp = function (n) {
    for (var i = 0; i < n; i++) { this.grid.splice(this.top, 1); this.grid.splice(this.bottom, 0, this.blank()); }
  };
  Term.prototype.scrollDown = function (n) {
    for (var i = 0; i < n; i++) { this.grid.splice(this.bottom, 1); this.grid.splice(this.top, 0, this.blank()); }
  };
  Term.prototype.lf = function () { if (this.y === this.bottom) this.scrollUp(1); else if (this.y < this.rows - 1) this.y++; };
  Term.prototype.put = function (ch) {
    if (this.x >= this.cols) { this.x = 0; this.lf(); }
    this.grid[this.y][this.x] = ch; this.x++;
  };
  Term.prototype.erase = function (row, from, to) {
    for (var c = Math.max(0, from); c < Math.min(this.cols, to); c++) this.grid[row][c] = " ";
  };
  Term.prototype.csi = function (p, f) {
    var priv = /^[?>=<]/.test(p), n = p.replace(/^[?>=<]/, "").split(";").map(function (v) { return parseInt(v, 10) || 0; });
    var a = n[0] || 1, r, i;
    switch (f) {
      case "A": this.y = Math.max(this.y >= this.top ? this.top : 0, this.y - a); break;
      case "B": case "e": this.y = Math.min(this.y <= this.bottom ? this.bottom : this.rows - 1, this.y + a); break;
      case "C": case "a": this.x = Math.min(this.cols - 1, this.x + a); break;
      case "D": this.x = Math.max(0, Math.min(this.x, this.cols - 1) - a); break;
      case "E": this.y = Math.min(this.rows - 1, this.y + a); this.x = 0; break;
      case "F": this.y = Math.max(0, this.y - a); this.x = 0; break;
      case "G": case "`": this.x = a - 1; this.clamp(); break;
      case "d": this.y = a - 1; this.clamp(); break;
      case "H": case "f": this.y = (n[0] || 1) - 1; this.x = (n[1] || 1) - 1; this.clamp(); break;
      case "J":
        if (n[0] === 0) { this.erase(this.y, this.x, this.cols); for (r = this.y + 1; r < this.rows; r++) this.erase(r, 0, this.cols); }
        else if (n[0] === 1) { this.erase(this.y, 0, this.x + 1); for (r = 0; r < this.y; r++) this.erase(r, 0, this.cols); }
        else for (r = 0; r < this.rows; r++) this.erase(r, 0, this.cols);
        break;
      case "K":
        if (n[0] === 0) this.erase(this.y, this.x, this.cols); else if (n[0] === 1) this.erase(this.y, 0, this.x + 1);
        else this.erase(this.y, 0, this.cols);
        break;
      case "L": if (this.y >= this.top && this.y <= this.bottom) for (i = 0; i < a; i++) {
        this.grid.splice(this.bottom, 1); this.grid.splice(this.y, 0, this.blank()); } break;
      case "M": if (this.y >= this.top && this.y <= this.bottom) for (i = 0; i < a; i++) {
        this.grid.splice(this.y, 1); this.grid.splice(this.bottom, 0, this.blank()); } break;
      case "P": for (i = 0; i < a; i++) { this.grid[this.y].splice(this.x, 1); this.grid[this.y].push(" "); } break;
      case "@": for (i = 0; i < a; i++) { this.grid[this.y].splice(this.x, 0, " "); this.grid[this.y].length = this.cols; } break;
      case "X": this.erase(this.y, this.x, this.x + a); break;
      case "S": this.scrollUp(a); break;
      case "T": if (!priv) this.scrollDown(a); break;
      case "r": if (!priv) {
        this.top = Math.max(0, (n[0] || 1) - 1); this.bottom = Math.min(this.rows - 1, (n[1] || this.rows) - 1);
        if (this.top >= this.bottom) { this.top = 0; this.bottom = this.rows - 1; }
        this.x = 0; this.y = 0; } break;
      case "s": this.sx = this.x; this.sy = this.y; break;
      case "u": this.x = this.sx; this.y = this.sy; break;
      case "h": case "l":
        if (priv && (n[0] === 1049 || n[0] === 47 || n[0] === 1047)) {
          for (r = 0; r < this.rows; r++) this.erase(r, 0, this.cols);
          if (n[0] === 1049 && f === "h") { this.sx = this.x; this.sy = this.y; }
          if (n[0] === 1049 && f === "l") { this.x = this.sx; this.y = this.sy; }
        }
        break;
      default: break;  // m (colours) and everything else: ignored
    }
  };
  Term.prototype.write = function (s) {
    for (var i = 0; i < s.length; i++) {
      var ch = s[i], code = s.charCodeAt(i);
      switch (this.st) {
        case 0:
          if (ch === "\x1b") this.st = 1;
          else if (ch === "\r") this.x = 0;
          else if (ch === "\n" || ch === "\x0b" || ch === "\x0c") this.lf();
          else if (ch === "\b") this.x = Math.max(0, Math.min(this.x, this.cols - 1) - 1);
          else if (ch === "\t") this.x = Math.min(this.cols - 1, (this.x + 8) & ~7);
          else if (code === 0x9b) { this.st = 2; this.p = ""; }
          else if (code >= 32 && code !== 127 && !(code >= 0x80 && code < 0xa0)) this.put(ch);
          break;
        case 1:
          this.st = 0;
          if (ch === "[") { this.st = 2; this.p = ""; }
          else if (ch === "]") this.st = 3;
          else if ("PX^_".indexOf(ch) >= 0) this.st = 4;
          else if ("()*+#%".indexOf(ch) >= 0) this.st = 5;
          else if (ch === "7") { this.sx = this.x; this.sy = this.y; }
          else if (ch === "8") { this.x = this.sx; this.y = this.sy; }
          else if (ch === "D") this.lf();
          else if (ch === "E") { this.x = 0; this.lf(); }
          else if (ch === "M") { if (this.y === this.top) this.scrollDown(1); else if (this.y > 0) this.y--; }
          else if (ch === "c") this.reset();
          break;
        case 2:
          if (code >= 0x20 && code <= 0x3f) { if (this.p.length < 64) this.p += ch; }
          else { this.st = 0; this.csi(this.p, ch); }
          break;
        case 3: if (ch === "\x07") this.st = 0; else if (ch === "\x1b") this.st = 6; break;
        case 4: if (ch === "\x1b") this.st = 6; break;
        default: this.st = 0;
      }
    }
  };

  var term = new Term(head.width || 80, head.height || 24), idx = 0, t = 0, playing = false, last = 0, speed = 1;
  var slider = document.getElementById("pos"), clock = document.getElementById("clock");
  var button = document.getElementById("play"), skip = document.getElementById("skip");
  slider.max = duration;

  function fmt(s) {
    s = Math.max(0, s); var m = Math.floor(s / 60), h = Math.floor(m / 60);
    return (h ? h + ":" : "") + ("0" + (m % 60)).slice(-2) + ":" + ("0" + Math.floor(s % 60)).slice(-2);
  }
  function render() {
    var text = term.grid.map(function (l) { return l.join(""); });
    while (screen.firstChild) screen.removeChild(screen.firstChild);
    var y = term.y, x = Math.min(term.x, term.cols - 1), row = text[y];
    screen.appendChild(document.createTextNode(text.slice(0, y).join("\n") + (y ? "\n" : "") + row.slice(0, x)));
    var cur = document.createElement("span"); cur.className = "cur"; cur.textContent = row[x];
    screen.appendChild(cur);
    screen.appendChild(document.createTextNode(row.slice(x + 1) + (y < text.length - 1 ? "\n" : "") + text.slice(y + 1).join("\n")));
    slider.value = t; clock.textContent = fmt(t) + " / " + fmt(duration);
  }
  function apply(e) {
    if (e[1] === "o") term.write(e[2]);
    else { var m = /^(\d+)x(\d+)$/.exec(e[2]); if (m) term.resize(+m[1], +m[2]); }
  }
  function until(target) { while (idx < out.length && out[idx][0] <= target) apply(out[idx++]); }
  function seek(target) {
    term = new Term(head.width || 80, head.height || 24); idx = 0; t = Math.max(0, Math.min(target, duration));
    until(t); render();
  }
  function frame(now) {
    if (!playing) return;
    t += (now - last) / 1000 * speed; last = now;
    if (skip.checked && idx < out.length && out[idx][0] - t > 2) t = out[idx][0] - 2;
    until(t); render();
    if (idx >= out.length && t >= duration) { playing = false; button.textContent = "Play"; return; }
    requestAnimationFrame(frame);
  }
  function toggle() {
    playing = !playing; button.textContent = playing ? "Pause" : "Play";
    if (playing) { if (t >= duration) seek(0); last = performance.now(); requestAnimationFrame(frame); }
  }
  button.addEventListener("click", toggle);
  slider.addEventListener("input", function () { seek(parseFloat(slider.value)); });
  document.getElementById("speed").addEventListener("change", function (ev) { speed = parseFloat(ev.target.value) || 1; });
  document.addEventListener("keydown", function (ev) {
    if (ev.target.tagName === "SELECT") return;
    if (ev.key === " ") { ev.preventDefault(); toggle(); }
    else if (ev.key === "ArrowRight") seek(t + 5); else if (ev.key === "ArrowLeft") seek(t - 5);
  });
  var list = document.getElementById("markers");
  marks.forEach(function (m) {
    var b = document.createElement("button"); b.textContent = fmt(m[0]) + "  " + m[2];
    b.addEventListener("click", function () { seek(m[0]); }); list.appendChild(b);
  });
  if (!marks.length) list.style.display = "none";
  // Open on the first output, not a blank screen: an auditor sees at once what the session looked like.
  var first = out.filter(function (e) { return e[1] === "o"; })[0];
  seek(first ? first[0] : 0);
  slider.value = t;
})();
"""


def _script_json(text: str) -> str:
    """JSON that cannot end its <script> element or open an HTML comment."""
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def to_html(frames: Iterable[FrameLike], *, header: dict[str, Any], verify_result: Any = None,
            channels: Collection[int] | None = None) -> str:
    """One self-contained HTML page: session facts, the verification status, a player and a text transcript.

    The page loads nothing (a Content-Security-Policy forbids it) and contains no third-party code. The
    player renders the asciicast v2 events with a small terminal emulator; see :data:`PLAYER_LIMITS`.
    Without JavaScript the transcript is shown.
    """
    frames = list(frames)
    cast = to_asciicast(frames, header=header, verify_result=verify_result, channels=channels)
    events = [json.loads(line) for line in cast.splitlines() if line.strip()]
    transcript = to_text(frames, header=header, verify_result=verify_result, channels=channels)
    status = verification_summary(verify_result)
    ok = verify_result is not None and verify_result.ok
    notes = list(getattr(verify_result, "notes", ()) or ())
    e = html.escape
    sid = str(header.get("session_id", "?"))
    rows = [("Session", sid), ("User", header.get("user")), ("Device", header.get("device")),
            ("Started", header.get("started_at")), ("Grant", header.get("grant_id")),
            ("Grant ends", header.get("grant_ends_at")), ("Source", header.get("source")),
            ("Device host key", header.get("device_host_key"))]
    meta = "".join(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in rows if v is not None)
    note_html = "".join(f"<div>{e(n)}</div>" for n in notes)
    limits = "".join(f"<li>{e(x)}</li>" for x in PLAYER_LIMITS)
    csp = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="referrer" content="no-referrer">
<title>medbroker session {e(sid)}</title>
<style>{_CSS}</style></head><body>
<h1>medbroker session {e(sid)}</h1>
<table class="meta">{meta}</table>
<div class="status {'ok' if ok else 'bad'}">Recording: {e(status)}{note_html}</div>
<div class="controls"><button id="play" type="button">Play</button>
<input id="pos" type="range" min="0" step="0.1" value="0" aria-label="position">
<span id="clock"></span>
<label>speed <select id="speed"><option>0.5</option><option selected>1</option><option>2</option><option>4</option>
<option>16</option></select></label>
<label><input id="skip" type="checkbox" checked> skip pauses over 2 s</label></div>
<div id="screen" role="img" aria-label="terminal"></div>
<div id="markers"></div>
<details><summary>Transcript (plain text)</summary><pre class="transcript">{e(transcript)}</pre></details>
<p><small>Keys: space plays or pauses, arrow keys seek 5 s. This page was generated by medbroker from the
signed recording; it is a convenience view, and the recording itself is the evidence. Player limits:</small></p>
<ul class="limits">{limits}</ul>
<script type="application/json" id="cast">{_script_json(json.dumps(events, ensure_ascii=False))}</script>
<script>{_JS}</script>
</body></html>
"""
