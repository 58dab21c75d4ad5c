"""Legacy scp's grammar: the strict command line, the protocol records, and the reader that frames them.

:func:`parse_scp_command` accepts one strict grammar (``scp -t|-f [-r] [-p] [-d] [-v] [--] PATH``, one path,
no globs, no shell syntax, no ``~user``); :func:`parse_record` parses one C/D/E/T (or 1/2 error) record;
:class:`ScpInput` buffers the vendor's bytes so split or coalesced records are fine. No I/O of its own:
the server that speaks the protocol is sessions/scp.py.
"""

from __future__ import annotations

import asyncio
import posixpath
import re
from dataclasses import dataclass
from typing import Callable

from medcore.errors import BrokerError, PermissionDeniedError

__all__ = ["ScpCommand", "ScpCommandError", "ScpInput", "ScpProtocolError", "ScpRecord", "is_scp_command",
           "parse_record", "parse_scp_command", "transfer_server_refusal"]

_MAX_LINE = 4096
_INPUT_HIGH = 4 * 1024 * 1024
_UNQUOTED_SYNTAX = set(";&|<>()$`{}!")
_GLOB = set("*?[]")
_FLAG_LETTERS = set("tfrpdv")
_HINT = "or use scp without -O (it speaks SFTP) or sftp (PuTTY: pscp -sftp or psftp)"


class ScpCommandError(PermissionDeniedError):
    """An exec command for the scp server that medbroker will not run; the message says why."""


class ScpProtocolError(BrokerError):
    """The vendor's client broke the SCP protocol (bad record, oversized line, lost data)."""


@dataclass(frozen=True)
class ScpCommand:
    """A parsed ``scp -t``/``scp -f`` command. ``sink``: the vendor uploads (``-t``); else it downloads."""

    sink: bool
    path: bytes
    recursive: bool = False
    preserve: bool = False
    must_be_dir: bool = False


@dataclass(frozen=True)
class ScpRecord:
    """One SCP control record: ``kind`` is C, D, E or T (or 1/2 for an error the client reports)."""

    kind: str
    mode: int = 0
    size: int = 0
    name: bytes = b""
    mtime: int = 0
    atime: int = 0
    message: str = ""


def _naive_words(command: str) -> list[str]:
    return command.replace("'", "").replace('"', "").replace("\\", "").split()


def is_scp_command(command: str) -> bool:
    """True if ``command`` asks for an scp server (``scp`` with ``-t`` or ``-f``), however it is spelled.

    Deliberately wide (``/usr/bin/scp -rf x``, ``'scp' -t .``, ``sh -c 'scp -f x'``): such commands are
    served by :class:`ScpServer` or refused by :func:`parse_scp_command`, never run on the device.
    """
    words = _naive_words(command)
    has_scp = any(posixpath.basename(w) == "scp" for w in words)
    return has_scp and any(w.startswith("-") and w != "--" and set(w[1:]) & {"t", "f"} for w in words)


def transfer_server_refusal(command: str) -> str | None:
    """A refusal for exec commands that start a file-transfer server the guards cannot read, else None.

    ``sftp -s /usr/lib/openssh/sftp-server`` runs the SFTP server as an exec command (bypassing the
    SFTP filter, which only sits on the ``sftp`` subsystem); ``rsync -e ssh`` runs ``rsync --server``,
    whose stream can be compressed so the content check cannot see patient data in it.
    """
    words = _naive_words(command)
    names = {posixpath.basename(w) for w in words}
    if names & {"sftp-server", "internal-sftp"}:
        return ("running the SFTP server as a command (sftp -s) is not available through medbroker; use sftp or "
                "scp without -s, where medbroker checks every file")
    if "rsync" in names and "--server" in words:
        return ("rsync is not available through medbroker: its stream can be compressed, so the patient-data "
                "check cannot read it; use scp or sftp")
    return None


