"""Evidence bundles: chosen sessions exported as one signed file (``medbroker evidence export``); checking one
offline is broker/evidence_verify.py.

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
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from broker.app import App
from broker.audit import write_checkpoint
from broker.bundle import (AUDIT_COLUMNS, CHECKPOINTS, EVENTS, FORMAT, RECORDING_KEYS, VERSION, BundleWriter,
                           public_pem, recording_member, table_member, write_readme)
from broker.clock import utc_iso
from broker.errors import ConflictError, NotFoundError, RecordingError, StorageError, UsageError
from broker.report import public_key_id
from sessions.recformat import recording_key

__all__ = ["Selection", "ExportResult", "export_bundle", "select_sessions"]


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
