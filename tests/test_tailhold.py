"""Output the scanner cannot judge yet is held, not forwarded: an unfinished record-like line, and output
inside a compressed stream that may still prove to be patient data (the first line of ``gzip | base64``
alone decodes to a header and a few compressed bytes; a terminal may deliver it before the rest)."""

from __future__ import annotations

import asyncio
import gzip
import base64
import io

from fixtures.patientdata import hl7_message
from sessions.decoders import DeepScanner
from sessions.entropy import OpaqueBudget
from sessions.tailhold import TAIL_HOLD_S, UNDECIDED_HOLD_MAX, TailHold


def _gzip_base64_lines() -> list[bytes]:
    """What ``gzip -c notes-0417.txt | base64`` prints (gzip names the file in its header, as the CLI does)."""
    out = io.BytesIO()
    with gzip.GzipFile(filename="notes-0417.txt", mode="wb", fileobj=out, mtime=0) as f:
        f.write(hl7_message("TEST^PATIENT^THREE"))
    encoded = base64.encodebytes(out.getvalue())
    return [line + b"\r\n" for line in encoded.split(b"\n") if line]


def test_the_first_line_of_gzip_base64_leaves_the_scanner_undecided_and_the_rest_decides():
    lines = _gzip_base64_lines()
    assert len(lines) >= 2
    scanner = DeepScanner(OpaqueBudget(64 << 10))
    assert scanner.feed(b"$ gzip -c notes.txt | base64\r\n" + lines[0]) is None
    assert scanner.undecided()  # not a verdict: hold it
    assert scanner.feed(b"".join(lines[1:])) == "HL7v2/gzip/base64"


def test_plain_text_and_finished_streams_are_decided():
    scanner = DeepScanner(OpaqueBudget(64 << 10))
    assert scanner.feed(b"total 8\r\ndrwxr-xr-x 2 root root 4096 Jan  1 00:00 logs\r\n") is None
    assert not scanner.undecided()
    whole = base64.encodebytes(gzip.compress(b"ordinary maintenance log\n" * 20, mtime=0))
    assert scanner.feed(whole) is None
    assert not scanner.undecided()  # the stream ended: nothing left to wait for
    assert scanner.feed(b"$ ") is None and not scanner.undecided()


def test_undecided_output_is_held_whole_until_a_later_chunk_or_the_deadline():
    async def run() -> tuple[list[bytes], bytes, bytes, list[bytes]]:
        released: list[bytes] = []
        hold = TailHold(released.append)
        first = hold.take(b"H4sIAAAAAAAAA+1Y\r\n", undecided=True)
        later = hold.take(b"more\r\n", undecided=False)  # decided: everything goes on, in order
        hold.take(b"again\r\n", undecided=True)
        await asyncio.sleep(TAIL_HOLD_S * 3)  # nothing more came: released as it stands
        big = hold.take(b"x" * (UNDECIDED_HOLD_MAX + 1), undecided=True)  # past the cap: not held
        return released, first, later, [big]

    released, first, later, big = asyncio.run(run())
    assert first == b""
    assert later == b"H4sIAAAAAAAAA+1Y\r\nmore\r\n"
    assert released == [b"again\r\n"]
    assert big == [b"x" * (UNDECIDED_HOLD_MAX + 1)]
