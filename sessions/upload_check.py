"""Vendor-to-device content judge: uploaded scripts and interpreter input that name protected paths (pure).

The command check (sessions/exec_check.py) sees the command line; an automation client such as
Ansible sends the real work as a program instead: an ``AnsiballZ_*.py`` file uploaded over SFTP, or
the same program on the stdin of ``/bin/sh -c 'python3 && sleep 0'`` (pipelining). The module's
arguments, with the path it will read, travel inside: in ansible-core 2.19 as a Python ``repr`` of a
JSON string in the wrapper (``params='{"ANSIBLE_MODULE_ARGS": {"path": ...}}'``), and the module code
as a base64 zip. :class:`UploadJudge` reads such content incrementally and reports the first protected
path it names, plainly or through simple encodings: backslash escapes (JSON, Python), base64 and
base64url (also line-wrapped), hex, and zip/gzip/zlib/bzip2/xz containers, nested up to
:data:`MAX_DEPTH` levels, every expansion size-capped.

What counts as naming a protected path (docs/data-protection.md, "Automation clients"): a path-like
token that, normalised, is at or below a protected prefix when read as an absolute path, as ``~/…``
or as relative to the login's home (when known); and, home or not, a relative token whose leading
components (after ``./`` and ``../``) repeat the last two or more components of a protected prefix
(``var/spool/hl7/adt.hl7`` for ``/srv/dev/var/spool/hl7``), since a script may ``chdir`` anywhere.
A path built at run time (string concatenation, arithmetic) is not recognised: containment is the
layer that holds then.
"""

from __future__ import annotations

import base64
import binascii
import bz2
import io
import lzma
import re
import shlex
import zipfile
from typing import Awaitable, Callable
import zlib
from dataclasses import dataclass

from sessions.policy import ProtectedPaths, normalize_path

__all__ = ["Reference", "StreamGuard", "UploadJudge", "find_reference", "looks_like_program", "path_tokens",
           "runs_interpreter", "script_candidates", "MAX_DEPTH", "CARRY_MAX", "EXPAND_MAX", "JUDGE_MAX"]

MAX_DEPTH = 4
"""How many decodings deep (escapes, base64, zip member, gzip ...) the judge follows."""
CARRY_MAX = 8 << 20
"""Longest unfinished run (no delimiter yet) held back between chunks before it is judged as it stands."""
EXPAND_MAX = 16 << 20
"""Most bytes any one decompression (zip member, gzip, zlib, bzip2, xz) may produce; beyond it the rest
is ignored (the judged prefix still counts)."""
JUDGE_MAX = 64 << 20
"""Bytes of one stream the judge reads; beyond them a stream is passed unjudged (``UploadJudge.unjudged``):
scripts are small, firmware images are not, and judging costs CPU on the broker's event loop."""
_MAGICS = (b"PK\x03\x04", b"\x1f\x8b\x08", b"\xfd7zXZ\x00", b"BZh9", b"BZh1")
_KEEP = 4 << 20  # bytes of a stream kept for StreamGuard.vet
_ZIP_MEMBERS = 4096
_ZIP_TOTAL = 64 << 20
_TAIL = 4096  # bytes of a cut-off run kept so a path straddling the cut is still seen

# A token is a run of characters that can be part of a path (":" and "=" split "PATH=/a:/b").
_TOKEN = re.compile(rb"[^\x00-\x20\"'`;,(){}\[\]<>|&=:*?!$#\\\x7f]+")
_DELIM = frozenset(b"\"'`;,(){}[]<>|&=:*?!$#\\\x7f") | frozenset(range(0x21))
# Base64 / base64url runs (line-wrapped ones too) and hex runs worth decoding.
# (the look-behinds start a match only where a run starts: no quadratic retries inside short words)
_B64_RUN = re.compile(rb"(?<![A-Za-z0-9+/_\r\n-])[A-Za-z0-9+/_\r\n-]{16,}={0,2}")
_HEX_DIGITS = b"0123456789abcdefABCDEF"
_ESCAPE = re.compile(rb"\\(?:u([0-9a-fA-F]{4})|x([0-9a-fA-F]{2})|([0-7]{1,3})|(.))", re.S)
_SIMPLE_ESCAPES = {b"n": b"\n", b"t": b"\t", b"r": b"\r", b"0": b"\0", b"/": b"/", b"\\": b"\\", b'"': b'"',
                   b"'": b"'", b"b": b"\b", b"f": b"\f"}
