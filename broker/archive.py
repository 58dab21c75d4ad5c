"""Archiving sealed recordings to S3-compatible storage: one pass, safe to repeat, resumable mid-upload.

A pass takes every finished session (closed or sealed: final hash and signature in its row) whose recording is
not archived yet, oldest first, and for each:

1. hashes the local file (SHA-256, the whole file) and cuts it into ``archive.part_size`` parts;
2. resumes the multipart upload recorded in ``archive_uploads`` when there is one for the same bytes (the store's
   own part list is the truth: a part counts as stored when the store lists it with the ETag that is the MD5 of
   our local part), else starts one; every stored part is written to ``archive_upload_parts`` at once, so a
   pass killed at any point (or an object store killed under it) loses at most the part in flight;
3. sends each missing part with Content-MD5 (the store refuses altered bytes) and checks the returned ETag;
4. completes the upload, checks the multipart ETag (MD5 of the part MD5s, "-N") where the store uses that form,
   then **reads the whole object back** and compares its SHA-256 and size with the local file's. Per-part
   ETags prove each part arrived; only the read-back proves the object the store will serve later is the
   recording that was signed (an S3-compatible store may build ETags differently, e.g. with encryption);
5. records ``archived_at``/``archive_sha256``/``archive_size`` in the sessions row (dropping the upload rows)
   and audits ``recording.archived``; with ``archive.delete_local_after = "now"`` the local copy goes now,
   with an age it goes on a later pass once archived that long (after a HEAD shows the object still carries
   the checksum the row names, and the local file still hashes to it).

The pass stops at the first failure (an unreachable store fails every session the same way); the failure is
audited once per distinct error (``recording.archive.failed``), and the next pass resumes the upload.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from broker.clock import utc_iso
from broker.errors import BrokerError, StorageError
from broker.config import parse_size
from sessions.archived import ArchivedRecordingStore
from sessions.objectstore import sha256_file
from sessions.storage import SUFFIX

if TYPE_CHECKING:
    from broker.app import App

__all__ = ["ArchiveResult", "archive_pass", "archive_enabled"]

log = logging.getLogger("medbroker.archive")

CACHE_KEEP_S = 86400
"""Downloads of archived-only recordings (``HOME/archive-cache``) unused this long are removed by a pass."""


@dataclass(frozen=True)
class ArchiveResult:
    """What a pass did with one session's recording."""

    session_id: str
    key: str
    state: str
    """archived, failed, skipped, local_removed"""
    bytes: int = 0
    parts: int = 0
    parts_reused: int = 0
    seconds: float = 0.0
    sha256: str | None = None
    local_removed: bool = False
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def archive_enabled(app: App) -> bool:
    return bool(app.config.archive.url)


def _store(app: App) -> ArchivedRecordingStore:
    rec = app.recordings
    if not isinstance(rec, ArchivedRecordingStore):
        raise StorageError("archiving is off ([archive] url is empty)",
                           'set [archive] url = "s3://BUCKET/PREFIX", endpoint and the key files in broker.toml')
    return rec


class _Stopped(Exception):
    """``should_stop`` said so between two parts: the upload stays recorded and resumes next pass."""


def archive_pass(app: App, *, limit: int | None = None, actor: str = "system", source: str = "archive",
                 should_stop: Callable[[], bool] | None = None) -> list[ArchiveResult]:
    """Archive what is waiting, then remove local copies that are due; safe to run again at any time.

    :param limit: at most this many sessions to upload this pass
    :param should_stop: asked between parts and sessions (``serve`` shutting down); True ends the pass there
    :raises StorageError: archiving is off
    """
    rec = _store(app)
    stop = should_stop or (lambda: False)
    results: list[ArchiveResult] = []
    for row in app.store.archive_candidates(limit):
        if stop():
            return results
        try:
            result = _archive_one(app, rec, row, actor=actor, source=source, stop=stop)
        except _Stopped:
            return results
        results.append(result)
        if result.state == "failed":
            return results
    if not stop():
        results.extend(_remove_due_local_copies(app, rec, actor=actor, source=source))
        try:
            rec.prune_cache(CACHE_KEEP_S)
        except OSError as exc:  # a cache that cannot be cleaned is no reason to fail the pass
            log.warning("pruning %s failed: %s", rec.cache_dir, exc)
    return results


