"""Evidence bundles and "verify only what you contain", end to end with real sessions through the broker (real
sshd device, real ssh and sftp): a copied home with its recordings gone fails ``audit verify`` and ``replay``
naming them; ``medbroker evidence export`` writes a bundle that ``audit verify --bundle`` checks with no broker
home, and every altered, dropped or added member is named (exit 1)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Callable

import pytest

from broker.bundle import BundleError
from broker.evidence_verify import verify_bundle
from frontdoor_support import add_person, close_world, wait, world_with
from helpers.clients import run_sftp_batch

pytestmark = pytest.mark.openssh
REPO = Path(__file__).resolve().parent.parent
P = "medbroker-evidence/"


def cli(*args: str, home: Path | None, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``medbroker`` as a real process (no MEDBROKER_HOME from the environment)."""
    env = {k: v for k, v in os.environ.items() if k != "MEDBROKER_HOME"}
    env["PYTHONPATH"] = str(REPO)
    argv = [sys.executable, "-m", "broker.cli", *(["--home", str(home)] if home else []), *args]
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd or REPO, timeout=timeout)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Three sessions of alice (two shell commands, one SFTP upload) and one of another vendor; broker stopped."""
    tmp = tmp_path_factory.mktemp("evidence")
    w = world_with(tmp)
    try:
        w.grant()
        for text in ("first session", "second session"):
            r = w.ssh("alice@ct-01", f"echo {text}")
            assert r.returncode == 0, r.stderr
        upload = tmp / "firmware-notes.txt"
        upload.write_text("calibration notes\n" * 100)
        r = run_sftp_batch(f"put {upload} tmp/firmware-notes.txt\n", "alice@ct-01", "127.0.0.1", w.port,
                           w.keys["alice"].private_path, known_hosts=w.known_hosts)
        assert r.returncode == 0, r.stderr
        other, _ = add_person(w, totp=False)
        r = w.ssh(f"{other}@ct-01", "echo someone else", key=other)
        assert r.returncode == 0, r.stderr
        assert wait(lambda: len(w.app.store.list_sessions()) == 4
                    and all(s["status"] != "live" for s in w.app.store.list_sessions()))
        assert wait(lambda: w.app.store.transfers(_alice_sessions(w.app.home)[-1]))
    finally:
        close_world(w)
    w.other = other  # type: ignore[attr-defined]
    return w


def _alice_sessions(home: Path) -> list[str]:
    db = sqlite3.connect(home / "medbroker.db")
    try:
        return [r[0] for r in db.execute("SELECT id FROM sessions WHERE user_name = 'alice' ORDER BY started_at")]
    finally:
        db.close()


@pytest.fixture(scope="module")
def bundles(world, tmp_path_factory):
    """alice's sessions exported twice: with recording keys and without."""
    out = tmp_path_factory.mktemp("bundles")
    home = world.app.home
    r = cli("evidence", "export", "--user", "alice", "--include-data-key", "-o", str(out / "keyed.tar"), "--json",
            home=home)
    assert r.returncode == 0, r.stderr
    keyed = json.loads(r.stdout)
    r = cli("evidence", "export", "--user", "alice", "--device", "ct-01", "-o", str(out / "plain.tar"), home=home)
    assert r.returncode == 0, r.stderr
    return {"keyed": out / "keyed.tar", "plain": out / "plain.tar", "doc": keyed}


def verify_cli(bundle: Path, *extra: str, cwd: Path | None = None) -> tuple[int, dict, str]:
    r = cli("audit", "verify", "--bundle", str(bundle), "--json", *extra, home=None, cwd=cwd)
    return r.returncode, json.loads(r.stdout) if r.stdout.strip() else {}, r.stderr