def _split_words(command: str) -> list[tuple[str, bool]]:
    """Split like a POSIX shell, but refuse everything a shell would expand: (word, starts with bare ``~``)."""
    words: list[tuple[str, bool]] = []
    cur: list[str] | None = None
    tilde = False
    i, n = 0, len(command)
    while i < n:
        c = command[i]
        if c in " \t":
            if cur is not None:
                words.append(("".join(cur), tilde))
                cur = None
            i += 1
            continue
        if ord(c) < 0x20 or c == "\x7f":
            raise ScpCommandError(f"the scp command contains a control character ({c!r}); medbroker refuses it",
                                  _HINT)
        start = cur is None
        if start:
            cur, tilde = [], c == "~"
        assert cur is not None
        if c == "'":
            end = command.find("'", i + 1)
            if end < 0:
                raise ScpCommandError("the scp command has an unterminated quote", _HINT)
            cur.append(command[i + 1:end])
            i = end + 1
        elif c == '"':
            end = command.find('"', i + 1)
            if end < 0:
                raise ScpCommandError("the scp command has an unterminated quote", _HINT)
            inner = command[i + 1:end]
            if set(inner) & set("$`\\"):
                raise ScpCommandError(f"the scp path {inner!r} uses shell expansion, which medbroker does not run; "
                                      "name the file literally", _HINT)
            cur.append(inner)
            i = end + 1
        elif c == "\\":
            if i + 1 >= n:
                raise ScpCommandError("the scp command ends with a backslash", _HINT)
            cur.append(command[i + 1])
            i += 2
        elif c in _GLOB:
            raise ScpCommandError(
                "legacy scp (scp -O) through medbroker copies exactly one named file or directory and does not "
                f"expand wildcards ({c!r})", "name the file, copy a directory with -r, " + _HINT)
        elif c in _UNQUOTED_SYNTAX or (c == "#" and start):
            raise ScpCommandError(f"{c!r} is shell syntax, and medbroker runs legacy scp itself without a shell; "
                                  "it accepts one plain path", _HINT)
        else:
            cur.append(c)
            i += 1
    if cur is not None:
        words.append(("".join(cur), tilde))
    return words


def parse_scp_command(command: str) -> ScpCommand:
    """Parse an scp server command strictly: ``scp -t|-f [-r] [-p] [-d] [-v] [--] PATH``.

    Flags may be combined (``-rf``); ``PATH`` is one word after shell-style quote removal; ``~`` and
    ``~/x`` mean the login's home (the device's SFTP working directory); an empty path means ``.``.

    :param command: the exec command line as the vendor's client sent it
    :return: the :class:`ScpCommand`
    :raises ScpCommandError: anything else (globs, shell syntax, ``~user``, other options, not one path)
    """
    words = _split_words(command)
    if not words or posixpath.basename(words[0][0]) != "scp":
        raise ScpCommandError("medbroker serves legacy scp itself and accepts only "
                              "'scp -t|-f [-r] [-p] [-d] [-v] [--] PATH'", _HINT)
    flags: set[str] = set()
    operands: list[tuple[str, bool]] = []
    options_done = False
    for word, tilde in words[1:]:
        if not options_done and word == "--":
            options_done = True
        elif not options_done and word.startswith("-") and len(word) > 1:
            unknown = set(word[1:]) - _FLAG_LETTERS
            if unknown:
                raise ScpCommandError(f"the scp option -{sorted(unknown)[0]} is not supported through medbroker",
                                      "use scp -O with -r or -p only, " + _HINT)
            flags |= set(word[1:])
        else:
            operands.append((word, tilde))
    if ("t" in flags) == ("f" in flags):
        raise ScpCommandError("an scp server command needs exactly one of -t and -f", _HINT)
    if len(operands) != 1:
        raise ScpCommandError(f"legacy scp through medbroker takes exactly one path, not {len(operands)} "
                              "(quote a path with spaces)", _HINT)
    path, tilde = operands[0]
    if "\0" in path:
        raise ScpCommandError("the scp path contains a NUL byte", _HINT)
    if tilde:
        if path == "~" or path.startswith("~/"):
            path = path[2:] or "."
        else:
            raise ScpCommandError(f"{path.split('/')[0]!r} (another user's home) is not available through "
                                  "medbroker's legacy scp", "use an absolute path, " + _HINT)
    return ScpCommand(sink="t" in flags, path=(path or ".").encode("utf-8", "surrogateescape"),
                      recursive="r" in flags, preserve="p" in flags, must_be_dir="d" in flags)


