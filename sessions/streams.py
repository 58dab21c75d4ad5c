"""File-transfer protocols on shell and exec channels: recognise their stream shapes, whatever the command line.

A command line can be built at run time (``S=/usr/lib/openssh/sftp-ser; ${S}ver``, ``sc""p -f``), typed in
an interactive shell, or hidden in an interpreter, so the broker judges the *bytes* that flow on a shell or
exec channel. :class:`StreamJudge` is fed every chunk of both directions and names the first protocol it
recognises; the relay then ends the channel before that chunk is delivered (issue 11, finding 3). A
file-transfer protocol there would bypass the SFTP/scp guard (realpath checks, content pre-reads), so the
vendor is told to use sftp or scp through the broker instead.

What is recognised (docs/data-protection.md, "Stream detection"):

* ``sftp``: the client's INIT (``uint32 5, byte 1, uint32 version`` at the start of a chunk, or with
  extension pairs that fill it exactly) and the server's VERSION (``byte 2``, version, extension pairs that
  fill the packet exactly; without extensions only after an INIT-like packet from the vendor).
* ``scp``: the legacy protocol's file and directory records (``C0644 12 name\\n``, ``D0755 0 dir\\n``, an
  optional ``T`` time record before them) at the start of a line or after an ``\\0`` acknowledgment.
* ``rsync``: the daemon greeting ``@RSYNCD: <version>`` on a line of its own, and ``rsync --server``'s
  binary start: both directions begin with a 4-byte little-endian protocol version (20..40).
* ``tar``: a 512-byte header block with a valid checksum, found by its ``ustar`` magic (POSIX, GNU, pax) or
  by its NUL-terminated octal mode/uid/gid fields (v7 headers without magic).
* ``cpio``: new-ASCII (``070701``/``070702``) and old-ASCII (``070707``) headers with a NUL-terminated name.
* ``ssh``: an SSH identification line (``SSH-2.0-...``): a tunnel to an sshd (``nc host 22``) would carry
  an encrypted session, and so unrecorded file transfers, through the channel.

Each chunk is searched together with the last :data:`OVERLAP` bytes of its direction (more while a header
is incomplete), so a signature split across chunks is still found; only the chunk that completes a signature is withheld (at most the part of
a header that came before it reached the peer, never file names or data of a completed record). Cost and
false-alarm measurements: docs/data-protection.md. Pure: no I/O, no asyncio.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from sessions.anchors import Anchors, literal

__all__ = ["StreamJudge", "StreamHit", "PROTOCOLS", "VENDOR", "DEVICE", "OVERLAP", "stream_refusal"]

VENDOR, DEVICE = "vendor", "device"
"""Directions: bytes the vendor sent (towards the device) and bytes the device sent (towards the vendor)."""
PROTOCOLS = ("sftp", "scp", "rsync", "tar", "cpio", "ssh")
_MAX_SFTP_HELLO = 4096  # longer INIT/VERSION packets are not judged as SFTP (OpenSSH's is ~330 bytes)

# SFTP: the canonical INIT every client sends first (OpenSSH sftp, paramiko, sshfs, WinSCP: version 3..6),
# an INIT carrying extension pairs, and the server's VERSION (see _sftp_hello).
_SFTP_INIT = re.compile(rb"\x00\x00\x00\x05\x01\x00\x00\x00[\x01-\x06]")
# INIT/VERSION found by type byte + version (much faster in binary data than from the length's NULs)
_SFTP_HELLO = {VENDOR: re.compile(rb"\x01\x00\x00\x00[\x01-\x06]"), DEVICE: re.compile(rb"\x02\x00\x00\x00[\x01-\x06]")}
_SFTP_LOOSE_INIT = re.compile(rb"\x00\x00[\x00-\x03][\x05-\xff]\x01", re.S)  # any length, any version
# scp (-f source, -t sink) records start a line or follow an \0 acknowledgment. scp only sends one after the
# peer's \0 (or at the start of its stream), so they are searched only there (see StreamJudge._armed).
_SCP = re.compile(rb"[\n\x00](?:T\d{1,20} \d{1,9} \d{1,20} \d{1,9}\r?\n)?[CD][0-7]{4} \d{1,20} [^\n\0/]{1,255}\r?\n")
SCP_WINDOW = 64 * 1024
"""Bytes of a direction searched for scp records after the other direction sent a NUL byte."""
# Line-anchored records, matched at a candidate found with bytes.find (much faster than a regex search)
_RSYNCD = re.compile(rb"@RSYNCD: \d{1,3}")
_RSYNC_VERSION = re.compile(rb"[\x14-\x28]\x00\x00\x00")
_SSH_BANNER = re.compile(rb"SSH-(?:2\.0|1\.99)-[\x21-\x7e]{1,200}(?: [\x20-\x7e]{0,200})?\r?\n")
_LINE_RECORDS = (("rsync", b"@RSYNCD: ", b"\n\x00", _RSYNCD), ("ssh", b"SSH-", b"\n", _SSH_BANNER))
# tar: a header block is found by its ustar magic (offset 257: POSIX, GNU, pax) or by its checksum field
# as GNU tar, bsdtar, busybox and Python's tarfile write it, six octal digits, NUL, space (offset 148: this
# finds v7 headers without magic too); either way the block's checksum must be right.
_TAR_CHKSUM = re.compile(rb"[0-7]{6}\x00 ")
_NUL_RUN = b"\x00" * 32
# cpio: new ASCII (070701, 070702 with CRC): 13 hex fields; old ASCII (070707, odc): octal fields
_CPIO = re.compile(rb"0707(?:0[12][0-9A-Fa-f]{104}|07[0-7]{70})")
OVERLAP = 600
"""Bytes of the previous data searched again with each chunk: longer than any signature's fixed part (a
scp T+C record: 330; an SSH banner: 410), so a signature split across chunks is found."""
_MAX_KEEP = 8192
# Binary data (a NUL in view): the anchors the checks below start from, per direction, so that one compiled pass
# (sessions/anchors.py, with Hyperscan) says which checks can find anything; without it every check runs. The
# NUL run of v7 tar headers stays a bytes.find: Hyperscan slows to 1.4 s/GiB on NUL-padded binaries with it
# (0.2 without), and so does the loose INIT pattern, which is searched only until it was seen once.
_COMMON_ANCHORS = {"ustar": literal(b"ustar"), "cpio": literal(b"0707"),
                   **{name: literal(needle) for name, needle, _, _ in _LINE_RECORDS}}
_BINARY_ANCHORS = {
    (VENDOR, False): Anchors({"hello": _SFTP_HELLO[VENDOR].pattern, "loose": _SFTP_LOOSE_INIT.pattern,
                              **_COMMON_ANCHORS}),
    (VENDOR, True): Anchors({"hello": _SFTP_HELLO[VENDOR].pattern, **_COMMON_ANCHORS}),
    (DEVICE, False): Anchors({"hello": _SFTP_HELLO[DEVICE].pattern, **_COMMON_ANCHORS}),
}

_REASONS = {
    "sftp": "an SFTP server or client",
    "scp": "the legacy scp protocol",
    "rsync": "the rsync protocol",
    "tar": "a tar archive stream",
    "cpio": "a cpio archive stream",
    "ssh": "an SSH connection tunnelled through the channel",
}


@dataclass(frozen=True)
class StreamHit:
    """What the judge recognised: ``protocol`` (one of :data:`PROTOCOLS`), ``direction`` (:data:`VENDOR` or
    :data:`DEVICE`) and ``offset``, the byte offset in that direction's stream where the signature starts
    (-1 when it spans both directions, as rsync's version exchange)."""

    protocol: str
    direction: str
    offset: int


def stream_refusal(hit: StreamHit, *, forward: bool = False) -> str:
    """The sentence the vendor reads when a channel (``forward``: a forwarded connection) is ended for ``hit``."""
    where, what = ("this forwarded connection", "through a port forward") if forward else \
        ("this channel", "on shell and exec channels")
    return (f"{_REASONS.get(hit.protocol, hit.protocol)} was detected on {where} "
            f"({'sent by you' if hit.direction == VENDOR else 'sent by the device'}); file transfers {what} "
            f"bypass the patient-data guard, so {'it' if forward else 'the channel'} was closed. Use sftp or scp "
            "through medbroker (PuTTY: psftp or pscp -sftp), where every file is checked")


class StreamJudge:
    """Recognises file-transfer protocols in the two byte streams of one shell or exec channel.

    ``feed(direction, data)`` returns the protocol name of the first hit (and the same name for every later
    call: the verdict is final), else None. Cheap per chunk: ``bytes.find`` for literal anchors and a few
    C-level regex scans over the new bytes plus :data:`OVERLAP` earlier ones; the NUL-anchored formats
    (SFTP, tar, cpio) only when a NUL byte is there. A candidate whose header is still incomplete (an SFTP
    VERSION or a tar block split across chunks) is searched again with the next chunk, up to 8 KiB back.
    """

    def __init__(self) -> None:
        # A virtual "\n" before each stream (offset -1) lets line-anchored records match at offset 0.
        self._tail = {VENDOR: b"\n", DEVICE: b"\n"}
        self._seen = {VENDOR: 0, DEVICE: 0}
        self._resume = {VENDOR: -1, DEVICE: -1}
        self._head = {VENDOR: b"", DEVICE: b""}
        self._armed = {VENDOR: SCP_WINDOW, DEVICE: SCP_WINDOW}  # bytes still searched for scp records
        self._init_seen = False
        self.hit: StreamHit | None = None

    def feed(self, direction: str, data: bytes) -> str | None:
        """Judge one chunk; see the class docstring.

        :param direction: :data:`VENDOR` or :data:`DEVICE`
        :param data: the chunk, before it is delivered
        :return: the protocol recognised (this chunk must then not be delivered), or None
        :raises ValueError: an unknown direction
        """
        if self.hit is not None:
            return self.hit.protocol
        if direction not in self._tail:
            raise ValueError(f"direction must be {VENDOR!r} or {DEVICE!r}, not {direction!r}")
        if not data:
            return None
        tail = self._tail[direction]
        buf = tail + data
        base = self._seen[direction] - len(tail)  # stream offset of buf[0]
        head_grew = len(self._head[direction]) < 4
        if head_grew:
            self._head[direction] += data[:4 - len(self._head[direction])]
        self._seen[direction] = end = self._seen[direction] + len(data)
        found, pending = self._scan(direction, buf, max(0, self._resume[direction] - base), len(tail))
        if found is None and self._armed[direction] > 0:
            m = _SCP.search(buf, max(0, self._resume[direction] - base), len(tail) + self._armed[direction])
            if m:
                found = ("scp", m.start() + 1)
            self._armed[direction] = max(0, self._armed[direction] - len(data))
        if b"\x00" in data:  # an scp acknowledgment, maybe: the other side may now send a record
            self._armed[VENDOR if direction == DEVICE else DEVICE] = SCP_WINDOW
        if found is None and head_grew and self._rsync_start():  # the heads only change while they grow
            found = ("rsync", -1 - base)
        if found is not None:
            self.hit = StreamHit(found[0], direction, base + found[1])
            return found[0]
        resume = end - OVERLAP if pending is None else min(base + pending, end - OVERLAP)
        self._resume[direction] = resume = max(resume, end - _MAX_KEEP, -1)
        self._tail[direction] = buf[max(0, resume - 512 - base):]  # a tar block starts up to 257 bytes back
        return None

    # ------------------------------------------------------------------------------------------ detectors
    def _scan(self, direction: str, buf: bytes, start: int, fresh: int) -> tuple[tuple[str, int] | None, int | None]:
        """(protocol, position) of a hit in ``buf[start:]`` (``buf[fresh:]`` is the new chunk), and the position
        of the earliest candidate that needs more bytes (or None)."""
        pending: list[int] = []
        records: tuple[tuple[str, bytes, bytes, re.Pattern[bytes]], ...] = _LINE_RECORDS
        if b"\x00" in buf:  # SFTP, tar and cpio headers all hold NUL bytes; terminal text rarely does
            anchors = _BINARY_ANCHORS[direction, direction == VENDOR and self._init_seen]
            seen = anchors.present(buf, start)  # the checks whose anchors occur (all of them without the engine)
            found = self._sftp(direction, buf, start, fresh, pending, seen)
            if found is None:
                found = _find_tar(buf, start, pending, magic="ustar" in seen)
            if found is None and "cpio" in seen:
                found = _find_cpio(buf, start, pending)
            if found is not None:
                return found, None
            records = tuple(r for r in records if r[0] in seen)
        for name, needle, after, pattern in records:  # at the start of a line (rsync: or after a NUL)
            if buf.find(needle[:1], max(1, start)) == -1:  # memchr: text rarely has an "@" (half the cost of text)
                continue
            i = buf.find(needle, max(1, start))
            while i >= 0:
                if buf[i - 1] in after and pattern.match(buf, i):
                    return (name, i), None
                i = buf.find(needle, i + 1)
        return None, min(pending) if pending else None

    def _sftp(self, direction: str, buf: bytes, start: int, fresh: int, pending: list[int],
              seen: frozenset[str]) -> tuple[str, int] | None:
        if direction == VENDOR:
            # A client writes its INIT as one message, so it starts a chunk; anywhere else these 9 bytes are
            # too common in binaries being uploaded (measured: node, libLLVM). An INIT split on purpose is
            # still given away by the server's VERSION, which comes before any file data.
            if _SFTP_INIT.match(buf, fresh):
                return "sftp", fresh
            if not self._init_seen and "loose" in seen and _SFTP_LOOSE_INIT.search(buf, start):
                self._init_seen = True  # lets a VERSION without extensions count (see _sftp_hello)
        if "hello" not in seen:
            return None
        for m in _SFTP_HELLO[direction].finditer(buf, start):
            pos = m.start() - 4  # the packet's length field
            if pos < 0 or buf[pos] or buf[pos + 1] > 3:
                continue
            verdict = _sftp_hello(buf, pos, bare_ok=direction == DEVICE and self._init_seen)
            if verdict:
                return "sftp", pos
            if verdict is None:
                pending.append(m.start())
        return None

    def _rsync_start(self) -> bool:
        """rsync --server and its client both open with their protocol version as a 4-byte little-endian int."""
        v, d = self._head[VENDOR], self._head[DEVICE]
        return len(v) == 4 and len(d) == 4 and bool(_RSYNC_VERSION.fullmatch(v)) and bool(_RSYNC_VERSION.fullmatch(d))


def _sftp_hello(buf: bytes, pos: int, *, bare_ok: bool) -> bool | None:
    """An INIT or VERSION packet at ``pos``: length 5 (only if ``bare_ok``: a VERSION after an INIT-like packet) or
    a length that extension pairs (printable name, any value) fill exactly. None: the packet is incomplete."""
    (length,) = struct.unpack_from(">I", buf, pos)
    if length == 5:  # a bare INIT counts only at the start of a chunk (StreamJudge._sftp)
        return bare_ok
    if length < 5 or length > _MAX_SFTP_HELLO:
        return False
    if pos + 4 + length > len(buf):
        return None
    cur, end = pos + 9, pos + 4 + length
    pairs = 0
    while cur < end:
        if cur + 4 > end:
            return False
        (n,) = struct.unpack_from(">I", buf, cur)
        name = buf[cur + 4:cur + 4 + n]
        if not 1 <= n <= 255 or len(name) != n or not _printable(name):
            return False
        cur += 4 + n
        if cur + 4 > end:
            return False
        (n,) = struct.unpack_from(">I", buf, cur)
        cur += 4 + n
        pairs += 1
    return cur == end and pairs > 0


def _printable(b: bytes) -> bool:
    return all(0x21 <= c <= 0x7e for c in b)


def _printable_name(b: bytes) -> bool:
    return all(0x20 <= c <= 0x7e or c >= 0x80 for c in b)


def _octal(field: bytes) -> int | None:
    digits = field.strip(b" \x00")
    if not digits or any(c not in b"01234567" for c in digits):
        return None
    return int(digits, 8)


def _find_tar(buf: bytes, start: int, pending: list[int], *, magic: bool = True) -> tuple[str, int] | None:
    """A tar header in ``buf[start:]``, by its ``ustar`` magic (``magic``: the caller knows there is one, or does
    not know; sessions/anchors.py) and before a run of NULs."""
    i = buf.find(b"ustar", start) if magic else -1
    while i >= 0:
        verdict = _tar_block(buf, i - 257) if i >= 257 else False
        if verdict:
            return "tar", i - 257
        if verdict is None:
            pending.append(i)
        i = buf.find(b"ustar", i + 1)
    # Without magic (v7) the block ends in 255 NUL bytes and its name and link name are NUL-padded, so the
    # checksum field is looked for only just before a run of 32 NULs (bytes.find of a 2-byte needle over
    # all binary output would cost more than everything else together).
    run = buf.find(_NUL_RUN, start)
    while run >= 0:
        i = buf.find(b"\x00 ", max(0, run - 110), run + 2)
        while i >= 0:
            if i >= 154 and _TAR_CHKSUM.match(buf, i - 6):
                verdict = _tar_block(buf, i - 154, need_name=True)
                if verdict:
                    return "tar", i - 154
                if verdict is None:
                    pending.append(i)
            i = buf.find(b"\x00 ", i + 1, run + 2)
        end = run + 32
        while buf.startswith(_NUL_RUN, end):  # skip the rest of a long run
            end += 32
        run = buf.find(_NUL_RUN, end)
    return None


def _tar_block(buf: bytes, pos: int, *, need_name: bool = False) -> bool | None:
    """A tar header block at ``pos`` whose checksum (unsigned or signed, as tar accepts) is right; None when
    the block is incomplete."""
    block = buf[pos:pos + 512]
    if len(block) < 512:
        return None
    stored = _octal(block[148:156])
    if stored is None:
        return False
    rest = block[:148] + block[156:]
    plain = sum(rest) + 8 * 32
    if stored != plain and stored != plain - 256 * sum(1 for c in rest if c >= 128):
        return False
    if need_name:  # found by its fields, maybe without magic (v7): a printable, NUL-padded name
        name = block[:100]
        end = name.find(b"\x00")
        if end <= 0 or name[end:].strip(b"\x00") or not _printable_name(name[:end]):
            return False
    return True


def _find_cpio(buf: bytes, start: int, pending: list[int]) -> tuple[str, int] | None:
    for m in _CPIO.finditer(buf, start):
        p = m.start()
        if buf[p + 5] in b"12":  # newc: namesize is the 12th field, the name follows the 110-byte header
            namesize, name_at = int(buf[p + 94:p + 102], 16), p + 110
        else:  # odc: namesize at 59, the name follows the 76-byte header
            namesize, name_at = int(buf[p + 59:p + 65], 8), p + 76
        name = buf[name_at:name_at + namesize]
        if not 1 < namesize <= 4096:
            continue
        if len(name) < namesize:
            pending.append(p)
        elif name[-1] == 0 and _printable_name(name[:-1]):
            return "cpio", p
    return None