def rewrite(src: Path, dst: Path, edit: Callable[[str, bytes], bytes | None],
            extra: list[tuple[str, bytes]] | None = None) -> Path:
    """Copy a bundle member by member; ``edit(name, data)`` returns the new bytes, or None to drop the member."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read()
            new = edit(m.name, data)
            if new is None:
                continue
            info = tarfile.TarInfo(m.name)
            info.size, info.mtime, info.mode = len(new), m.mtime, m.mode
            tout.addfile(info, io.BytesIO(new))
        for name, data in extra or ():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))
    return dst


def members(bundle: Path) -> dict[str, bytes]:
    with tarfile.open(bundle) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers()}


# ------------------------------------------------------------------------------------------- the copied home
def test_a_copied_home_with_its_recordings_emptied_verifies_nothing_and_replays_nothing(world, tmp_path):
    home = world.app.home
    assert cli("audit", "verify", home=home).returncode == 0, "the original verifies (the check can pass)"
    copy = tmp_path / "copy"
    shutil.copytree(home, copy)
    for p in (copy / "recordings").iterdir():
        p.unlink()
    sids = _alice_sessions(home)
    r = cli("audit", "verify", "--json", home=copy)
    assert r.returncode == 1
    report = json.loads(r.stdout)
    assert report["counts"]["ok"] == 0 and report["counts"]["broken"] == 4
    for entry in report["recordings"]:
        assert "recording file is missing" in entry["problems"], entry
    assert "verification failed: 4 recording(s)" in r.stderr
    r = cli("replay", "--instant", sids[0], home=copy)
    assert r.returncode == 1 and r.stdout == ""
    assert f"the recording of session {sids[0]} is missing" in r.stderr and f"{sids[0]}.mbr" in r.stderr


def test_a_copied_home_with_legacy_absolute_paths_never_reads_the_originals_files(world, tmp_path):
    """Rows written before keys existed hold absolute paths: in a copy they point into the original home, whose
    files are intact and would verify. The copy must refuse them instead."""
    home = world.app.home
    copy = tmp_path / "copy"
    shutil.copytree(home, copy)
    db = sqlite3.connect(copy / "medbroker.db")
    db.execute("UPDATE sessions SET recording = ? || '/' || recording", (str(home / "recordings"),))
    db.commit()
    db.close()
    for p in (copy / "recordings").iterdir():
        p.unlink()
    sid = _alice_sessions(home)[0]
    assert (home / "recordings" / f"{sid}.mbr").is_file(), "the original's file is there to be (wrongly) read"
    r = cli("audit", "verify", "--json", home=copy)
    assert r.returncode == 1
    report = json.loads(r.stdout)
    assert report["counts"]["ok"] == 0
    entry = next(e for e in report["recordings"] if e["session_id"] == sid)
    assert any("outside the recordings directory" in p and str(copy / "recordings") in p for p in entry["problems"])
    r = cli("replay", "--instant", sid, home=copy)
    assert r.returncode == 1 and r.stdout == "" and "outside the recordings directory" in r.stderr


# ------------------------------------------------------------------------------------------- export and verify
def test_export_names_the_sessions_and_is_audited_with_the_bundles_sha256(world, bundles):
    doc = bundles["doc"]
    alice = _alice_sessions(world.app.home)
    assert doc["sessions"] == alice and len(alice) == 3 and doc["verified"] and doc["problems"] == []
    assert doc["data_key_included"] is True and doc["signing_key"].startswith("ed25519:")
    digest = hashlib.sha256(bundles["keyed"].read_bytes()).hexdigest()
    assert doc["sha256"] == digest and doc["bytes"] == bundles["keyed"].stat().st_size
    assert oct(bundles["keyed"].stat().st_mode & 0o777) == "0o600"
    db = sqlite3.connect(world.app.home / "medbroker.db")
    rows = [json.loads(d) for (d,) in db.execute("SELECT details FROM audit_events WHERE event = 'evidence.exported'")]
    db.close()
    assert any(d["sha256"] == digest and d["sessions"] == alice and d["data_key_included"] for d in rows)


def test_a_bundle_moved_elsewhere_verifies_with_no_home(world, bundles, tmp_path):
    moved = tmp_path / "elsewhere" / "case-4711.tar"
    moved.parent.mkdir()
    shutil.copy(bundles["keyed"], moved)
    home = world.app.home
    hidden = home.with_name("home-hidden")
    home.rename(hidden)  # nothing of the broker home is there while the bundle is checked
    try:
        rc, doc, err = verify_cli(moved, cwd=moved.parent)
    finally:
        hidden.rename(home)
    assert rc == 0, err
    assert doc["ok"] and doc["problems"] == [] and doc["signing_key"] == bundles["doc"]["signing_key"]
    assert [s["session_id"] for s in doc["sessions"]] == _alice_sessions(home)
    assert all(s["state"] == "ok" and s["frames"] > 2 for s in doc["sessions"])
    assert doc["audit_rows"] >= 3 * 2 and doc["checkpoints"] >= 1
    assert sorted(p.name for p in moved.parent.iterdir()) == ["case-4711.tar"], "nothing unpacked beside it"
    rc, doc, err = verify_cli(moved, "--expect-key", bundles["doc"]["signing_key"])
    assert rc == 0 and doc["ok"]


def test_the_bundle_holds_only_the_chosen_sessions_and_their_grant(world, bundles):
    m = members(bundles["plain"])
    manifest = json.loads(m[P + "manifest.json"])
    alice = _alice_sessions(world.app.home)
    assert [s["id"] for s in manifest["sessions"]] == alice
    assert sorted(n for n in m if "/recordings/" in n) == sorted(f"{P}recordings/{s}.mbr" for s in alice)
    rows = [json.loads(line) for line in m[P + "audit/events.jsonl"].splitlines()]
    about = set(manifest["audit"]["about"])
    assert {r["session_id"] for r in rows if r["id"] in about} - {None} == set(alice)
    assert any(r["event"] == "grant.created" for r in rows if r["id"] in about), "the approval travels with them"
    transfers = json.loads(m[P + "db/transfers.json"])
    assert [t["path"].rsplit("/", 1)[-1] for t in transfers] == ["firmware-notes.txt"]
    assert set(manifest["members"]) == set(m) - {P + "manifest.json", P + "manifest.sig"}
    assert manifest["data_key_included"] is False and P + "keys/recording-keys.json" not in m


def test_no_data_key_ever_leaves_the_broker(world, bundles):
    keyfile = (world.app.home / "keys" / "data.key").read_text().split()
    data_keys = [bytes.fromhex(v) for v in keyfile[1::2]]
    for which in ("keyed", "plain"):
        raw = bundles[which].read_bytes()
        for key in data_keys:
            assert key.hex().encode() not in raw and key not in raw
    keys = json.loads(members(bundles["keyed"])[P + "keys/recording-keys.json"])
    assert sorted(keys) == sorted(_alice_sessions(world.app.home))
    assert len({k["recording_key"] for k in keys.values()}) == 3, "one key per recording"


def test_replay_from_a_bundle_needs_its_recording_key(world, bundles, tmp_path):
    sid = _alice_sessions(world.app.home)[0]
    r = cli("replay", "--instant", "--bundle", str(bundles["keyed"]), sid, home=tmp_path / "no-home")
    assert r.returncode == 0, r.stderr
    assert "first session" in r.stdout and "verified" in r.stderr
    assert not (tmp_path / "no-home").exists()
    r = cli("replay", "--instant", "--bundle", str(bundles["plain"]), sid, home=tmp_path / "no-home")
    assert r.returncode == 1 and "first session" not in r.stdout
    assert f"holds no key for session {sid}" in r.stderr and "--include-data-key" in r.stderr
    r = cli("replay", "--instant", "--bundle", str(bundles["keyed"]), "20990101-000000-abcdef", home=None)
    assert r.returncode == 1 and "is not in bundle" in r.stderr


def test_selectors(world, tmp_path):
    home = world.app.home
    r = cli("evidence", "export", "-o", str(tmp_path / "x.tar"), home=home)
    assert r.returncode == 2 and "say which sessions to export" in r.stderr
    r = cli("evidence", "export", "--session", "20990101-000000-abcdef", "-o", str(tmp_path / "x.tar"), home=home)
    assert r.returncode == 1 and "does not exist" in r.stderr
    r = cli("evidence", "export", "--device", "ct-01", "--since", "2099-01-01", "-o", str(tmp_path / "x.tar"),
            home=home)
    assert r.returncode == 1 and "no ended session matches" in r.stderr
    assert not (tmp_path / "x.tar").exists() and list(tmp_path.iterdir()) == []
    sids = _alice_sessions(home)
    r = cli("evidence", "export", "--session", sids[1], "--session", sids[2], "-o", str(tmp_path / "two.tar"), "--json",
            home=home)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["sessions"] == sids[1:]
    r = cli("evidence", "export", "--user", world.other, "-o", str(tmp_path / "other.tar"), "--json", home=home)
    assert r.returncode == 0 and len(json.loads(r.stdout)["sessions"]) == 1
    assert verify_cli(tmp_path / "other.tar")[0] == 0


# ------------------------------------------------------------------------------------------- tampering
def _first_recording(bundle: Path) -> str:
    return next(n for n in members(bundle) if "/recordings/" in n)


def test_a_flipped_byte_in_a_recording_is_named(bundles, tmp_path):
    victim = _first_recording(bundles["plain"])

    def flip(name: str, data: bytes) -> bytes:
        if name != victim:
            return data
        b = bytearray(data)
        b[len(b) // 2] ^= 0x01
        return bytes(b)

    rc, doc, err = verify_cli(rewrite(bundles["plain"], tmp_path / "t.tar", flip))
    short = victim[len(P):]
    assert rc == 1 and not doc["ok"]
    assert f"{short}: sha256 differs from the manifest (the member was altered)" in doc["problems"]
    sid = victim.rsplit("/", 1)[1].removesuffix(".mbr")
    states = {s["session_id"]: s["state"] for s in doc["sessions"]}
    assert states[sid] == "broken" and sorted(states.values()).count("ok") == 2
    assert any(p.startswith(f"session {sid}: recording {short}: ") for p in doc["problems"])
    assert "bundle verification failed" in err and short in err


def test_a_deleted_audit_row_is_named(bundles, tmp_path):
    rows = members(bundles["plain"])[P + "audit/events.jsonl"].splitlines(keepends=True)
    victim = json.loads(rows[len(rows) // 2])["id"]

    def drop_row(name: str, data: bytes) -> bytes:
        if name != P + "audit/events.jsonl":
            return data
        return b"".join(line for line in data.splitlines(keepends=True) if json.loads(line)["id"] != victim)

    rc, doc, err = verify_cli(rewrite(bundles["plain"], tmp_path / "t.tar", drop_row))
    assert rc == 1
    assert "audit/events.jsonl: sha256 differs from the manifest (the member was altered)" in doc["problems"]
    assert any(p.startswith(f"audit/events.jsonl: audit row {victim}: missing") for p in doc["problems"])


def test_a_rechained_audit_tail_without_the_key_fails_at_the_checkpoint(bundles, tmp_path):
    """Delete a row and re-hash the rows after it (as someone without the key would): besides the member hash,
    the signed checkpoint at the end of the stretch no longer matches."""
    from broker.audit import row_hash

    def rechain(name: str, data: bytes) -> bytes:
        if name != P + "audit/events.jsonl":
            return data
        rows = [json.loads(line) for line in data.splitlines()]
        del rows[1]
        prev = rows[0]["hash"]
        for r in rows[1:]:
            r["id"] -= 1
            r["prev_hash"] = prev
            r["hash"] = prev = row_hash(prev, r)
        return b"".join(json.dumps(r, sort_keys=True).encode() + b"\n" for r in rows)

    rc, doc, _ = verify_cli(rewrite(bundles["plain"], tmp_path / "t.tar", rechain))
    assert rc == 1
    assert any(p.startswith("audit/checkpoints.json: ") and ("differs from the signed checkpoint" in p or
                                                           "which the signed checkpoint covers, is missing" in p)
               for p in doc["problems"]), doc["problems"]


def test_a_dropped_member_is_named(bundles, tmp_path):
    for victim in (P + "db/transfers.json", _first_recording(bundles["plain"]), P + "audit/checkpoints.json"):
        dropped = rewrite(bundles["plain"], tmp_path / "t.tar", lambda n, d: None if n == victim else d)
        rc, doc, _ = verify_cli(dropped)
        assert rc == 1
        assert f"{victim[len(P):]}: missing from the bundle (the manifest lists it)" in doc["problems"], doc["problems"]
    rc, doc, _ = verify_cli(rewrite(bundles["plain"], tmp_path / "t.tar",
                                    lambda n, d: None if n == P + "manifest.sig" else d))
    assert rc == 1 and "manifest.sig: missing from the bundle" in doc["problems"]


def test_an_edited_manifest_is_named(bundles, tmp_path):
    def edit(name: str, data: bytes) -> bytes:
        if name != P + "manifest.json":
            return data
        return data.replace(b'"exported_by": "local:', b'"exported_by": "xocal:')

    rc, doc, err = verify_cli(rewrite(bundles["plain"], tmp_path / "t.tar", edit))
    assert rc == 1 and any(p.startswith("manifest.json: signature invalid") for p in doc["problems"])
    assert "manifest.json" in err


def test_an_added_member_is_named(bundles, tmp_path):
    extra = [(P + "recordings/planted.mbr", b"MEDBREC\x00")]
    rc, doc, _ = verify_cli(rewrite(bundles["plain"], tmp_path / "t.tar", lambda n, d: d, extra))
    assert rc == 1 and "recordings/planted.mbr: not listed in the manifest (added to the bundle)" in doc["problems"]


def test_a_bundle_resigned_with_another_key(bundles, tmp_path):
    """Someone replaces the key and re-signs the manifest: the broker's signatures on the checkpoints and the
    recordings no longer verify; and --expect-key names the substituted key."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from broker.bundle import public_pem

    forger = Ed25519PrivateKey.generate()
    pem = public_pem(forger.public_key())
    m = members(bundles["plain"])
    manifest = json.loads(m[P + "manifest.json"])
    manifest["members"][P + "signing-key.pem"] = {"sha256": hashlib.sha256(pem).hexdigest(), "bytes": len(pem)}
    body = json.dumps(manifest, indent=1, sort_keys=True).encode() + b"\n"
    replace = {P + "signing-key.pem": pem, P + "manifest.json": body, P + "manifest.sig": forger.sign(body)}
    forged = rewrite(bundles["plain"], tmp_path / "t.tar", lambda n, d: replace.get(n, d))
    rc, doc, _ = verify_cli(forged)
    assert rc == 1 and not any(p.startswith("manifest.json") for p in doc["problems"]), "the manifest itself is sound"
    assert any("checkpoint of audit row" in p and "signature invalid" in p for p in doc["problems"])
    assert any(p.endswith("signature invalid") and p.startswith("session ") for p in doc["problems"])
    rc, doc, _ = verify_cli(forged, "--expect-key", bundles["doc"]["signing_key"])
    assert rc == 1 and any(p.startswith("signing-key.pem: the bundle is signed with key ") for p in doc["problems"])