# Bytes that end a run: anything that is neither a token, base64/hex nor escape character.
_RUN_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=_-.~@%\\\r\n") | \
    frozenset(range(0x80, 0x100))
_MASK = bytes(ord("r") if c in _RUN_BYTES else ord("d") for c in range(256))
_RUN_ASCII = bytes(c for c in _RUN_BYTES if c < 0x80)


@dataclass(frozen=True)
class Reference:
    """A protected path named in vendor-to-device content.

    :ivar token: the text as found (after decoding), shortened to 200 characters
    :ivar path: the absolute path it resolves to (``…`` for a home-independent relative match)
    :ivar root: the protected prefix it falls under
    :ivar via: how it was encoded, outermost first (``plain``, ``escapes``, ``base64``, ``zip:ansible/…``)
    """

    token: str
    path: str
    root: str
    via: str

    def reason(self, device: str, what: str) -> str:
        """The sentence the vendor sees: ``what`` is e.g. "the uploaded file /x" or "input to this command"."""
        encoded = "" if self.via == "plain" else f" (encoded: {self.via})"
        return (f"{what} names {self.path}{encoded}, inside {self.root}, a protected patient-data directory on "
                f"{device}; medbroker refuses scripts and interpreter input that read there, as it refuses the "
                "same path on the command line. Ask the hospital's biomedical engineer if you need a "
                "de-identified export.")


class _Matcher:
    """Path-token matching against one device's protected prefixes."""

    def __init__(self, protected: ProtectedPaths, home: str | None) -> None:
        self.protected = protected
        self.home = normalize_path(home) if home else None
        fold = (lambda s: s.casefold()) if protected.case_insensitive else (lambda s: s)
        self.fold = fold
        # (suffix components of a protected prefix, the prefix) for every suffix of >= 2 components
        self.suffixes: list[tuple[tuple[str, ...], str]] = []
        for prefix in protected.prefixes:
            comps = tuple(fold(prefix).strip("/").split("/"))
            for k in range(2, len(comps) + 1):
                self.suffixes.append((comps[-k:], prefix))
        # A token that resolves into a protected tree names the tree's last component as a whole component
        # (the home is never inside a protected tree on a device worth guarding), so only tokens around
        # such a component are resolved: one regex pass instead of resolving every word of a program.
        names = sorted({fold(p.rstrip("/").rsplit("/", 1)[-1]) for p in protected.prefixes if p != "/"}, key=len,
                       reverse=True)
        self.everything = "/" in protected.prefixes
        self.names = re.compile(b"|".join(re.escape(n.encode("utf-8", "surrogateescape")) for n in names),
                                re.I if protected.case_insensitive else 0) if names else None

    def tokens(self, text: bytes):
        """The path-like tokens of ``text`` that contain a protected prefix's last component as a component."""
        if self.everything:
            yield from (t.group() for t in _TOKEN.finditer(text))
            return
        if self.names is None:
            return
        end = -1
        for hit in self.names.finditer(text):
            a, b = hit.span()
            if a < end:  # inside the token already judged
                continue
            if (a > 0 and text[a - 1] != 0x2F and text[a - 1] not in _DELIM) or \
                    (b < len(text) and text[b] != 0x2F and text[b] not in _DELIM):
                continue  # part of a longer component ("hl7x", "metadata")
            start = a
            while start > 0 and text[start - 1] not in _DELIM and a - start < _TAIL:
                start -= 1
            end = b
            while end < len(text) and text[end] not in _DELIM and end - b < _TAIL:
                end += 1
            yield text[start:end]

    def match(self, raw: bytes) -> tuple[str, str] | None:
        token = raw.decode("utf-8", "surrogateescape")
        if token.startswith("~/") or token == "~":
            if self.home is None:
                return self._relative(token[2:])
            token = self.home + token[1:]
        if token.startswith("/"):
            root = self.protected.protecting(token)
            return (normalize_path(token), root) if root else None
        if self.home is not None:
            cand = normalize_path(token, self.home)
            root = self.protected.protecting(cand)
            if root:
                return cand, root
        return self._relative(token)

    def _relative(self, token: str) -> tuple[str, str] | None:
        """Home-independent: the token's leading components repeat a protected prefix's last ones."""
        comps = tuple(self.fold(normalize_path("/" + token)).strip("/").split("/"))
        for suffix, prefix in self.suffixes:
            if comps[:len(suffix)] == suffix:
                return "…/" + "/".join(comps), prefix
        return None


