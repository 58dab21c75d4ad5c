"""TLS as a verified property of a forwarded stream: the record layer, checked in one direction.

A forwarded connection is treated as TLS (sizes recorded, content not scanned) only while both directions
stay well-formed TLS records (RFC 8446 §5.1, RFC 5246 §6.2), back to back across chunk boundaries:

* a 5-byte header: content type 20 (change_cipher_spec), 21 (alert), 22 (handshake) or 23
  (application_data) — 24 (heartbeat) and anything else end the stream; version 0x03 0x00..0x04; length at
  most 2**14 + 2048 (the ciphertext limit), never 0 except for application data;
* the client's first record is a handshake record holding a ClientHello (handshake type 1), the server's a
  handshake record holding a ServerHello (type 2; a TLS 1.3 HelloRetryRequest is one too);
* change_cipher_spec is the one byte 0x01; an alert is at most 64 bytes (2 in clear, 26 or so encrypted);
* handshake bytes: at most :data:`MAX_HANDSHAKE` per direction (a real handshake, certificate chain
  included, is a few KiB); their payload is handed to the caller (:attr:`TlsRecords.handshake`) so the
  cleartext part (ClientHello, ServerHello, a TLS 1.2 Certificate) is scanned like plain text: a server of
  one's own could put anything in a "certificate";
* application data is ciphertext: one window of :data:`WINDOW` payload bytes per :data:`BLOCK`, at an
  offset the peer cannot predict, must hold at least :data:`MIN_DISTINCT` distinct byte values (random
  data: ~162 ± 5; text, base64, hex and UTF-8 CJK text: far fewer). Plain text framed as TLS records fails
  here.

What this cannot see (docs/security.md): ciphertext of a protocol of one's own (that *is* opaque data; on a
device whose login can read patient data TLS is refused by default, ``[policy] forward_tls``), and plain
text diluted with at least as much random data at a grain finer than the window. Pure and stdlib-only.
"""

from __future__ import annotations

import os
import random

__all__ = ["TlsRecords", "is_tls_start", "MAX_RECORD", "MAX_HANDSHAKE", "BLOCK", "WINDOW", "MIN_DISTINCT",
           "TLS_ALERT_ACCESS_DENIED", "NOT_TLS"]

CHANGE_CIPHER_SPEC, ALERT, HANDSHAKE, APPLICATION_DATA, HEARTBEAT = 20, 21, 22, 23, 24
MAX_RECORD = (1 << 14) + 2048
MAX_HANDSHAKE = 64 << 10
MAX_ALERT = 64
BLOCK = 2048
WINDOW = 256
MIN_DISTINCT = 120
NOT_TLS = "not TLS after a TLS start"
# A fatal access_denied alert (RFC 8446 §6.2): what a TLS client shows its user ("tlsv1 alert access denied")
TLS_ALERT_ACCESS_DENIED = b"\x15\x03\x03\x00\x02\x02\x31"
_NAMES = {CHANGE_CIPHER_SPEC: "change_cipher_spec", ALERT: "alert", HANDSHAKE: "handshake",
          APPLICATION_DATA: "application_data"}


def is_tls_start(first: bytes) -> bool:
    """A TLS record header (handshake, version 3.x): how every TLS client's first bytes begin."""
    return len(first) >= 2 and first[0] == HANDSHAKE and first[1] == 0x03


