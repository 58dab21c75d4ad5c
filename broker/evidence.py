"""Evidence bundles: chosen sessions exported as one signed file (``medbroker evidence export``) and checked
offline, with no broker home, against only what the file holds (``medbroker audit verify --bundle``).

What a bundle holds (docs/ha.md, "Evidence bundles"): the recordings as stored (sealed, encrypted); the audit
rows about the sessions, their grants and access requests, each with the stretch of the chain up to the next
signed checkpoint (a row's hash covers the full previous row, so the rows in between travel in full); those
checkpoints; the broker's public signing key; the rows of the sessions, file transfers, forwards, grants,
requests and approvals tables; with ``--include-data-key`` one key per recording (opens that recording only,
never the broker's data keys); and a manifest with the sha256 of every member, signed with the broker's key.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from broker.app import App
from broker.audit import checkpoint_message, parse_details, row_hash, write_checkpoint
from broker.bundle import (CHECKPOINTS, EVENTS, FORMAT, MANIFEST, PUBLIC_KEY, PREFIX, README, RECORDING_KEYS,
                           SIGNATURE, BundleContents, BundleError, BundleWriter, public_pem, read_bundle,
                           recording_member, table_member, write_readme)
from broker.clock import utc_iso
from broker.errors import BrokerError, ConflictError, NotFoundError, RecordingError, StorageError, UsageError
from broker.keys import verify_hex
from broker.report import public_key_id
from sessions.recformat import RecordingKey, recording_key

__all__ = ["Selection", "ExportResult", "BundleCheck", "export_bundle", "verify_bundle", "open_bundle",
           "select_sessions", "bundle_key_lookup", "AUDIT_COLUMNS"]

VERSION = 1
AUDIT_COLUMNS = ("id", "at", "event", "actor", "user_name", "device", "session_id", "grant_id", "request_id",
                 "source", "details", "prev_hash", "hash")


@dataclass(frozen=True)
class Selection:
    """Which sessions go into a bundle: every given selector must match (at least one is required)."""

    session_ids: tuple[str, ...] = ()
    device: str | None = None
    user: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def describe(self) -> dict[str, Any]:
        return {"sessions": list(self.session_ids), "device": self.device, "user": self.user,
                "since": utc_iso(self.since) if self.since else None,
                "until": utc_iso(self.until) if self.until else None}

    def empty(self) -> bool:
        return not (self.session_ids or self.device or self.user or self.since or self.until)


def select_sessions(app: App, sel: Selection) -> tuple[list[dict[str, Any]], list[str]]:
    """The ended sessions the selection names, oldest first, and the ids of live ones it left out.

    :raises UsageError: no selector
    :raises NotFoundError: a ``--session`` id that does not exist, or nothing matches
    :raises ConflictError: a ``--session`` named explicitly is still live
    """
    if sel.empty():
        raise UsageError("say which sessions to export: --session ID, --device NAME, --user NAME, --since or --until",
                         "e.g. medbroker evidence export --device ct-01 --since 2026-11-01 -o ct-01.evidence.tar")
    rows = app.store.list_sessions(user=sel.user, device=sel.device,
                                   since=utc_iso(sel.since) if sel.since else None,
                                   until=utc_iso(sel.until) if sel.until else None)
    if sel.session_ids:
        unknown = [s for s in sel.session_ids if app.store.get_session(s) is None]
        if unknown:
            raise NotFoundError(f"session {unknown[0][:64]!r} does not exist",
                                "list them with: medbroker sessions list")
        wanted = set(sel.session_ids)
        rows = [r for r in rows if r["id"] in wanted]
        live = [r["id"] for r in rows if r["status"] == "live"]
        if live:
            raise ConflictError(f"session {live[0]} is still live; its recording is not final",
                                "export it once it has ended (medbroker sessions show " + live[0] + ")")
    live = [r["id"] for r in rows if r["status"] == "live"]
    rows = [r for r in rows if r["status"] != "live"]
    if not rows:
        raise NotFoundError("no ended session matches " + ", ".join(
            f"{k} {v}" for k, v in sel.describe().items() if v), "list them with: medbroker sessions list")
    return rows, live


def _segments(ids: list[int], checkpoint_ids: list[int]) -> list[tuple[int, int]]:
    """Stretches of the chain ``[first, last]`` covering ``ids``, each ending at a signed checkpoint."""
    out: list[tuple[int, int]] = []
    for i in ids:
        if out and i <= out[-1][1]:
            continue
        at = bisect.bisect_left(checkpoint_ids, i)
        if at == len(checkpoint_ids):
            raise ConflictError(f"audit row {i} is not covered by a signed checkpoint yet", "run the export again")
        end = checkpoint_ids[at]
        if out and i == out[-1][1] + 1:
            out[-1] = (out[-1][0], end)
        else:
            out.append((i, end))
    return out


@dataclass(frozen=True)
class ExportResult:
    path: Path
    sha256: str
    bytes: int
    sessions: tuple[str, ...]
    skipped_live: tuple[str, ...]
    audit_rows: int
    segments: tuple[tuple[int, int], ...]
    key_id: str
    data_key_included: bool


def export_bundle(app: App, sel: Selection, output: Path, *, actor: str, include_data_key: bool = False,
                  source: str = "cli") -> ExportResult:
    """Write the evidence bundle of the selected sessions to ``output``; audited as ``evidence.exported``.

    :raises UsageError, NotFoundError, ConflictError: see :func:`select_sessions`
    :raises StorageError: a recording is missing or outside the recordings directory; ``output`` not writable
    """
    rows, live = select_sessions(app, sel)
    store = app.store
    sids = [r["id"] for r in rows]
    grants = {g["id"]: g for g in (store.get_grant(r["grant_id"]) for r in rows) if g is not None}
    requests = {q["id"]: q for q in (store.get_request(g["request_id"]) for g in grants.values()) if q is not None}
    about = store.audit_ids_about(session_ids=sids, grant_ids=sorted(grants), request_ids=sorted(requests))
    write_checkpoint(app.audit, app.signing_key)  # a signed checkpoint at or after every row about them
    checkpoints = sorted(store.checkpoints(), key=lambda c: c["event_id"])
    segments = _segments(about, [c["event_id"] for c in checkpoints])
    members: dict[str, str] = {}
    for r in rows:
        key = app.recordings.key_of(r["recording"])
        if not app.recordings.exists(key):
            raise RecordingError(f"the recording of session {r['id']} is missing ({key} in "
                                 f"{app.config.recordings_dir}); nothing was written",
                                 "run: medbroker audit verify; leave that session out with other selectors")
        members[r["id"]] = recording_member(key)
    writer = BundleWriter(output, mtime=app.clock.now().timestamp())
    try:
        audit_rows = _fill(app, writer, sel, rows, members, grants, requests, about, segments, checkpoints,
                           include_data_key, actor)
    except OSError as exc:
        writer.abort()
        raise StorageError(f"cannot write bundle {output}: {exc.strerror or exc}; nothing was written",
                           "free space there or choose another -o path") from None
    except BaseException:
        writer.abort()
        raise
    digest, size = _file_sha256(output)
    app.audit.record("evidence.exported", actor=actor, source=source, sessions=sids, path=str(output.absolute()),
                     sha256=digest, bytes=size, data_key_included=include_data_key, selection=sel.describe(),
                     audit_rows=audit_rows)
    return ExportResult(output, digest, size, tuple(sids), tuple(live), audit_rows, tuple(segments),
                        public_key_id(app.signing_key.public_key()), include_data_key)


def _fill(app: App, writer: BundleWriter, sel: Selection, rows: list[dict[str, Any]], members: dict[str, str],
          grants: dict[int, dict[str, Any]], requests: dict[int, dict[str, Any]], about: list[int],
          segments: list[tuple[int, int]], checkpoints: list[dict[str, Any]], include_data_key: bool,
          actor: str) -> int:
    """Write every member of the bundle and finish it (manifest, signature); returns the number of audit rows."""
    store = app.store
    sids = [r["id"] for r in rows]
    keys: dict[str, Any] = {}
    audit_rows = []
    for first, last in segments:
        audit_rows += store.audit_rows(after_id=first - 1, limit=last - first + 1)
    writer.add_bytes(EVENTS, b"".join(json.dumps({c: r[c] for c in AUDIT_COLUMNS}, ensure_ascii=False,
                                                 sort_keys=True).encode() + b"\n" for r in audit_rows))
    ends = {b for _a, b in segments}
    inside = [c for c in checkpoints if any(a <= c["event_id"] <= b for a, b in segments)]
    writer.add_json(CHECKPOINTS, [{k: c[k] for k in ("event_id", "hash", "signature", "at")} for c in inside])
    writer.add_json(table_member("sessions"), rows)
    writer.add_json(table_member("transfers"), [t for s in sids for t in store.transfers(s)])
    writer.add_json(table_member("forwards"), [f for s in sids for f in store.forwards(s)])
    writer.add_json(table_member("grants"), [grants[g] for g in sorted(grants)])
    writer.add_json(table_member("requests"), [requests[q] for q in sorted(requests)])
    writer.add_json(table_member("approvals"), [a for q in sorted(requests) for a in store.approvals(q)])
    for r in rows:
        with app.recordings.open_for_read(r["recording"]) as fh:
            writer.add_file(members[r["id"]], fh)
        if include_data_key:
            keys.update(_recording_key(app, r))
    if include_data_key:
        writer.add_json(RECORDING_KEYS, keys)
    write_readme(writer, _README)
    public = app.signing_key.public_key()
    manifest = {
        "format": FORMAT, "version": VERSION, "created_at": utc_iso(app.clock.now()), "exported_by": actor,
        "selection": sel.describe(), "signing_key": public_key_id(public),
        "sessions": [{"id": r["id"], "recording": members[r["id"]], "user": r["user_name"], "device": r["device"],
                      "status": r["status"], "final_hash": r["final_hash"]} for r in rows],
        "audit": {"segments": [list(s) for s in segments], "rows": len(audit_rows), "about": about,
                  "checkpoints": sorted(ends)},
        "data_key_included": include_data_key,
    }
    writer.finish(manifest, app.signing_key.sign, public_pem(public))
    return len(audit_rows)


def _recording_key(app: App, row: dict[str, Any]) -> dict[str, Any]:
    from sessions.retention import read_any_header

    header = read_any_header(app.recordings.local_path(row["recording"]))
    enc = header.get("encryption")
    if not isinstance(enc, dict):
        return {}
    key = recording_key(app.keys.get(enc["key_id"]), bytes.fromhex(enc.get("salt", "")), header["session_id"])
    return {row["id"]: {"key_id": enc["key_id"], "recording_key": key.hex()}}


def _file_sha256(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


# ---------------------------------------------------------------------------------------------------- verifying
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


_README = """\
medbroker evidence bundle
=========================

An uncompressed tar. To check it with medbroker (no broker home needed):

    medbroker audit verify --bundle FILE [--expect-key ed25519:...]

By hand, with standard tools:

    tar -xf FILE && cd medbroker-evidence
    openssl pkeyutl -verify -pubin -inkey signing-key.pem -rawin -in manifest.json -sigfile manifest.sig
    # then compare the sha256 of every member with manifest.json ("members")
    sha256sum recordings/* audit/* db/* README.txt signing-key.pem

The signing key is the broker's own; compare its id (printed by the verify command and in manifest.json,
"signing_key") with the one the hospital published, so a re-signed copy cannot pass. audit/events.jsonl holds
every audit row of each stretch of the chain up to a signed checkpoint (audit/checkpoints.json), including
rows of other activity in that stretch: a row's hash covers the full previous row.
"""