def find_reference(data: bytes, protected: ProtectedPaths, home: str | None = None) -> Reference | None:
    """The first protected path ``data`` names (see the module docstring), or None. Not incremental.

    :param data: the content (a script, a command line, interpreter input)
    :param protected: the device's protected paths
    :param home: the device login's home directory, None if unknown
    """
    return _scan(data, _Matcher(protected, home), "plain", 0)


class UploadJudge:
    """Incremental form of :func:`find_reference` for a stream (an SFTP upload, an exec channel's stdin).

    ``feed`` judges every run that is complete (ended by a delimiter); an unfinished run is held back
    (up to :data:`CARRY_MAX`) and judged with the next chunk or at ``finish``. Chunks must be in
    stream order; out-of-order SFTP writes are judged as they come (``finish`` judges the held tail).
    With ``program`` (the file's name), a stream that does not look like a program
    (:func:`looks_like_program`) is not judged: configuration files name the data directories they
    configure (``datadir=/var/lib/mysql``). Once a reference is found, every later call returns it
    again. After ``limit`` bytes the rest of the stream is not judged and ``unjudged`` counts it. ``eager`` also judges the newest bytes of an
    unfinished run at once (for a stream a program consumes as it arrives: an exec channel's stdin).
    """

    def __init__(self, protected: ProtectedPaths, home: str | None = None, *, limit: int = JUDGE_MAX,
                 eager: bool = False, program: str | None = None) -> None:
        self._program = program
        self._m = _Matcher(protected, home)
        self._carry = bytearray()
        self._limit = limit
        self._eager = eager
        self._whole: bytearray | None = None  # a container (zip, gzip ...) is judged whole, at finish
        self._started = False
        self.found: Reference | None = None
        self.judged = 0
        self.unjudged = 0

    @property
    def judging(self) -> bool:
        """False once the stream was found not to be a program (``program``): it is passed unjudged."""
        return self._limit > 0

    def feed(self, data: bytes) -> Reference | None:
        """Judge the next piece of the stream; the reference found so far, or None."""
        if self.found is not None or not data:
            return self.found
        if self.judged + len(self._carry) + len(self._whole or b"") >= self._limit:
            self.unjudged += len(data)
            return None
        if not self._started:
            self._started = True
            if self._program is not None and not looks_like_program(self._program, data[:_TAIL]):
                self._limit = 0  # a data or config file: judged when a program runs it (script_candidates)
                self.unjudged += len(data)
                return None
            if any(magic in data[:_TAIL] for magic in _MAGICS):  # a zip (also a python zipapp), gzip, xz ...
                self._whole = bytearray()
        if self._whole is not None:
            self._whole += data[:self._limit - len(self._whole)]
            self.unjudged += max(0, len(data) - (self._limit - len(self._whole)))
            return None
        last = data.translate(_MASK).rfind(b"d")  # the last delimiter: what precedes it is complete
        if last < 0:
            self._carry += data
            if len(self._carry) <= CARRY_MAX:
                return self._peek(len(data)) if self._eager else None
            piece = bytes(self._carry[:-_TAIL])  # one run longer than CARRY_MAX: judge it as it stands
            del self._carry[:-_TAIL]
            return self._judge(piece)
        piece = bytes(self._carry) + data[:last + 1]
        self._carry = bytearray(data[last + 1:])
        return self._judge(piece) or (self._peek(len(self._carry)) if self._eager and self._carry else None)

    def _peek(self, new: int) -> Reference | None:
        """Judge the unfinished run's newest bytes now (eager mode: a decoder reading stdin, such as
        ``base64 -d | sh``, acts on a run before it ends): the new bytes plus an overlap, starting at a
        line start (wrapped base64) or at a multiple of four from the run's start; the run is judged
        whole again once it ends."""
        start = max(0, len(self._carry) - new - _TAIL)
        if start:
            nl = self._carry.find(b"\n", start, start + 80)
            start = nl + 1 if nl >= 0 else start - start % 4
        found = _scan(bytes(self._carry[start:]), self._m, "plain", 0)
        if found:
            self.found = found
        return found

    def finish(self) -> Reference | None:
        """End of the stream: judge what was held back."""
        if self.found is None and self._whole is not None:
            whole, self._whole = bytes(self._whole), None
            self._judge(whole)
        if self.found is None and self._carry:
            carry, self._carry = bytes(self._carry), bytearray()
            self._judge(carry)
        return self.found

    def _judge(self, piece: bytes) -> Reference | None:
        self.judged += len(piece)
        self.found = _scan(piece, self._m, "plain", 0)
        return self.found