class TlsRecords:
    """Checks one direction of a TLS connection; feed every chunk in order.

    ``feed(data)`` returns None while the bytes are well-formed records, else why not (a sentence that
    starts with :data:`NOT_TLS`; the verdict is final). Handshake payload bytes of the chunk are left in
    :attr:`handshake` for the caller to scan (cleared at each feed).
    """

    def __init__(self, side: str, rnd: random.Random | None = None) -> None:
        """:param side: "client" (first record: ClientHello) or "server" (first record: ServerHello)"""
        if side not in ("client", "server"):
            raise ValueError(f"side must be 'client' or 'server', not {side!r}")
        self.side = side
        self.error: str | None = None
        self.records = 0
        self.handshake = b""
        self._header = b""
        self._type = 0
        self._left = 0  # payload bytes of the current record still to come
        self._first_payload = True  # the next payload byte is the first of the stream's first record
        self._hs_bytes = 0
        self._record_body = b""  # change_cipher_spec / alert payloads (small, checked whole)
        self._rnd = rnd or random.Random(os.urandom(16))
        self._pool = bytearray()  # application data payload of the current block
        self._window_at: int | None = self._rnd.randrange(BLOCK - WINDOW + 1)  # None: this block is judged

    @property
    def name(self) -> str:
        return "the vendor's client" if self.side == "client" else "the device"

    def feed(self, data: bytes) -> str | None:
        """Check the next chunk; see the class docstring."""
        self.handshake = b""
        if self.error is not None:
            return self.error
        hs: list[bytes] = []
        pos, n = 0, len(data)
        while pos < n:
            if self._left == 0:
                need = 5 - len(self._header)
                self._header += data[pos:pos + need]
                pos += min(need, n - pos)
                if len(self._header) < 5:
                    break
                why = self._start_record(self._header)
                self._header = b""
                if why:
                    return self._fail(why)
                continue  # the payload (if any: an empty application-data record has none) follows
            take = min(self._left, n - pos)
            payload = data[pos:pos + take]
            pos += take
            self._left -= take
            why = self._payload(payload, hs)
            if why:
                return self._fail(why)
        self.handshake = b"".join(hs)
        return None

    # ---------------------------------------------------------------------------------------------- records
    def _start_record(self, h: bytes) -> str | None:
        ctype, major, minor, length = h[0], h[1], h[2], int.from_bytes(h[3:5], "big")
        if ctype == HEARTBEAT:
            return "a heartbeat record (TLS heartbeats are refused: they echo memory, and carry data unseen)"
        if ctype not in _NAMES:
            return f"a record of content type {ctype} (TLS has 20..23)"
        if major != 3 or minor > 4:
            return f"record version {major}.{minor} (TLS has 3.0..3.4)"
        if length > MAX_RECORD:
            return f"a record of {length} bytes (TLS allows at most {MAX_RECORD})"
        if length == 0 and ctype != APPLICATION_DATA:
            return f"an empty {_NAMES[ctype]} record"
        if self.records == 0 and ctype != HANDSHAKE:
            return f"a first record of type {_NAMES[ctype]} (the first record is a handshake)"
        if ctype == CHANGE_CIPHER_SPEC and length != 1:
            return f"a change_cipher_spec record of {length} bytes (it is one byte)"
        if ctype == ALERT and length > MAX_ALERT:
            return f"an alert record of {length} bytes"
        if ctype == HANDSHAKE:
            self._hs_bytes += length
            if self._hs_bytes > MAX_HANDSHAKE:
                return f"more than {MAX_HANDSHAKE // 1024} KiB of handshake records"
        self.records += 1
        self._type, self._left = ctype, length
        self._record_body = b""
        return None

    def _payload(self, payload: bytes, hs: list[bytes]) -> str | None:
        if self._first_payload:
            self._first_payload = False
            want, what = (1, "ClientHello") if self.side == "client" else (2, "ServerHello")
            if payload[0] != want:
                return f"a first handshake message of type {payload[0]} (expected a {what})"
        ctype = self._type
        if ctype == HANDSHAKE:
            hs.append(payload)
        elif ctype == APPLICATION_DATA:
            return self._ciphertext(payload)
        elif ctype == CHANGE_CIPHER_SPEC:
            if payload != b"\x01":
                return "a change_cipher_spec record that is not 0x01"
        return None

    def _ciphertext(self, payload: bytes) -> str | None:
        """Application data is encrypted: one window per BLOCK of pooled payload, at a random offset, must look
        random (distinct byte values)."""
        pool = self._pool
        pool += payload
        start = 0
        try:
            while True:
                if self._window_at is not None:
                    end = start + self._window_at + WINDOW
                    if len(pool) < end:
                        return None
                    distinct = len(set(pool[end - WINDOW:end]))
                    if distinct < MIN_DISTINCT:
                        return (f"application data that is not encrypted ({distinct} distinct byte values in "
                                f"{WINDOW} bytes; ciphertext has about 160)")
                    self._window_at = None
                if len(pool) - start < BLOCK:
                    return None
                start += BLOCK
                self._window_at = self._rnd.randrange(BLOCK - WINDOW + 1)
        finally:
            del pool[:start]

    def _fail(self, why: str) -> str:
        self.error = f"{NOT_TLS}: {self.name} sent {why}"
        self.handshake = b""
        return self.error
