"""Checking an evidence bundle offline (``medbroker audit verify --bundle``, ``replay --bundle``): with nothing but
the file, and only what it holds. The bundle itself: broker/bundle.py; writing one: broker/evidence.py."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from broker.audit import checkpoint_message, parse_details, row_hash
from broker.bundle import (AUDIT_COLUMNS, CHECKPOINTS, EVENTS, FORMAT, MANIFEST, PREFIX, PUBLIC_KEY, RECORDING_KEYS,
                           SIGNATURE, VERSION, BundleContents, BundleError, read_bundle, table_member)
from broker.errors import BrokerError, RecordingError
from broker.keys import verify_hex
from broker.report import public_key_id
from sessions.recformat import RecordingKey

__all__ = ["BundleCheck", "verify_bundle", "open_bundle", "bundle_key_lookup"]


@dataclass
class BundleCheck:
    """Outcome of :func:`verify_bundle`: ``problems`` name the member (and row or session) that failed."""

    path: Path
    problems: list[str] = field(default_factory=list)
    sessions: list[dict[str, Any]] = field(default_factory=list)
    key_id: str | None = None
    manifest: dict[str, Any] = field(default_factory=dict)
    audit_rows: int = 0
    checkpoints: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def _short(name: str) -> str:
    return name[len(PREFIX):] if name.startswith(PREFIX) else name


def _load_json(contents: BundleContents, name: str, check: BundleCheck) -> Any:
    try:
        data = contents.read(name)
    except BundleError as exc:
        check.problems.append(f"{_short(name)}: {exc.message}")
        return None
    if data is None:
        return None
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        check.problems.append(f"{_short(name)}: not valid JSON")
        return None


def verify_bundle(path: Path, *, expect_key: str | None = None) -> BundleCheck:
    """Check an evidence bundle with nothing but the file: manifest signature, member hashes, the audit chain
    stretches and their signed checkpoints, every recording against its session row and the chain.

    :param expect_key: the broker's key id (``ed25519:…``) the bundle must be signed with
    :raises BundleError: the file cannot be read as a bundle at all (hostile or damaged archive)
    """
    with read_bundle(path) as contents:
        return _verify(contents, expect_key)


def open_bundle(path: Path, *, expect_key: str | None = None) -> tuple[BundleContents, BundleCheck]:
    """:func:`verify_bundle`, keeping the copied members (close the contents when done)."""
    contents = read_bundle(path)
    try:
        return contents, _verify(contents, expect_key)
    except BaseException:
        contents.close()
        raise


def _verify(contents: BundleContents, expect_key: str | None) -> BundleCheck:
    check = BundleCheck(Path(contents.path))
    public = _check_manifest(contents, check, expect_key)
    manifest = check.manifest
    if not manifest:
        return check
    _check_members(contents, check, manifest)
    rows = _check_audit(contents, check, manifest, public)
    _check_sessions(contents, check, manifest, rows, public)
    return check


def _check_manifest(contents: BundleContents, check: BundleCheck, expect_key: str | None) -> Ed25519PublicKey | None:
    for name in (MANIFEST, SIGNATURE, PUBLIC_KEY):
        if name not in contents.files:
            check.problems.append(f"{_short(name)}: missing from the bundle")
    public: Ed25519PublicKey | None = None
    pem = contents.read(PUBLIC_KEY, limit=1 << 16) if PUBLIC_KEY in contents.files else None
    if pem is not None:
        try:
            key = load_pem_public_key(pem)
            if isinstance(key, Ed25519PublicKey):
                public = key
                check.key_id = public_key_id(key)
            else:
                check.problems.append(f"{_short(PUBLIC_KEY)}: not an ed25519 public key")
        except (ValueError, TypeError):
            check.problems.append(f"{_short(PUBLIC_KEY)}: not a PEM public key")
    if expect_key is not None and check.key_id is not None and check.key_id != expect_key:
        check.problems.append(f"{_short(PUBLIC_KEY)}: the bundle is signed with key {check.key_id}, not the "
                              f"expected {expect_key}")
    body = contents.read(MANIFEST) if MANIFEST in contents.files else None
    signature = contents.read(SIGNATURE, limit=1024) if SIGNATURE in contents.files else None
    if body is not None and signature is not None and public is not None:
        try:
            public.verify(signature, body)
        except InvalidSignature:
            check.problems.append(f"{_short(MANIFEST)}: signature invalid (the manifest or its signature was altered, "
                                  "or it was signed with another key)")
    if body is not None:
        try:
            manifest = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            manifest = None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION \
                or not isinstance(manifest.get("members"), dict):
            check.problems.append(f"{_short(MANIFEST)}: not a medbroker evidence manifest (version {VERSION})")
        else:
            check.manifest = manifest
    return public


def _check_members(contents: BundleContents, check: BundleCheck, manifest: dict[str, Any]) -> None:
    listed: dict[str, Any] = manifest["members"]
    for name, want in sorted(listed.items()):
        if not isinstance(want, dict):
            check.problems.append(f"{_short(MANIFEST)}: member {name!r} has no sha256")
        elif name not in contents.files:
            check.problems.append(f"{_short(name)}: missing from the bundle (the manifest lists it)")
        elif contents.sha256[name] != want.get("sha256") or contents.sizes[name] != want.get("bytes"):
            check.problems.append(f"{_short(name)}: sha256 differs from the manifest (the member was altered)")
    for name in sorted(contents.files):
        if name not in listed and name not in (MANIFEST, SIGNATURE):
            check.problems.append(f"{_short(name)}: not listed in the manifest (added to the bundle)")


def _check_audit(contents: BundleContents, check: BundleCheck, manifest: dict[str, Any],
                 public: Ed25519PublicKey | None) -> dict[int, dict[str, Any]]:
    """The chain stretches: consecutive ids, each row's hash, links, and a valid signed checkpoint at each end."""
    rows: dict[int, dict[str, Any]] = {}
    raw = contents.read(EVENTS) if EVENTS in contents.files else None
    if raw is None:
        return rows
    for n, line in enumerate(raw.splitlines(), 1):
        try:
            row = json.loads(line)
            if not _audit_row_shape(row):
                raise ValueError
        except (ValueError, UnicodeDecodeError, RecursionError):
            check.problems.append(f"{_short(EVENTS)}: line {n} is not an audit row")
            continue
        if row["id"] in rows:
            check.problems.append(f"{_short(EVENTS)}: audit row {row['id']} appears twice")
        rows[row["id"]] = row
    check.audit_rows = len(rows)
    audit: dict[str, Any] = manifest["audit"] if isinstance(manifest.get("audit"), dict) else {}
    segments: list[Any] = audit["segments"] if isinstance(audit.get("segments"), list) else []
    about: list[Any] = audit["about"] if isinstance(audit.get("about"), list) else []
    cps = _load_json(contents, CHECKPOINTS, check)
    by_event = {c.get("event_id"): c for c in (cps if isinstance(cps, list) else []) if isinstance(c, dict)}
    check.checkpoints = len(by_event)
    covered: set[int] = set()
    for seg in segments:
        if not (isinstance(seg, list) and len(seg) == 2 and all(isinstance(x, int) for x in seg)) or seg[0] > seg[1]:
            check.problems.append(f"{_short(MANIFEST)}: audit segment {seg!r} is malformed")
            continue
        first, last = seg
        prev: str | None = None
        for i in range(first, last + 1):
            covered.add(i)
            row = rows.get(i)
            if row is None:
                check.problems.append(f"{_short(EVENTS)}: audit row {i}: missing (the manifest's stretch "
                                      f"{first}-{last} includes it)")
                prev = None
                continue
            if prev is not None and row["prev_hash"] != prev:
                check.problems.append(f"{_short(EVENTS)}: audit row {i}: prev_hash does not link to row {i - 1}")
            if row_hash(str(row["prev_hash"]), row) != row["hash"]:
                check.problems.append(f"{_short(EVENTS)}: audit row {i}: content does not match its hash (altered)")
            prev = row["hash"]
        cp = by_event.get(last)
        if cp is None:
            check.problems.append(f"{_short(CHECKPOINTS)}: no signed checkpoint for audit row {last} (end of the "
                                  f"stretch {first}-{last})")
        elif last not in rows:
            check.problems.append(f"{_short(CHECKPOINTS)}: audit row {last}, which the signed checkpoint covers, is "
                                  "missing")
        elif cp.get("hash") != rows[last]["hash"]:
            check.problems.append(f"{_short(CHECKPOINTS)}: audit row {last} hash differs from the signed checkpoint")
        elif public is None or not verify_hex(public, checkpoint_message(last, str(cp.get("hash"))),
                                              str(cp.get("signature"))):
            check.problems.append(f"{_short(CHECKPOINTS)}: checkpoint of audit row {last}: signature invalid")
    for i in sorted(set(rows) - covered):
        check.problems.append(f"{_short(EVENTS)}: audit row {i} lies outside the manifest's stretches")
    for i in about:
        if not isinstance(i, int) or i not in rows:
            check.problems.append(f"{_short(EVENTS)}: audit row {i} about these sessions is missing")
    return rows