def _archive_one(app: App, rec: ArchivedRecordingStore, row: dict[str, Any], *, actor: str, source: str,
                 stop: Callable[[], bool]) -> ArchiveResult:
    sid = row["id"]
    try:
        key = rec.key_of(row["recording"])
    except BrokerError as exc:
        return ArchiveResult(sid, str(row["recording"])[:200], "skipped", detail=exc.message)
    started = time.monotonic()
    try:
        return _upload(app, rec, row, key, started, actor=actor, source=source, stop=stop)
    except (BrokerError, OSError) as exc:
        message = exc.message if isinstance(exc, BrokerError) else f"{key}: {exc.strerror or exc}"
        now = utc_iso(app.clock.now())
        app.store.note_archive_attempt(sid, error=message[:500], now=now, resumed=False)
        if app.store.last_archive_error(sid) != message[:500]:  # a store down for a day: one row, not 1440
            app.audit.record("recording.archive.failed", actor=actor, user=row["user_name"], device=row["device"],
                             session_id=sid, grant_id=row["grant_id"], source=source, key=key, error=message[:500],
                             url=rec.objects.url)
        log.warning("archiving %s failed: %s", sid, message)
        return ArchiveResult(sid, key, "failed", seconds=round(time.monotonic() - started, 3), detail=message)