_CD = re.compile(rb"([CD])([0-7]{4}) ([0-9]{1,19}) (.*)", re.DOTALL)
_T = re.compile(rb"T([0-9]{1,19}) ([0-9]{1,6}) ([0-9]{1,19}) ([0-9]{1,6})")


def parse_record(line: bytes) -> ScpRecord:
    """Parse one control record from the vendor's scp (the line without its ``\\n``).

    :raises ScpProtocolError: anything but a well-formed C, D, E, T record or a 1/2 error record;
        C/D names that are empty, ``..`` or contain ``/`` or NUL (they would escape the target), and
        ``.`` as a file name (``D0755 0 .`` is what ``scp -r . host:dir`` sends: the target itself)
    """
    if not line:
        raise ScpProtocolError("empty SCP record")
    kind = line[:1]
    if kind in (b"\x01", b"\x02"):
        return ScpRecord("1" if kind == b"\x01" else "2", message=line[1:].decode("utf-8", "replace"))
    if line == b"E":
        return ScpRecord("E")
    m = _T.fullmatch(line)
    if m:
        return ScpRecord("T", mtime=int(m.group(1)), atime=int(m.group(3)))
    m = _CD.fullmatch(line)
    if m is None:
        raise ScpProtocolError(f"unexpected SCP record {line[:60]!r}")
    name = m.group(4)
    if name in (b"", b"..") or (name == b"." and m.group(1) == b"C") or b"/" in name or b"\0" in name:
        raise ScpProtocolError(f"unexpected file name {name[:60]!r} in an SCP record")
    size = int(m.group(3))
    if size >= 1 << 63:
        raise ScpProtocolError("file size out of range in an SCP record")
    return ScpRecord(m.group(1).decode(), mode=int(m.group(2), 8), size=size, name=name)


class ScpInput:
    """Bytes from the vendor, consumed by the protocol task; holds the vendor channel while too much waits."""

    def __init__(self, pause: Callable[[], None], resume: Callable[[], None]) -> None:
        self._buf = bytearray()
        self._eof = False
        self._event = asyncio.Event()
        self._pause, self._resume, self._paused = pause, resume, False

    def feed(self, data: bytes) -> None:
        self._buf += data
        self._event.set()
        if len(self._buf) > _INPUT_HIGH and not self._paused:
            self._paused = True
            self._pause()

    def feed_eof(self) -> None:
        self._eof = True
        self._event.set()

    async def _more(self) -> bool:
        if self._eof:
            return False
        self._event.clear()
        await self._event.wait()
        return True

    def _take(self, n: int) -> bytes:
        out = bytes(self._buf[:n])
        del self._buf[:n]
        if self._paused and len(self._buf) < _INPUT_HIGH // 2:
            self._paused = False
            self._resume()
        return out

    async def readline(self) -> bytes | None:
        """One line without its newline; None at a clean end of input."""
        while True:
            end = self._buf.find(b"\n", 0, _MAX_LINE + 1)
            if end >= 0:
                return self._take(end + 1)[:-1]
            if len(self._buf) > _MAX_LINE:
                raise ScpProtocolError(f"SCP record longer than {_MAX_LINE} bytes")
            if not await self._more():
                if self._buf:
                    raise ScpProtocolError("the connection ended in the middle of an SCP record")
                return None

    async def read_some(self, n: int) -> bytes:
        """Up to ``n`` bytes (at least one); b"" at the end of input."""
        while not self._buf:
            if not await self._more():
                return b""
        return self._take(n)