def _scan(data: bytes, m: _Matcher, via: str, depth: int) -> Reference | None:
    if not data:
        return None
    for tok in m.tokens(data):
        hit = m.match(tok)
        if hit:
            return Reference(tok.decode("utf-8", "replace")[:200], hit[0], hit[1], via)
    if depth >= MAX_DEPTH:
        return None
    for inner, how in _expansions(data, m):
        found = _scan(inner, m, how if via == "plain" else f"{via} > {how}", depth + 1)
        if found:
            return found
    return None


def _expansions(data: bytes, m: _Matcher):
    """Decoded views of ``data``: escapes, containers, base64 and hex runs (each bounded)."""
    if b"\\" in data:  # only a decoded view that names a protected component is worth judging
        decoded = _ESCAPE.sub(_unescape, data)
        if decoded != data and (m.everything or (m.names is not None and m.names.search(decoded))):
            yield decoded, "escapes"
    yield from _containers(data)
    for run in _B64_RUN.finditer(data):  # base64 runs; hex runs are among them (hex digits are base64 letters)
        blob = run.group().translate(None, b"\r\n")
        if len(blob) < 16:
            continue
        if not blob.translate(None, _HEX_DIGITS):
            yield from _decoded(binascii.unhexlify(blob[:len(blob) & ~1]), "hex", m)
            continue
        # encoded bytes mix upper and lower case; words, paths, URLs and rulers rarely do in 16+ letters
        if blob == blob.lower() or blob == blob.upper():
            continue
        for decoded in _b64(blob):
            yield from _decoded(decoded, "base64", m)


def _decoded(decoded: bytes, how: str, m: _Matcher):
    """A decoded run: a container is opened; text is judged if it names a protected component or may be
    encoded again (mostly base64/hex/escape characters); random bytes (an identifier "decoded") are not."""
    opened = list(_containers(decoded))
    if opened:
        for inner, what in opened:
            yield inner, f"{how} > {what}"
    elif m.everything or (m.names is not None and m.names.search(decoded)) or \
            len(decoded.translate(None, _RUN_ASCII)) <= 0.1 * len(decoded):
        yield decoded, how


def _unescape(match: re.Match) -> bytes:
    u, x, octal, other = match.groups()
    if u:
        return chr(int(u, 16)).encode("utf-8", "surrogatepass")
    if x:
        return bytes([int(x, 16)])
    if octal:
        return bytes([int(octal, 8) & 0xFF])
    return _SIMPLE_ESCAPES.get(other, b"\\" + other)


def _b64(blob: bytes) -> list[bytes]:
    out = []
    stripped = blob.rstrip(b"=")
    padded = stripped + b"=" * (-len(stripped) % 4)
    for alt in (b"+/", b"-_"):
        if (alt == b"+/" and (b"-" in blob or b"_" in blob)) or (alt == b"-_" and (b"+" in blob or b"/" in blob)):
            continue
        try:
            out.append(base64.b64decode(padded, altchars=alt, validate=True))
        except (binascii.Error, ValueError):
            continue
    return out


def _containers(data: bytes):
    """Members of a zip (also behind a script, as in a python zipapp), or the expansion of gzip/zlib/bzip2/xz
    data at the start of ``data`` or behind a script header (a self-extracting installer) in its first 64 KiB."""
    if data[:4] == b"PK\x03\x04" or (b"PK\x05\x06" in data[-65558:] and b"PK\x01\x02" in data):
        yield from _zip_members(data)
        return
    if data[:1] == b"\x78" and len(data) > 2 and (data[0] << 8 | data[1]) % 31 == 0:
        yield from _inflate(zlib.decompressobj(), data, "zlib")
        return
    for magic, name, make in _STREAMS:
        at = data.find(magic, 0, 65536)
        if at >= 0:
            yield from _inflate(make(), data[at:], name)


_STREAMS = ((b"\x1f\x8b\x08", "gzip", lambda: zlib.decompressobj(16 + zlib.MAX_WBITS)),
            (b"BZh", "bzip2", bz2.BZ2Decompressor), (b"\xfd7zXZ\x00", "xz", lzma.LZMADecompressor))