# ------------------------------------------------------------------------------------------- fuzzing the reader
def test_random_damage_to_a_real_bundle_is_always_a_clean_failure(bundles, tmp_path):
    """Flip, cut and overwrite bytes of a real bundle (seeded): every result is a BundleError or a failed check,
    never another exception, never ok, and nothing is left in the temporary directory."""
    original = bundles["plain"].read_bytes()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    rng = random.Random(13)
    outcomes = {"unreadable": 0, "failed": 0}
    for i in range(150):
        data = bytearray(original)
        how = i % 3
        if how == 0:
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif how == 1:
            data = data[:rng.randrange(len(data))]
        else:
            at = rng.randrange(0, len(data), 512)  # a tar header block
            data[at:at + 512] = bytes(rng.randrange(256) for _ in range(512))
        path = tmp_path / "damaged.tar"
        path.write_bytes(bytes(data))
        if bytes(data) == original:
            continue
        try:
            with _tmp_parent(scratch):
                check = verify_bundle(path)
        except BundleError:
            outcomes["unreadable"] += 1
        else:
            # a flip inside tar padding or a header's unused bytes changes nothing that is checked
            if check.ok:
                assert _members_equal(path, bundles["plain"]), f"case {i}: a damaged member verified"
            else:
                outcomes["failed"] += 1
        assert list(scratch.iterdir()) == [], f"case {i}: temporary copies were left behind"
    assert outcomes["unreadable"] > 10 and outcomes["failed"] > 10, outcomes