def _audit_row_shape(row: Any) -> bool:
    """An audit row as the store holds it: these columns, an integer id, text or integer or null values."""
    return (isinstance(row, dict) and set(row) == set(AUDIT_COLUMNS) and type(row["id"]) is int
            and all(isinstance(row[c], str) for c in ("at", "event", "details", "prev_hash", "hash"))
            and all(v is None or type(v) in (str, int) for v in row.values()))


def _check_sessions(contents: BundleContents, check: BundleCheck, manifest: dict[str, Any],
                    rows: dict[int, dict[str, Any]], public: Ed25519PublicKey | None) -> None:
    from sessions.retention import read_any_header, verify_any

    table = _load_json(contents, table_member("sessions"), check)
    by_id = {str(r.get("id")): r for r in (table if isinstance(table, list) else []) if isinstance(r, dict)}
    transfers = _load_json(contents, table_member("transfers"), check)
    transfers = transfers if isinstance(transfers, list) else []
    keys = _load_json(contents, RECORDING_KEYS, check) if RECORDING_KEYS in contents.files else {}
    keys = keys if isinstance(keys, dict) else {}
    listed: list[Any] = manifest["sessions"] if isinstance(manifest.get("sessions"), list) else []
    chain: dict[str, dict[str, Any]] = {}
    for row in sorted(rows.values(), key=lambda r: r["id"]):
        if row["session_id"] and row["event"] in ("session.start", "session.end", "session.sealed"):
            facts = chain.setdefault(row["session_id"], {})
            facts["start" if row["event"] == "session.start" else "closing"] = row
    for item in listed:
        sid = str(item.get("id")) if isinstance(item, dict) else None
        entry: dict[str, Any] = {"session_id": sid, "problems": [], "state": "ok", "frames": None}
        check.sessions.append(entry)
        problems: list[str] = entry["problems"]
        srow = by_id.get(str(sid))
        member = str(item.get("recording")) if isinstance(item, dict) else ""
        if srow is None:
            problems.append("its row is missing from db/sessions.json")
        elif member not in contents.files:
            problems.append(f"recording {_short(member)} is missing from the bundle")
        else:
            local = contents.files[member]
            lookup = _key_lookup(keys.get(sid))
            try:
                res = verify_any(local, expected_final_hash=srow.get("final_hash"), signature=srow.get("signature"),
                                 public_key=public if srow.get("signature") else None, key_lookup=lookup)
                header = read_any_header(local)
            except (BrokerError, OSError, ValueError) as exc:
                problems.append(f"recording {_short(member)}: {getattr(exc, 'message', exc)}")
            else:
                entry["frames"] = res.frames
                problems += [f"recording {_short(member)}: {p}" for p in res.problems]
                if res.incomplete or srow.get("status") == "incomplete":
                    entry["state"] = "incomplete"
                for key, column in (("session_id", "id"), ("user", "user_name"), ("device", "device"),
                                    ("grant_id", "grant_id")):
                    if header.get(key) is not None and str(header.get(key)) != str(srow.get(column)):
                        problems.append(f"recording {_short(member)}: its header says {key} {header.get(key)!r}, "
                                        f"the session row {srow.get(column)!r}")
            if srow.get("final_hash") and not srow.get("signature"):
                problems.append("final hash is not signed")
            _check_against_chain(srow, member, chain.get(str(sid)) or {}, problems)
            for t in transfers:
                if isinstance(t, dict) and t.get("session_id") == sid and not _transfer_audited(t, rows, sid):
                    problems.append(f"db/transfers.json: transfer {t.get('id')} ({t.get('path')!r}) has no "
                                    "matching transfer.file audit row")
        if problems:
            entry["state"] = "broken"
            check.problems += [f"session {sid}: {p}" for p in problems]
    for sid in sorted(set(by_id) - {str(i.get("id")) for i in listed if isinstance(i, dict)}):
        check.problems.append(f"db/sessions.json: session {sid} is not listed in the manifest")


