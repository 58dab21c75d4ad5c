// medbroker: a small read-only terminal screen for the live view and the player (no third-party code).
// Handles what device shells print: text, CR/LF/BS/TAB, cursor moves, erase, scrolling regions,
// the alternate screen and SGR (bold/inverse kept as plain text). Unknown sequences are skipped.
"use strict";

class Term {
  constructor(el, cols, rows) {
    this.el = el;
    this.resize(cols || 80, rows || 24);
  }

  resize(cols, rows) {
    this.cols = Math.max(2, Math.min(cols, 400));
    this.rows = Math.max(2, Math.min(rows, 200));
    this.reset();
  }

  reset() {
    this.lines = [];
    for (let i = 0; i < this.rows; i++) this.lines.push(this.blank());
    this.x = 0; this.y = 0; this.saved = [0, 0];
    this.top = 0; this.bottom = this.rows - 1;
    this.state = 0; this.seq = "";
    this.dirty = true;
  }

  blank() { return new Array(this.cols).fill(" "); }

  scrollUp() {
    this.lines.splice(this.top, 1);
    this.lines.splice(this.bottom, 0, this.blank());
  }

  scrollDown() {
    this.lines.splice(this.bottom, 1);
    this.lines.splice(this.top, 0, this.blank());
  }

  newline() {
    if (this.y === this.bottom) this.scrollUp();
    else if (this.y < this.rows - 1) this.y++;
  }

  put(ch) {
    if (this.x >= this.cols) { this.x = 0; this.newline(); }
    this.lines[this.y][this.x] = ch;
    this.x++;
  }

  write(text) {
    for (const ch of text) this.feed(ch);
    this.dirty = true;
  }

  feed(ch) {
    const c = ch.codePointAt(0);
    if (this.state === 1) { // after ESC
      if (ch === "[") { this.state = 2; this.seq = ""; return; }
      if (ch === "]" || ch === "P" || ch === "X" || ch === "^" || ch === "_") { this.state = 3; return; }
      if (ch === "(" || ch === ")" || ch === "*" || ch === "+" || ch === "#" || ch === "%") { this.state = 4; return; }
      if (ch === "7") this.saved = [this.x, this.y];
      else if (ch === "8") [this.x, this.y] = this.saved;
      else if (ch === "M") { if (this.y === this.top) this.scrollDown(); else if (this.y > 0) this.y--; }
      else if (ch === "D") this.newline();
      else if (ch === "E") { this.x = 0; this.newline(); }
      else if (ch === "c") this.reset();
      this.state = 0; return;
    }
    if (this.state === 2) { // CSI parameters
      if (c >= 0x40 && c <= 0x7e) { this.state = 0; this.csi(this.seq, ch); return; }
      if (this.seq.length < 64) this.seq += ch;
      return;
    }
    if (this.state === 3) { // OSC / DCS string: until BEL or ESC \
      if (c === 7) this.state = 0;
      else if (c === 27) this.state = 5;
      return;
    }
    if (this.state === 5) { this.state = ch === "\\" ? 0 : 3; return; }
    if (this.state === 4) { this.state = 0; return; } // charset designation: one more byte
    if (c === 27) { this.state = 1; return; }
    if (c === 13) { this.x = 0; return; }
    if (c === 10 || c === 11 || c === 12) { this.newline(); return; }
    if (c === 8) { if (this.x > 0) this.x--; return; }
    if (c === 9) { this.x = Math.min(this.cols - 1, (Math.floor(this.x / 8) + 1) * 8); return; }
    if (c < 32 || c === 127) return;
    this.put(ch);
  }

  csi(params, final) {
    const priv = params.startsWith("?");
    const nums = (priv ? params.slice(1) : params).split(";").map((p) => parseInt(p, 10));
    const n = (i, d) => (Number.isFinite(nums[i]) && nums[i] > 0 ? nums[i] : d);
    const clampY = (y) => Math.max(0, Math.min(this.rows - 1, y));
    const clampX = (x) => Math.max(0, Math.min(this.cols - 1, x));
    switch (final) {
      case "A": this.y = clampY(this.y - n(0, 1)); break;
      case "B": case "e": this.y = clampY(this.y + n(0, 1)); break;
      case "C": case "a": this.x = clampX(this.x + n(0, 1)); break;
      case "D": this.x = clampX(this.x - n(0, 1)); break;
      case "E": this.x = 0; this.y = clampY(this.y + n(0, 1)); break;
      case "F": this.x = 0; this.y = clampY(this.y - n(0, 1)); break;
      case "G": case "`": this.x = clampX(n(0, 1) - 1); break;
      case "d": this.y = clampY(n(0, 1) - 1); break;
      case "H": case "f": this.y = clampY(n(0, 1) - 1); this.x = clampX(n(1, 1) - 1); break;
      case "J": this.eraseDisplay(nums[0] || 0); break;
      case "K": this.eraseLine(nums[0] || 0); break;
      case "P": { const row = this.lines[this.y]; row.splice(this.x, n(0, 1)); while (row.length < this.cols) row.push(" "); break; }
      case "@": { const row = this.lines[this.y]; for (let i = 0; i < n(0, 1); i++) row.splice(this.x, 0, " "); row.length = this.cols; break; }
      case "X": for (let i = 0; i < n(0, 1) && this.x + i < this.cols; i++) this.lines[this.y][this.x + i] = " "; break;
      case "L": for (let i = 0; i < n(0, 1); i++) { this.lines.splice(this.bottom, 1); this.lines.splice(this.y, 0, this.blank()); } break;
      case "M": for (let i = 0; i < n(0, 1); i++) { this.lines.splice(this.y, 1); this.lines.splice(this.bottom, 0, this.blank()); } break;
      case "S": for (let i = 0; i < n(0, 1); i++) this.scrollUp(); break;
      case "T": for (let i = 0; i < n(0, 1); i++) this.scrollDown(); break;
      case "r": this.top = clampY(n(0, 1) - 1); this.bottom = clampY(n(1, this.rows) - 1);
        if (this.top >= this.bottom) { this.top = 0; this.bottom = this.rows - 1; }
        this.x = 0; this.y = 0; break;
      case "s": this.saved = [this.x, this.y]; break;
      case "u": [this.x, this.y] = this.saved; break;
      case "h": case "l":
        if (priv && (nums.includes(1049) || nums.includes(47) || nums.includes(1047))) this.eraseDisplay(2);
        break;
      default: break; // m (colours) and everything else: shown as plain text
    }
  }

  eraseDisplay(mode) {
    if (mode === 2 || mode === 3) { for (let i = 0; i < this.rows; i++) this.lines[i] = this.blank(); return; }
    if (mode === 0) {
      this.eraseLine(0);
      for (let i = this.y + 1; i < this.rows; i++) this.lines[i] = this.blank();
    } else {
      this.eraseLine(1);
      for (let i = 0; i < this.y; i++) this.lines[i] = this.blank();
    }
  }

  eraseLine(mode) {
    const row = this.lines[this.y];
    const [from, to] = mode === 0 ? [this.x, this.cols] : mode === 1 ? [0, this.x + 1] : [0, this.cols];
    for (let i = from; i < to && i < this.cols; i++) row[i] = " ";
  }

  text() { return this.lines.map((row) => row.join("").replace(/\s+$/, "")).join("\n"); }

  render() {
    if (!this.dirty) return;
    this.el.textContent = this.text();
    this.dirty = false;
  }
}

window.MedbrokerTerm = Term;
