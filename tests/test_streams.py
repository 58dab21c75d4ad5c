"""StreamJudge (sessions/streams.py): real transfer-protocol streams from the real programs are recognised in
either direction, however they are split and whatever came before them; ordinary traffic is not."""

from __future__ import annotations

import io
import random
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import FUZZ_EXAMPLES_OTHER
from sessions.streams import DEVICE, VENDOR, StreamJudge, stream_refusal

SFTP_SERVER = Path("/usr/lib/openssh/sftp-server")
INIT = b"\x00\x00\x00\x05\x01\x00\x00\x00\x03"


pytestmark = pytest.mark.usefixtures("anchor_engine")  # with and without Hyperscan (sessions/anchors.py)


def _judge(direction: str, data: bytes, chunk: int | None = None, judge: StreamJudge | None = None):
    """(protocol, bytes delivered before the hit) feeding ``data`` in ``chunk``-sized pieces."""
    judge = judge or StreamJudge()
    step = chunk or max(1, len(data))
    for i in range(0, len(data), step):
        hit = judge.feed(direction, data[i:i + step])
        if hit:
            return hit, i
    return None, len(data)


def _version_packet() -> bytes:
    """What OpenSSH's sftp-server answers to INIT (its real VERSION packet with extensions)."""
    with subprocess.Popen([str(SFTP_SERVER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE) as proc:
        proc.stdin.write(INIT)
        proc.stdin.flush()  # it exits at EOF without flushing, so read the reply before closing stdin
        head = proc.stdout.read(4)
        packet = head + proc.stdout.read(int.from_bytes(head, "big"))
        proc.stdin.close()
        proc.wait(timeout=10)
    assert packet[4] == 2 and len(packet) > 9
    return packet


def _tar(fmt: int | str, members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _cpio_newc(name: bytes, data: bytes) -> bytes:
    fields = [1, 0o100644, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
    head = b"070701" + b"".join(b"%08X" % f for f in fields) + name + b"\x00"
    return head + b"\x00" * (-len(head) % 4) + data


# ---------------------------------------------------------------------------------------- real streams
def test_sftp_init_from_the_vendor_is_stopped_before_it_reaches_the_device():
    realpath = b"\x00\x00\x00\x0a\x10\x00\x00\x00\x01\x00\x00\x00\x01."
    judge = StreamJudge()
    assert judge.feed(VENDOR, b"stty raw -echo; exec sftp-server\r") is None
    assert judge.feed(VENDOR, INIT + realpath) == "sftp"  # a client writes INIT as one message
    judge = StreamJudge()
    assert judge.feed(VENDOR, INIT[:3]) is None  # split on purpose: the server's VERSION gives it away
    assert judge.feed(VENDOR, INIT[3:] + realpath) is None
    assert judge.feed(DEVICE, b"\x00\x00\x00\x05\x02\x00\x00\x00\x03") == "sftp"
    # the same nine bytes inside an uploaded binary are not an INIT (measured: node, libLLVM)
    assert StreamJudge().feed(VENDOR, b"\x7fELF" + b"\x00" * 60 + INIT + b"\x00" * 60) is None


@pytest.mark.skipif(not SFTP_SERVER.exists(), reason="no OpenSSH sftp-server")
@pytest.mark.parametrize("prefix", [b"", b"hi\n", b"\x1b[0m$ ", b"some output without newline"])
@pytest.mark.parametrize("chunk", [None, 1, 5, 64])
def test_sftp_server_version_from_the_device_is_stopped(prefix, chunk):
    version = _version_packet()
    hit, delivered = _judge(DEVICE, prefix + version + b"\x00\x00\x00\x1c\x68...", chunk)
    assert hit == "sftp" and delivered < len(prefix) + len(version)


def test_sftp_init_with_odd_version_is_caught_on_the_device_reply():
    judge = StreamJudge()
    assert judge.feed(VENDOR, b"\x00\x00\x00\x05\x01\x00\x00\x01\x00") is None  # version 256: not canonical
    assert judge.feed(DEVICE, b"\x00\x00\x00\x05\x02\x00\x00\x00\x03") == "sftp"  # a bare VERSION after it
    assert judge.hit.direction == DEVICE and judge.hit.offset == 0
    assert "SFTP" in stream_refusal(judge.hit) and "sftp or scp through medbroker" in stream_refusal(judge.hit)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("direction", [VENDOR, DEVICE])
@pytest.mark.parametrize("chunk", [None, 1, 100, 511, 4096])
def test_tar_streams_in_every_format_either_direction(fmt, direction, chunk):
    data = _tar(fmt, {"service/logs/a.log": b"x" * 3000, "b.txt": b"hello\n"})
    hit, delivered = _judge(direction, b"listing:\n" + data, chunk)
    assert hit == "tar" and delivered < 9 + 512


@pytest.mark.skipif(shutil.which("tar") is None, reason="tar not installed")
@pytest.mark.parametrize("fmt", ["v7", "oldgnu", "gnu", "ustar", "posix"])
def test_real_gnu_tar_in_every_format(tmp_path, fmt):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f.txt").write_text("maintenance log\n" * 50)
    out = subprocess.run(["tar", "-c", f"--format={fmt}", "-f", "-", "-C", str(tmp_path), "d"],
                         capture_output=True, timeout=30, check=True).stdout
    for chunk in (None, 10, 1000):
        hit, delivered = _judge(DEVICE, b"$ " + out, chunk)
        assert hit == "tar" and delivered < 2 + 512, (fmt, chunk)


def test_cpio_new_and_old_ascii():
    assert _judge(DEVICE, b"x\n" + _cpio_newc(b"data/dicom/a.dcm", b"hello"))[0] == "cpio"
    odc = b"070707" + b"%06o" % 1 * 7 + b"%011o" % 0 + b"%06o" % 6 + b"%011o" % 5 + b"a.dcm\x00hello"
    assert _judge(VENDOR, odc, 7)[0] == "cpio"


@pytest.mark.parametrize("stream,direction", [
    (b"C0644 12 study.dcm\nhello world\n\x00", DEVICE),
    (b"T1700000000 0 1700000000 0\nC0600 5 a b c\nhello\x00", DEVICE),
    (b"\x00D0755 0 dicom\nC0644 3 x\nabc\x00E\n", VENDOR),
    (b"Last login: today\r\n$ \x00C4755 1 suid\r\nx", DEVICE),
])
@pytest.mark.parametrize("chunk", [None, 1, 4])
def test_scp_records(stream, direction, chunk):
    hit, delivered = _judge(direction, stream, chunk)
    assert hit == "scp" and b"hello" not in stream[:delivered] and b"abc" not in stream[:delivered]


@pytest.mark.skipif(shutil.which("scp") is None, reason="no OpenSSH scp")
def test_real_scp_source_mode(tmp_path):
    f = tmp_path / "adt.hl7"
    f.write_bytes(b"MSH|^~\\&|payload\r")
    r = subprocess.run(["scp", "-f", str(f)], input=b"\x00\x00\x00", capture_output=True, timeout=10)
    assert r.stdout.startswith(b"C0")
    judge = StreamJudge()
    assert judge.feed(VENDOR, b"\x00") is None
    assert judge.feed(DEVICE, r.stdout) == "scp"


@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync not installed")
def test_real_rsync_server_start(tmp_path):
    (tmp_path / "f").write_text("x")
    r = subprocess.run(["rsync", "--server", "--sender", "-logDtpre.iLsfxCIvu", ".", str(tmp_path) + "/"],
                       input=b"\x20\x00\x00\x00", capture_output=True, timeout=10)
    judge = StreamJudge()
    assert judge.feed(DEVICE, r.stdout[:4]) is None  # the server speaks first: a version alone is no proof
    assert judge.feed(VENDOR, b"\x20\x00\x00\x00") == "rsync"
    judge = StreamJudge()
    assert judge.feed(VENDOR, b"\x1d\x00\x00\x00") is None  # --protocol=29
    assert judge.feed(DEVICE, r.stdout) == "rsync"


@pytest.mark.parametrize("stream", [b"@RSYNCD: 31.0 sha512 sha256\n", b"motd\n@RSYNCD: 32.0\n"])
def test_rsync_daemon_greeting(stream):
    assert _judge(DEVICE, stream, 3)[0] == "rsync"
    assert _judge(VENDOR, stream)[0] == "rsync"


@pytest.mark.parametrize("stream", [b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n",
                                    b"banner\r\nSSH-2.0-dropbear\r\n", b"SSH-1.99-Cisco-1.25\n"])
def test_tunnelled_ssh_banner(stream):
    assert _judge(DEVICE, stream, 2)[0] == "ssh"


def test_verdict_is_final_and_offsets_count_the_stream():
    judge = StreamJudge()
    assert judge.feed(DEVICE, b"hello\n" * 12000) is None
    assert judge.feed(DEVICE, b"C0644 1 a\n") is None  # not an scp record: no NUL from the vendor in 64 KiB...
    assert judge.feed(VENDOR, b"\x00") is None
    assert judge.feed(DEVICE, b"C0644 1 a\n") == "scp"  # ...now there is
    judge = StreamJudge()
    judge.feed(DEVICE, b"x" * 100)
    assert judge.feed(DEVICE, b"\nC0644 1 a\n") == "scp" and judge.hit.offset == 101  # ...but at the start
    assert judge.feed(VENDOR, b"anything") == "scp"
    with pytest.raises(ValueError):
        StreamJudge().feed("sideways", b"x")


# ---------------------------------------------------------------------------------------- no false alarms
_TERMINAL = [
    b"\x1b[?2004h\x1b]0;svc@ct-01: ~\x07svc@ct-01:~$ ", b"ls -l\r\n", b"total 8\r\ndrwxr-xr-x 2 svc svc 4096 Nov 28 09:15 logs\r\n",
    b"top - 09:15:44 up 3 days,  1:02,  1 user,  load average: 0.00, 0.01, 0.05\r\n",
    b"    1 root      20   0  167748  11568   8264 S   0.0   0.1   0:01.23 systemd\r\n",
    b"[    0.000000] Linux version 6.1.0-18-amd64 (debian-kernel@lists.debian.org)\r\n",
    b"Copyright (C) 2026 Acme Imaging. C0644 is a mode, D0755 too.\n", b"SSH keys: see SSH-2 docs\n",
]


@settings(max_examples=FUZZ_EXAMPLES_OTHER, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([VENDOR, DEVICE]), st.one_of(st.sampled_from(_TERMINAL), st.binary(max_size=64))),
                max_size=40))
def test_fuzz_never_raises(chunks):
    judge = StreamJudge()
    for direction, data in chunks:
        assert judge.feed(direction, data) in (None, "sftp", "scp", "rsync", "tar", "cpio", "ssh")


@settings(max_examples=FUZZ_EXAMPLES_OTHER, deadline=None)
@given(st.lists(st.sampled_from(_TERMINAL), max_size=60), st.randoms(use_true_random=False))
def test_terminal_traffic_is_not_a_transfer(lines, rnd):
    judge = StreamJudge()
    for line in lines:
        assert judge.feed(rnd.choice([VENDOR, DEVICE]), line) is None


@settings(max_examples=FUZZ_EXAMPLES_OTHER // 4, deadline=None)
@given(st.binary(min_size=1, max_size=4096), st.integers(0, 40))
def test_tar_of_any_content_is_found_after_any_prefix(content, cut):
    data = _tar(tarfile.GNU_FORMAT, {"f": content})
    prefix = bytes(random.Random(cut).randbytes(cut))
    assert _judge(DEVICE, prefix + data, 97)[0] == "tar"


def test_programs_and_documents_on_this_machine_are_not_transfers():
    """A sample of real binaries (``cat /usr/bin/...``) and texts, both directions, 32 KiB chunks (the full
    measurement over /usr/bin, /usr/lib and /usr/share/doc: bench/stream_judge.py)."""
    files = sorted(p for p in Path("/usr/bin").iterdir() if p.is_file() and not p.is_symlink())[:60]
    files += sorted(Path("/usr/share/doc").rglob("copyright"))[:200]
    for p in files:
        data = p.read_bytes()[:4 << 20]
        for direction in (VENDOR, DEVICE):
            assert _judge(direction, data, 32768)[0] is None, p
    for seed in range(8):
        assert _judge(DEVICE, random.Random(seed).randbytes(1 << 20), 32768)[0] is None
