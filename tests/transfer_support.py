"""Shared world and checks for the file-transfer end-to-end tests (sftp, scp, scp -O, paramiko, raw SFTP)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from typer.testing import CliRunner

from broker.cli import app as cli_app
from broker.identity import add_user, add_user_key
from fixtures.patientdata import astm_message, hl7_message
from helpers.broker import World
from helpers.clients import paramiko_session, run_scp, run_sftp_batch
from helpers.keys import generate_keypair
from helpers.sshd import SshdDevice
from sessions.recording import read_frames

__all__ = ["Transfers", "PATIENT_MARKERS", "make_transfer_world", "patient_bytes_in", "sha256"]

# Bytes that only patient-data fixtures contain: the DICOM meta header, HL7 and ASTM headers, the
# synthetic patient names (every fixture patient is TEST^PATIENT^...).
PATIENT_MARKERS = (b"DICM", b"MSH|", b"H|\\^&", b"TEST^PATIENT")
CONFIG = "[recording]\nkeep_uploads = true\n"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def patient_bytes_in(directory: Path) -> list[str]:
    """Files under ``directory`` (the vendor's side) that hold any patient-data marker."""
    found = []
    for path in directory.rglob("*"):
        if path.is_file() and any(m in path.read_bytes() for m in PATIENT_MARKERS):
            found.append(str(path))
    return found


def wait(predicate: Callable[[], object], timeout: float = 15.0) -> object:
    """Poll ``predicate`` every 50 ms until it is truthy (returned) or ``timeout`` passes (AssertionError)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.05)


@dataclass
class Transfers:
    """One broker (keep_uploads on) in front of one real sshd device with the fixture tree, shared by a module.

    Protected on the device: the tree's data/dicom, var/spool/hl7 and opt/lis/data. Patient data in
    disguise outside them: tmp/report.pdf (DICOM), tmp/export.raw (DICOM without preamble),
    tmp/dual.tif (TIFF-preamble DICOM), tmp/messages.txt (HL7), tmp/adt.mllp (HL7 in MLLP framing),
    tmp/results.log (ASTM, framed), and the symlink tmp/images -> data/dicom.
    """

    world: World
    device: SshdDevice
    root: Path
    protected: tuple[Path, ...]
    originals: dict[str, str] = field(default_factory=dict)
    protected_listing: set[str] = field(default_factory=set)

    # ------------------------------------------------------------------ clients
    @property
    def login(self) -> str:
        return "alice@ct-01"

    @property
    def remote(self) -> str:
        return f"{self.login}@127.0.0.1:"

    def sftp(self, batch: str, *, user: str = "alice", timeout: float = 60.0):
        return run_sftp_batch(batch, f"{user}@ct-01", "127.0.0.1", self.world.port, self.world.keys[user].private_path,
                              known_hosts=self.world.known_hosts, timeout=timeout)

    def scp(self, *args: str, legacy: bool = False, user: str = "alice", timeout: float = 60.0):
        args = tuple(a.replace("REMOTE:", f"{user}@ct-01@127.0.0.1:") for a in args)
        return run_scp(args, self.world.port, self.world.keys[user].private_path, legacy=legacy,
                       known_hosts=self.world.known_hosts, timeout=timeout)

    def ssh(self, command: str, **kwargs):
        return self.world.ssh(self.login, command, **kwargs)

    @contextmanager
    def paramiko(self, user: str = "alice") -> Iterator:
        host_key = (self.world.app.config.home / "keys" / "host_ed25519.pub").read_text()
        with paramiko_session("127.0.0.1", self.world.port, f"{user}@ct-01", key=self.world.keys[user].private_path,
                              host_key_line=host_key) as client:
            yield client

    def add_vendor(self, name: str, mode: str) -> None:
        """Another vendor with its own key and a grant on ct-01 in ``mode`` (normal/read-only/upload-only)."""
        app = self.world.app
        now = app.clock.now()
        self.world.keys[name] = generate_keypair(self.world.tmp / "people", name)
        add_user(app.store, name, "vendor", "Acme Imaging", now)
        add_user_key(app.store, name, self.world.keys[name].public_key, now)
        self.world.grant(user=name, mode=mode)

    # ------------------------------------------------------------------ device side
    def path(self, rel: str) -> Path:
        return self.root / rel

    def device_file(self, rel: str, data: bytes) -> Path:
        """Create a file on the device owned by the device's account."""
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        st = self.root.stat()
        for p in (path, path.parent):
            os.chown(p, st.st_uid, st.st_gid)
        return path

    def snapshot(self) -> dict[str, str]:
        """sha256 of every regular file under the protected dirs and of the disguised files."""
        out = {}
        for base in (*self.protected, self.root / "tmp"):
            for p in sorted(base.rglob("*")):
                if p.is_file() and not p.is_symlink():
                    out[str(p)] = sha256(p.read_bytes())
        return out

    def assert_device_untouched(self) -> None:
        now = {p: sha256(Path(p).read_bytes()) for p in self.originals if Path(p).is_file()}
        assert now == self.originals, "device files changed or vanished"
        for base in self.protected:
            names = {str(p) for p in base.rglob("*")}
            assert names == {p for p in self.protected_listing if p.startswith(str(base) + "/")}, \
                f"files appeared or vanished under {base}"

    def sftp_log_mark(self) -> int:
        return len(self.device.sftp_log_text())

    def device_requests_since(self, mark: int) -> str:
        return self.device.sftp_log_text()[mark:]

    def assert_no_device_access(self, mark: int, *, ops: str = "open|opendir|rename|posix-rename|link|hardlink|"
                                "symlink|remove|mkdir|rmdir|set|lset|setstat") -> None:
        """No SFTP request that reads, lists or changes a protected path reached the device since ``mark``
        (the broker's own realpath look-ups are allowed: they return names, never content)."""
        text = self.device_requests_since(mark)
        for base in self.protected:
            pattern = re.compile(rf"^(?:{ops})\b[^\n]*\"{re.escape(str(base))}(?:/|\")", re.M)
            hit = pattern.search(text)
            assert hit is None, f"a request for a protected path reached the device: {hit.group(0)!r}"

    # ------------------------------------------------------------------ broker side
    def last_event_id(self) -> int:
        rows = self.world.events()
        return rows[-1]["id"] if rows else 0

    def events_since(self, mark: int, name: str | None = None) -> list[dict]:
        return [dict(r, details=json.loads(r["details"] or "{}")) for r in self.world.events(name) if r["id"] > mark]

    def wait_events(self, mark: int, name: str, n: int = 1, timeout: float = 15.0) -> list[dict]:
        wait(lambda: len(self.events_since(mark, name)) >= n, timeout)
        return self.events_since(mark, name)

    def sessions_since(self, known: set[str]) -> list[dict]:
        return [r for r in self.world.app.store.list_sessions() if r["id"] not in known]

    def session_ids(self) -> set[str]:
        return {r["id"] for r in self.world.app.store.list_sessions()}

    def finished_sessions(self, known: set[str], n: int = 1) -> list[dict]:
        """Wait for ``n`` new sessions to end (recording sealed) and return their rows."""
        wait(lambda: len([r for r in self.sessions_since(known) if r["final_hash"]]) >= n, 20)
        return [r for r in self.sessions_since(known) if r["final_hash"]]

    def frames(self, row: dict) -> list:
        return list(read_frames(self.world.app.recordings.local_path(row["recording"]), key_lookup=self.world.app.keys.get))

    def cli(self, *args: str) -> str:
        r = CliRunner().invoke(cli_app, ["--home", str(self.world.app.config.home), *args])
        assert r.exit_code == 0, r.output
        return r.stdout


def make_transfer_world(tmp: Path) -> Transfers:
    """Start the device and the broker; the caller closes both (``t.world.close(); t.device.close()``)."""
    # Exposed: the login can read the patient directories, so only the broker's guards stop a read.
    device = SshdDevice(tmp / "device", exposed=True).start()
    try:
        tree = device.tree
        assert tree is not None
        protected = (tree.dicom_dir, tree.patient["hl7_dir"], tree.patient["astm_file"].parent)
        world = World(tmp, device).setup(config=CONFIG, protect=tuple(str(p) for p in protected))
        world.grant()
    except BaseException:
        device.close()
        raise
    t = Transfers(world, device, tree.root, protected)
    t.device_file("tmp/messages.txt", hl7_message("TEST^PATIENT^EIGHT"))
    t.device_file("tmp/adt.mllp", hl7_message("TEST^PATIENT^EIGHT", mllp=True))
    t.device_file("tmp/results.log", astm_message("TEST^PATIENT^NINE", framed=True))
    t.originals = t.snapshot()
    t.protected_listing = {str(p) for base in protected for p in base.rglob("*")}
    return t