def _inflate(dec, data: bytes, name: str):
    try:
        out = dec.decompress(data, EXPAND_MAX)
    except (zlib.error, OSError, EOFError, lzma.LZMAError, ValueError):
        return
    if out:
        yield out, name


def _zip_members(data: bytes):
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()[:_ZIP_MEMBERS]
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return
    total = 0
    for info in infos:
        if info.is_dir() or total >= _ZIP_TOTAL:
            continue
        try:
            with archive.open(info) as member:
                content = member.read(min(EXPAND_MAX, _ZIP_TOTAL - total))
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, RuntimeError,
                zlib.error, lzma.LZMAError):
            continue
        total += len(content)
        yield content, f"zip:{info.filename[:120]}"


_SCRIPT_SUFFIXES = (".py", ".pyc", ".pyz", ".sh", ".bash", ".ksh", ".zsh", ".pl", ".pm", ".rb", ".php", ".js",
                    ".mjs", ".lua", ".tcl", ".awk", ".sed", ".ps1", ".psm1", ".bat", ".cmd", ".vbs", ".r", ".jl",
                    ".exp")  # not .bin/.img: firmware images hold whole filesystems, config files and all
_INTERPRETER = re.compile(r"^(python[0-9.]*|pypy[0-9.]*|perl[0-9.]*|ruby[0-9.]*|node(js)?|php[0-9.]*|lua[0-9.]*|"
                          r"tclsh[0-9.]*|wish|[gm]?awk|sed|sh|bash|dash|ksh|zsh|ash|busybox|env|pwsh|Rscript|julia|"
                          r"expect|osascript|source|\.)$")


def looks_like_program(name: str, head: bytes) -> bool:
    """True when an uploaded file is something a device runs: ``#!``, a zip (python zipapp), an ELF, or a
    script's file name (``.py``, ``.sh``, ``AnsiballZ_*``, ...)."""
    base = name.rsplit("/", 1)[-1].lower()
    return head[:2] == b"#!" or head[:4] in (b"PK\x03\x04", b"\x7fELF") or base.endswith(_SCRIPT_SUFFIXES) or \
        base.startswith("ansiballz_")


def script_candidates(command: str, limit: int = 4) -> list[str]:
    """Files an exec command runs as a program: the first operand of an interpreter (``python3 x``,
    ``sh -c '…'`` is read again), and a command word that is a path (``./collect``, ``~/x.py``), outside
    the system directories. Pure and lexical; the caller reads and judges each file on the device.

    :param command: the exec command line
    :param limit: at most this many paths
    """
    out: list[str] = []
    cwd = [""]  # the directory `cd` moved to, as a prefix for relative scripts ("" = the login's home)

    def walk(line: str, depth: int) -> None:
        try:
            words = shlex.split(line, comments=False)
        except ValueError:
            words = line.split()
        words = [part for w in words for part in ((w[:-1], ";") if len(w) > 1 and w.endswith(";") else (w,))]
        at_start, interp, skip, cd = True, False, False, False
        for word in words:
            if cd:  # cd DIR
                cd = False
                if word in ("~", "-"):
                    cwd[0] = ""
                elif word.startswith(("/", "~/")):
                    cwd[0] = word.rstrip("/") + "/"
                else:
                    cwd[0] = cwd[0] + word.rstrip("/") + "/"
                continue
            if word in (";", "&&", "||", "|", "&", "(", ")"):
                at_start, interp, skip = True, False, False
                continue
            base = word.rsplit("/", 1)[-1]
            if (interp or at_start or skip) and " " in word and depth < 3:
                walk(word, depth + 1)  # sh -c '…', python3 -c '…' (its paths: the command check)
                interp = at_start = skip = False
                continue
            if skip:  # the argument of -c/-e/-m: code or a module name, not a file
                skip = interp = False
                continue
            if interp and word.startswith("-"):
                skip = word in _CODE_OPTIONS
                continue
            if at_start and (base in _PREFIXES or word.isdigit()):
                continue
            if at_start and word in ("cd", "pushd"):
                cd, at_start = True, False
                continue
            if (at_start or interp) and _INTERPRETER.match(base):
                interp, at_start = True, False
                continue
            if interp or (at_start and "/" in word):
                path = word if word.startswith(("/", "~")) else cwd[0] + word
                if not path.startswith(_SYSTEM_DIRS) and path not in out:
                    out.append(path)
            interp = at_start = False
            if "=" in word and "/" not in word.split("=", 1)[0]:
                at_start = True  # VAR=value cmd

    walk(command, 0)
    return out[:limit]