def _members_equal(a: Path, b: Path) -> bool:
    try:
        return members(a) == members(b)
    except (tarfile.TarError, OSError):
        return False


class _tmp_parent:
    """Point tempfile at ``path`` for the duration (read_bundle makes its directory there)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> None:
        import tempfile

        self.saved = tempfile.tempdir
        tempfile.tempdir = str(self.path)

    def __exit__(self, *exc) -> None:
        import tempfile

        tempfile.tempdir = self.saved


def _forge(src: Path, dst: Path, replace: dict[str, bytes], edit_manifest: Callable[[dict], None] = lambda m: None
           ) -> Path:
    """A self-consistent rewrite: members replaced, the manifest's hashes fixed and re-signed with a new key."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from broker.bundle import public_pem

    forger = Ed25519PrivateKey.generate()
    m = members(src)
    replace = {**replace, P + "signing-key.pem": public_pem(forger.public_key())}
    manifest = json.loads(m[P + "manifest.json"])
    for name, data in replace.items():
        manifest["members"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    edit_manifest(manifest)
    body = json.dumps(manifest, indent=1, sort_keys=True).encode() + b"\n"
    final = {**replace, P + "manifest.json": body, P + "manifest.sig": forger.sign(body)}
    extra = [(n, d) for n, d in replace.items() if n not in m]
    return rewrite(src, dst, lambda n, d: final.get(n, d), extra)


def _set(key: str, value):
    def edit(manifest: dict) -> None:
        target = manifest
        *path, last = key.split(".")
        for k in path:
            target = target[k]
        target[last] = value
    return edit


@pytest.mark.parametrize("case", [
    {P + "audit/events.jsonl": b'{"id": "1", "details": {}}\n[1, 2]\nnull\n"text"\n'},
    {P + "db/sessions.json": b'{"not": "a list"}'},
    {P + "db/sessions.json": b'[{"id": 5, "final_hash": 7, "signature": [1]}, "x", null]'},
    {P + "db/transfers.json": b'[{"session_id": null, "bytes": "x"}, 3]'},
    {P + "audit/checkpoints.json": b'"checkpoints"'},
    {P + "audit/checkpoints.json": b'[{"event_id": "9", "hash": null, "signature": 5}, []]'},
    {P + "keys/recording-keys.json": b'{"x": {"recording_key": "zz"}, "y": 5}'},
    {P + "db/sessions.json": b"\xff\xfe not json"},
    "manifest:sessions", "manifest:segments", "manifest:about", "manifest:audit",
])
def test_hostile_content_in_a_consistently_resigned_bundle_fails_cleanly(bundles, tmp_path, case):
    """Wrong types everywhere, in a bundle whose hashes and manifest signature agree (a forger's key): the check
    names problems and never crashes."""
    edits = {"manifest:sessions": _set("sessions", ["a", 5, None, {"id": ["x"], "recording": 7}]),
             "manifest:segments": _set("audit.segments", [["a", 1], [5, 2], 3, None]),
             "manifest:about": _set("audit.about", [[1], "2", None, 10 ** 30]),
             "manifest:audit": _set("audit", "none")}
    if isinstance(case, str):
        forged = _forge(bundles["keyed"], tmp_path / "f.tar", {}, edits[case])
    else:
        forged = _forge(bundles["keyed"], tmp_path / "f.tar", case)
    check = verify_bundle(forged)
    assert not check.ok and check.problems
    rc, doc, err = verify_cli(forged)
    assert rc == 1 and "internal error" not in err and doc["problems"]


def test_wrong_types_inside_real_rows_fail_cleanly(bundles, tmp_path):
    """A real audit row with its details as an object, a real transfer row with bytes as text: named, no crash."""
    m = members(bundles["keyed"])
    rows = [json.loads(line) for line in m[P + "audit/events.jsonl"].splitlines()]
    rows[0]["details"] = {"recording": 5}
    transfers = json.loads(m[P + "db/transfers.json"])
    transfers[0]["bytes"] = "many"
    transfer = next(r for r in rows if r["event"] == "transfer.file")
    transfer["details"] = json.dumps({**json.loads(transfer["details"]), "bytes": [1]})
    forged = _forge(bundles["keyed"], tmp_path / "f.tar", {
        P + "audit/events.jsonl": b"".join(json.dumps(r).encode() + b"\n" for r in rows),
        P + "db/transfers.json": json.dumps(transfers).encode()})
    check = verify_bundle(forged)
    assert "audit/events.jsonl: line 1 is not an audit row" in check.problems
    assert any("has no matching transfer.file audit row" in p for p in check.problems), check.problems


def test_exporting_from_a_home_whose_recording_was_altered_fails_and_keeps_the_bundle(world, tmp_path):
    """The export checks what it wrote: evidence already damaged in the home is not laundered into a bundle
    that looks fine; the bundle is kept (it is what the broker holds) and the damage is named."""
    copy = tmp_path / "copy"
    shutil.copytree(world.app.home, copy)
    sid = _alice_sessions(copy)[0]
    rec = copy / "recordings" / f"{sid}.mbr"
    data = bytearray(rec.read_bytes())
    data[len(data) // 2] ^= 0x01
    rec.write_bytes(bytes(data))
    out = tmp_path / "damaged.tar"
    r = cli("evidence", "export", "--session", sid, "-o", str(out), home=copy)
    assert r.returncode == 1
    assert "was written, but does not verify" in r.stderr
    assert f"session {sid}: recording recordings/{sid}.mbr" in r.stdout
    assert out.is_file()
    rc, doc, _ = verify_cli(out)
    assert rc == 1 and [s["state"] for s in doc["sessions"]] == ["broken"]
    assert not any("sha256 differs" in p for p in doc["problems"]), "the members are as the broker signed them"