def _upload(app: App, rec: ArchivedRecordingStore, row: dict[str, Any], key: str, started: float, *,
            actor: str, source: str, stop: Callable[[], bool]) -> ArchiveResult:
    sid = row["id"]
    objects, store = rec.objects, app.store
    path = rec.local.local_path(key)
    from_journal = False
    if not path.is_file():
        if not store.has_journal(sid):
            return _adopt_existing(app, rec, row, key, actor=actor, source=source)
        rebuilt = _from_journal(app, rec, row, key)  # the file is on another node (or lost): the journal has it
        if isinstance(rebuilt, str):
            return ArchiveResult(sid, key, "skipped", detail=rebuilt)
        path, from_journal = rebuilt, True
    sha, size = sha256_file(path)
    part_size = parse_size(app.config.archive.part_size)
    count = max(1, -(-size // part_size))
    now = utc_iso(app.clock.now())
    upload = store.archive_upload(sid)
    stored: dict[int, tuple[str, int]] = {}
    if upload is not None and (upload["sha256"], upload["size"], upload["part_size"], upload["object_key"]) \
            == (sha, size, part_size, objects.name(key)):
        on_server = objects.stored_parts(key, upload["upload_id"])
        if on_server is None:  # the store forgot the upload (expired, aborted): start over
            upload = None
        else:
            # a part is reusable when both we and the store recorded it with the same ETag
            stored = {n: v for n, v in on_server.items() if upload["parts"].get(n, ("", 0))[0] == v[0]}
    elif upload is not None:  # the file changed since (retention redacted it) or the settings did
        try:
            objects.abort_upload(upload["object_key"][len(objects.prefix):], upload["upload_id"])
        except StorageError:
            pass  # its parts expire with the store's lifecycle rules; the row is replaced below
        upload = None
    if upload is None:
        upload_id = objects.start_upload(key, sha)
        store.begin_archive_upload(sid, object_key=objects.name(key), upload_id=upload_id, size=size, sha256=sha,
                                   part_size=part_size, now=now)
    else:
        upload_id = upload["upload_id"]
        store.note_archive_attempt(sid, error=None, now=now, resumed=True)
    etags: list[str] = []
    reused = 0
    with open(path, "rb") as fh:
        for number in range(1, count + 1):
            data = fh.read(part_size)
            md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
            have = stored.get(number)
            if have is not None and have[0].lower() == md5 and have[1] == len(data):
                etags.append(have[0])
                reused += 1
                continue
            if stop():
                raise _Stopped
            etag = objects.upload_part(key, upload_id, number, data)
            store.record_archive_part(sid, upload_id, number, etag, len(data), utc_iso(app.clock.now()))
            etags.append(etag)
    final = objects.complete_upload(key, upload_id, etags)
    expected = hashlib.md5(b"".join(bytes.fromhex(e) for e in etags), usedforsecurity=False).hexdigest()
    if final.endswith(f"-{len(etags)}") and final.split("-")[0].lower() != expected:
        raise StorageError(f"object store: s3://{objects.bucket}/{objects.name(key)} completed with ETag {final}, "
                           f"not {expected}-{len(etags)} (the MD5 of its parts' MD5s)",
                           "the store joined other parts than were sent; the next pass uploads it again")
    back_sha, back_size = objects.read_back(key)
    if (back_sha, back_size) != (sha, size):
        store.drop_archive_upload(sid)  # the next pass starts a fresh upload
        raise StorageError(f"object store: s3://{objects.bucket}/{objects.name(key)} reads back as {back_sha} "
                           f"({back_size} bytes), not {sha} ({size} bytes)",
                           "the store altered the object; the next pass uploads it again")
    if not from_journal and sha256_file(path)[0] != sha:
        # retention rewrote the file while it was uploading (its own look at the store found no object yet):
        # the redacted form replaces what was just uploaded, so the store never keeps the removed payload
        sha, size = rec.replace_object(key, path)
    at = utc_iso(app.clock.now())
    store.mark_archived(sid, sha256=sha, size=size, now=at)
    if from_journal:
        path.unlink(missing_ok=True)
        store.mark_local_removed(sid, at)  # never was on this node; readers download it like any archived one
    if not app.config.recording.journal_keep:
        store.drop_journal(sid)  # archived and verified: the journal's copy is no longer needed
    seconds = round(time.monotonic() - started, 3)
    removed = from_journal or (app.config.archive.delete_local_after == "now"
                               and _remove_local(app, rec, row, key, sha))
    app.audit.record("recording.archived", actor=actor, user=row["user_name"], device=row["device"], session_id=sid,
                     grant_id=row["grant_id"], source=source, key=key, url=rec.objects.url, bytes=size, sha256=sha,
                     parts=count, parts_reused=reused, seconds=seconds, local_removed=removed)
    return ArchiveResult(sid, key, "archived", size, count, reused, seconds, sha, removed,
                         f"{count} parts ({reused} already stored), read back and verified")


def _from_journal(app: App, rec: ArchivedRecordingStore, row: dict[str, Any], key: str) -> Path | str:
    """Rebuild a finished recording from its journal rows into the cache, and use it only if it is exactly the
    sealed recording: it must verify against the row's final hash and signature.

    :returns: the rebuilt file, or why not (it does not verify: the journal lacks the end, e.g. the node died
        before sealing and a survivor sealed its own copy; the session then waits for a node that has the file)
    """
    from broker.journal import rebuild_from_journal
    from sessions.retention import verify_any

    dest = rec.cache_dir / "journal" / f"{row['id']}{SUFFIX}"
    dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    dest.unlink(missing_ok=True)
    try:
        rebuild_from_journal(app.store, row["id"], dest)
        check = verify_any(dest, expected_final_hash=row["final_hash"], signature=row["signature"],
                           public_key=app.signing_key.public_key(), key_lookup=app.keys.get)
    except BrokerError as exc:
        dest.unlink(missing_ok=True)
        return f"recording file is not on this node and its journal cannot be rebuilt: {exc.message}"
    if not check.ok or check.incomplete:
        dest.unlink(missing_ok=True)
        return ("recording file is not on this node, and its journal rebuilds to something other than the sealed "
                f"recording ({'; '.join(check.problems) or 'no end frame'}); a node with the file archives it")
    return dest


def _adopt_existing(app: App, rec: ArchivedRecordingStore, row: dict[str, Any], key: str, *, actor: str,
                    source: str) -> ArchiveResult:
    """No local file: an object of ours that reads back as the checksum it carries is adopted (a pass that
    died between completing and recording), else the session is skipped."""
    info = rec.objects.head(key)
    if info is None or not info.sha256:
        return ArchiveResult(row["id"], key, "skipped",
                             detail="recording file is missing locally and not in the object store "
                                    "(see: medbroker audit verify)")
    sha, size = rec.objects.read_back(key)
    if sha != info.sha256:
        raise StorageError(f"object store: s3://{rec.objects.bucket}/{rec.objects.name(key)} reads back as {sha}, "
                           f"not the {info.sha256} it was stored with", "restore the recording, then run again")
    app.store.mark_archived(row["id"], sha256=sha, size=size, now=utc_iso(app.clock.now()))
    app.store.mark_local_removed(row["id"], utc_iso(app.clock.now()))
    app.audit.record("recording.archived", actor=actor, user=row["user_name"], device=row["device"],
                     session_id=row["id"], grant_id=row["grant_id"], source=source, key=key, url=rec.objects.url,
                     bytes=size, sha256=sha, parts=0, parts_reused=0, seconds=0, local_removed=True)
    return ArchiveResult(row["id"], key, "archived", size, sha256=sha, local_removed=True,
                         detail="already in the object store (no local copy); read back and verified")


def _remove_local(app: App, rec: ArchivedRecordingStore, row: dict[str, Any], key: str, sha: str) -> bool:
    """Remove the local copy once the object carries ``sha`` and the local file still hashes to it."""
    path = rec.local.local_path(key)
    info = rec.objects.head(key)
    if info is None or info.sha256 != sha or not path.is_file() or sha256_file(path)[0] != sha:
        return False
    path.unlink()
    app.store.mark_local_removed(row["id"], utc_iso(app.clock.now()))
    return True


def _remove_due_local_copies(app: App, rec: ArchivedRecordingStore, *, actor: str, source: str) \
        -> list[ArchiveResult]:
    when = app.config.archive.delete_local_after
    if when == "never":
        return []
    now = app.clock.now()
    cutoff = now if when == "now" else now - timedelta(seconds=app.config.seconds("archive", "delete_local_after"))
    out = []
    for row in app.store.archived_with_local_copy(utc_iso(cutoff)):
        try:
            key = rec.key_of(row["recording"])
            if not rec.local.local_path(key).is_file():
                app.store.mark_local_removed(row["id"], utc_iso(now))  # gone already (removed by hand)
                continue
            if _remove_local(app, rec, row, key, row["archive_sha256"]):
                app.audit.record("recording.local_removed", actor=actor, user=row["user_name"], device=row["device"],
                                 session_id=row["id"], grant_id=row["grant_id"], source=source, key=key,
                                 sha256=row["archive_sha256"], archived_at=row["archived_at"])
                out.append(ArchiveResult(row["id"], key, "local_removed", row["archive_size"] or 0,
                                         sha256=row["archive_sha256"], local_removed=True,
                                         detail=f"archived {row['archived_at']}; the object still verifies"))
            else:
                out.append(ArchiveResult(row["id"], key, "skipped", detail="local copy kept: it or the object no "
                                         "longer matches the archived checksum (see: medbroker audit verify)"))
        except (BrokerError, OSError) as exc:
            out.append(ArchiveResult(row["id"], str(row["recording"]), "failed",
                                     detail=exc.message if isinstance(exc, BrokerError) else str(exc)))
            break
    return out