def _check_against_chain(row: dict[str, Any], member: str, facts: dict[str, Any], problems: list[str]) -> None:
    start, closing = facts.get("start"), facts.get("closing")
    if start is None:
        problems.append("the bundle's audit rows hold no session.start for it")
    else:
        for column in ("user_name", "device", "grant_id"):
            if start[column] is not None and str(start[column]) != str(row.get(column)):
                problems.append(f"{column} is {row.get(column)!r} in db/sessions.json, but the audit chain recorded "
                                f"{start[column]!r}")
        name = parse_details(start).get("recording")
        if name and os.path.basename(str(name)) != PurePosixPath(member).name:
            problems.append(f"the audit chain recorded recording {name!r}, the bundle holds {_short(member)}")
    if closing is None:
        problems.append("the bundle's audit rows hold no session.end or session.sealed for it")
    else:
        logged = parse_details(closing).get("final_hash")
        if logged and logged != row.get("final_hash"):
            problems.append("final hash in db/sessions.json differs from the one in the audit chain")


def _transfer_audited(t: dict[str, Any], rows: dict[int, dict[str, Any]], sid: Any) -> bool:
    for row in rows.values():
        if row["event"] == "transfer.file" and row["session_id"] == sid:
            d = parse_details(row)
            if (d.get("path"), d.get("direction"), d.get("bytes") or 0, d.get("sha256")) == (
                    t.get("path"), t.get("direction"), t.get("bytes") or 0, t.get("sha256")):
                return True
    return False


def _key_lookup(entry: Any) -> Callable[[str], bytes] | None:
    if not isinstance(entry, dict):
        return None
    try:
        key = RecordingKey(bytes.fromhex(str(entry.get("recording_key"))))
    except ValueError:
        return None
    want = entry.get("key_id")

    def lookup(key_id: str) -> bytes:
        if key_id != want:
            raise RecordingError(f"the bundle holds no key {key_id!r}")
        return key

    return lookup


def bundle_key_lookup(contents: BundleContents, session_id: str) -> Callable[[str], bytes] | None:
    """The key lookup for one recording of a bundle exported with ``--include-data-key`` (None without)."""
    raw = contents.read(RECORDING_KEYS) if RECORDING_KEYS in contents.files else None
    try:
        keys = json.loads(raw) if raw is not None else {}
    except ValueError:
        return None
    return _key_lookup(keys.get(session_id)) if isinstance(keys, dict) else None