def path_tokens(data: bytes, limit: int = 32) -> list[str]:
    """Path-like words of a script, to resolve on the device (a symlink into a protected tree names no
    protected path): plain-text tokens with a ``/`` and a letter or digit, outside the system directories,
    in order of appearance, without duplicates, at most ``limit`` of them.
    """
    out: dict[str, None] = {}
    for tok in _TOKEN.finditer(data):
        raw = tok.group()
        if b"/" not in raw or len(raw) > 1024 or raw.startswith(b"//") or not any(c.isalnum() for c in raw.decode(
                "utf-8", "replace")):
            continue
        text = raw.decode("utf-8", "surrogateescape")
        if text.startswith(_SYSTEM_DIRS) or text in out:
            continue
        out[text] = None
        if len(out) >= limit:
            break
    return list(out)


def runs_interpreter(command: str) -> bool:
    """True when a simple command of ``command`` (``sh -c '…'`` read again) starts an interpreter or shell
    (``python3``, ``sh -s``, ``perl``, ``env python3``): its stdin may be a program, so all of it is judged.
    Otherwise (``cat > f``, ``dd of=f``, ``tee f``) stdin is judged only when it looks like a program."""

    def walk(line: str, depth: int) -> bool:
        try:
            words = shlex.split(line, comments=False)
        except ValueError:
            words = line.split()
        at_start = True
        for word in words:
            if word.endswith((";", "&&", "||", "|", "&")) or word in ("(", ")"):
                at_start = True
                continue
            base = word.rsplit("/", 1)[-1]
            if " " in word and depth < 3 and walk(word, depth + 1):
                return True
            if at_start and (base in _PREFIXES or "=" in word or word.isdigit()):
                continue
            if at_start and _INTERPRETER.match(base):
                return True
            at_start = False
        return False

    return walk(command, 0)


_CODE_OPTIONS = frozenset({"-c", "-e", "-E", "-m", "-r", "--eval", "-W", "-X"})
_PREFIXES = frozenset({"sudo", "nice", "nohup", "timeout", "exec", "command", "time", "stdbuf", "ionice", "chrt",
                       "setsid", "doas", "xargs"})
_SYSTEM_DIRS = ("/bin/", "/sbin/", "/usr/bin/", "/usr/sbin/", "/usr/local/bin/", "/usr/lib/", "/lib/", "/etc/init.d/")


class StreamGuard:
    """An :class:`UploadJudge` that answers with the sentence for the vendor: what the relay and the SFTP
    filter hold per exec channel's stdin or per uploaded file.

    :param protected: the device's protected paths
    :param what: how the refusal names the stream ("the uploaded file /x", "the input of this command")
    :param home: the device login's home directory, None if unknown
    """

    def __init__(self, protected: ProtectedPaths, what: str, home: str | None = None, *,
                 limit: int = JUDGE_MAX, eager: bool = False, program: str | None = None,
                 resolve: Callable[[bytes], Awaitable[tuple[str, str] | None]] | None = None) -> None:
        self.judge = UploadJudge(protected, home, limit=limit, eager=eager, program=program)
        self.protected, self.device, self.what = protected, protected.device, what
        self._resolve = resolve
        self._kept = bytearray()  # the first _KEEP bytes, for vet()

    def feed(self, data: bytes) -> str | None:
        """Judge the next piece; the refusal sentence once a protected path is named, else None."""
        reason = self._reason(self.judge.feed(data))
        if self._resolve is not None and len(self._kept) < _KEEP and self.judge.judging:
            self._kept += data[:_KEEP - len(self._kept)]
        return reason

    async def vet(self) -> str | None:
        """After :meth:`finish` found nothing: resolve the stream's path-like words on the device
        (``resolve(data)`` -> (word, resolved protected path) or None); the refusal sentence or None."""
        if self._resolve is None or not self._kept:
            return None
        linked = await self._resolve(bytes(self._kept))
        if linked is None:
            return None
        token, resolved = linked
        return f"{self.what} names {token}, which is {self.protected.protected_reason(resolved)}"

    def finish(self) -> str | None:
        """End of the stream (EOF, CLOSE): judge the rest; the refusal sentence or None."""
        return self._reason(self.judge.finish())

    @property
    def reference(self) -> Reference | None:
        return self.judge.found

    def _reason(self, ref: Reference | None) -> str | None:
        return ref.reason(self.device, self.what) if ref is not None else None
