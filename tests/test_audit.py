"""broker/audit.py: the hash chain, tamper detection through raw SQL, signed checkpoints, sinks, the catalogue."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.audit import EVENTS, AuditLog, parse_details, row_hash, verify_chain
from broker.clock import FakeClock, utc_iso
from broker.keys import sign_hex, verify_hex
from broker.store import Store, open_store

SIGNER = Ed25519PrivateKey.generate()


def verify_sig(message: bytes, signature_hex: str) -> bool:
    return verify_hex(SIGNER.public_key(), message, signature_hex)


@pytest.fixture
def store(store_target: Path | str) -> Store:
    s = open_store(store_target)
    yield s
    s.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def audit(store: Store, clock: FakeClock) -> AuditLog:
    return AuditLog(store, clock)


def fill(audit: AuditLog, clock: FakeClock, n: int = 6) -> None:
    for i in range(n):
        clock.advance(1)
        audit.record("request.created", actor="alice", user="alice", device="ct-01", request_id=i + 1,
                     reason=f"job {i}", duration_s=3600)


def checkpoint(store: Store, event_id: int, *, key: Ed25519PrivateKey = SIGNER) -> None:
    row = store.one("SELECT hash FROM audit_events WHERE id = ?", (event_id,))
    store.insert_checkpoint(event_id, row["hash"], sign_hex(key, f"{event_id}:{row['hash']}".encode()),
                            utc_iso(FakeClock().now()))


def sql(store: Store, statement: str, params: tuple = ()) -> None:
    """Tamper the way someone with the database would: plain SQL, outside medbroker's queries."""
    store.conn.execute(statement, params)


def problems(store: Store) -> list[str]:
    return list(verify_chain(store, verify_signature=verify_sig).problems)


# ---------------------------------------------------------------- writing


def test_record_writes_a_linked_row(store: Store, audit: AuditLog, clock: FakeClock) -> None:
    row = audit.record("grant.created", actor="bob", user="alice", device="ct-01", grant_id=7, request_id=3,
                       source="192.0.2.1", ends_at="x", approved_by=["bob"])
    stored = store.audit_rows()
    assert stored == [row]
    assert row["id"] == 1 and row["prev_hash"] == "0" * 64
    assert row["at"] == utc_iso(clock.now())
    assert (row["event"], row["actor"], row["user_name"], row["device"], row["grant_id"], row["request_id"],
            row["source"]) == ("grant.created", "bob", "alice", "ct-01", 7, 3, "192.0.2.1")
    assert parse_details(row) == {"ends_at": "x", "approved_by": ["bob"]}
    assert row["hash"] == row_hash(row["prev_hash"], row)
    second = audit.record("grant.revoked", actor="sec", grant_id=7)
    assert second["prev_hash"] == row["hash"] and second["id"] == 2


def test_unknown_event_raises_and_writes_nothing(store: Store, audit: AuditLog) -> None:
    for name in ("grant.create", "GRANT.CREATED", "", "session.start.extra"):
        with pytest.raises(ValueError, match="not in the catalogue"):
            audit.record(name, actor="x")
    assert store.audit_rows() == []


def test_details_are_json_with_unicode_kept(audit: AuditLog) -> None:
    row = audit.record("request.created", reason="Röhre tauschen ✓", forwards=[], ticket=None)
    assert json.loads(row["details"]) == {"reason": "Röhre tauschen ✓", "forwards": [], "ticket": None}


def test_parse_details_tolerates_garbage() -> None:
    assert parse_details({"details": "not json"}) == {}
    assert parse_details({"details": None}) == {}
    assert parse_details({}) == {}


def test_event_catalogue_names_follow_area_action_outcome() -> None:
    for name, text in EVENTS.items():
        assert re.fullmatch(r"[a-z]+(\.[a-z_]+){1,2}", name), name
        assert text and text[0].islower(), name


# ---------------------------------------------------------------- verification


def test_intact_chain_verifies(store: Store, audit: AuditLog, clock: FakeClock) -> None:
    assert verify_chain(store).ok and verify_chain(store).rows == 0
    fill(audit, clock, 8)
    checkpoint(store, 4)
    checkpoint(store, 8)
    result = verify_chain(store, verify_signature=verify_sig)
    assert result.ok and result.problems == () and result.rows == 8
    assert result.last_hash == store.audit_rows()[-1]["hash"]


@pytest.mark.parametrize("column,value", [
    ("details", '{"duration_s":3600,"reason":"job 0 and a copy of the DICOM folder"}'),
    ("actor", "mallory"), ("user_name", "bob"), ("device", "mri-02"), ("event", "request.denied"),
    ("at", "2026-01-01T07:00:00.000000Z"), ("request_id", 99), ("grant_id", 5), ("session_id", "s1"),
    ("source", "203.0.113.9"),
])
def test_changed_value_names_that_row(store: Store, audit: AuditLog, clock: FakeClock, column: str,
                                      value: Any) -> None:
    fill(audit, clock)
    sql(store, f"UPDATE audit_events SET {column} = ? WHERE id = 3", (value,))
    assert problems(store) == ["audit row 3: content does not match its hash (altered)"]


def test_deleted_middle_row_is_named_missing(store: Store, audit: AuditLog, clock: FakeClock) -> None:
    fill(audit, clock)
    sql(store, "DELETE FROM audit_events WHERE id = 3")
    assert problems(store) == ["audit row 3: missing (next row is 4)",
                               "audit row 4: prev_hash does not link to row 3"]


def test_deleted_first_row_is_named_missing(store: Store, audit: AuditLog, clock: FakeClock) -> None:
    fill(audit, clock)
    sql(store, "DELETE FROM audit_events WHERE id = 1")
    assert "audit row 1: missing (next row is 2)" in problems(store)


def test_swapped_rows_are_detected(store: Store, audit: AuditLog, clock: FakeClock) -> None:
    """Reordering: rows 2 and 4 exchange everything but their ids (hashes travel with their rows)."""
    fill(audit, clock)
    two, four = (store.one("SELECT * FROM audit_events WHERE id = ?", (i,)) for i in (2, 4))
    cols = [c for c in two if c != "id"]
    for target, source in ((2, four), (4, two)):
        sets = ", ".join(f"{c} = ?" for c in cols)
        sql(store, f"UPDATE audit_events SET {sets} WHERE id = ?", (*(source[c] for c in cols), target))
    found = problems(store)
    assert any(p.startswith("audit row 2:") for p in found)
    assert any(p.startswith("audit row 4:") for p in found)
    assert not verify_chain(store).ok


def test_swapped_ids_are_detected(store: Store, audit: AuditLog, clock: FakeClock) -> None:
    fill(audit, clock)
    sql(store, "UPDATE audit_events SET id = 100 WHERE id = 2")
    sql(store, "UPDATE audit_events SET id = 2 WHERE id = 5")
    sql(store, "UPDATE audit_events SET id = 5 WHERE id = 100")
    found = problems(store)
    assert "audit row 2: content does not match its hash (altered)" in found
    assert "audit row 5: content does not match its hash (altered)" in found


def test_rehashed_row_breaks_the_next_link(store: Store, audit: AuditLog, clock: FakeClock) -> None:
    """A forger who alters row 3 and recomputes its hash makes row 3 look whole; row 4 then no longer links."""
    fill(audit, clock)
    row = store.one("SELECT * FROM audit_events WHERE id = 3")
    row["details"] = '{"reason":"nothing to see"}'
    sql(store, "UPDATE audit_events SET details = ?, hash = ? WHERE id = 3",
        (row["details"], row_hash(row["prev_hash"], row)))
    assert problems(store) == ["audit row 4: prev_hash does not link to row 3"]


def test_changed_prev_hash_is_detected(store: Store, audit: AuditLog, clock: FakeClock) -> None:
    fill(audit, clock)
    sql(store, "UPDATE audit_events SET prev_hash = ? WHERE id = 3", ("f" * 64,))
    assert problems(store) == ["audit row 3: prev_hash does not link to row 2",
                               "audit row 3: content does not match its hash (altered)"]


def test_a_fully_rechained_tail_is_caught_by_the_checkpoint(store: Store, audit: AuditLog, clock: FakeClock) -> None:
    """Without a checkpoint a consistent rewrite of the tail is invisible; a signed checkpoint catches it."""
    fill(audit, clock)
    checkpoint(store, 6)
    prev = store.one("SELECT hash FROM audit_events WHERE id = 3")["hash"]
    for rid in range(4, 7):
        row = store.one("SELECT * FROM audit_events WHERE id = ?", (rid,))
        row["details"], row["prev_hash"] = '{"reason":"rewritten"}', prev
        prev = row_hash(prev, row)
        sql(store, "UPDATE audit_events SET details = ?, prev_hash = ?, hash = ? WHERE id = ?",
            (row["details"], row["prev_hash"], prev, rid))
    assert problems(store) == ["checkpoint 1: audit row 6 hash differs from the signed checkpoint"]


def test_truncated_tail_after_a_checkpoint_names_the_missing_row(store: Store, audit: AuditLog,
                                                                 clock: FakeClock) -> None:
    fill(audit, clock, 8)
    checkpoint(store, 7)
    sql(store, "DELETE FROM audit_events WHERE id >= 6")
    assert problems(store) == ["checkpoint 1: audit row 7 is missing (rows deleted)"]


def test_bad_checkpoint_signature(store: Store, audit: AuditLog, clock: FakeClock) -> None:
    fill(audit, clock)
    checkpoint(store, 3)
    checkpoint(store, 5, key=Ed25519PrivateKey.generate())  # signed by some other key
    assert problems(store) == ["checkpoint 2: signature invalid"]
    sql(store, "UPDATE audit_checkpoints SET signature = 'zz' WHERE id = 1")
    assert problems(store) == ["checkpoint 1: signature invalid", "checkpoint 2: signature invalid"]
    assert verify_chain(store).ok  # without a verifier, signatures are not checked


def test_forged_checkpoint_hash_fails_the_signature(store: Store, audit: AuditLog, clock: FakeClock) -> None:
    fill(audit, clock)
    checkpoint(store, 4)
    sql(store, "UPDATE audit_events SET details = '{}' WHERE id = 4")
    new_hash = row_hash(store.one("SELECT * FROM audit_events WHERE id = 4")["prev_hash"],
                        store.one("SELECT * FROM audit_events WHERE id = 4"))
    sql(store, "UPDATE audit_events SET hash = ? WHERE id = 4", (new_hash,))
    sql(store, "UPDATE audit_checkpoints SET hash = ? WHERE id = 1", (new_hash,))
    assert "checkpoint 1: signature invalid" in problems(store)


# ---------------------------------------------------------------- sinks


def test_sinks_run_after_the_commit(store_target: Path | str, store: Store, clock: FakeClock) -> None:
    seen: list[tuple[int, str | None]] = []

    def reader_sink(row: dict[str, Any]) -> None:
        other = open_store(store_target, migrate=False)  # another connection sees only committed rows
        try:
            found = other.one("SELECT hash FROM audit_events WHERE id = ?", (row["id"],))
        finally:
            other.close()
        seen.append((row["id"], found["hash"] if found else None))

    log = AuditLog(store, clock, [reader_sink])
    a = log.record("broker.started")
    b = log.record("broker.stopped")
    assert seen == [(1, a["hash"]), (2, b["hash"])]


def test_failing_sink_loses_no_row_and_other_sinks_still_run(store: Store, clock: FakeClock) -> None:
    got: list[int] = []

    def broken(row: dict[str, Any]) -> None:
        raise OSError("disk full")

    log = AuditLog(store, clock, [broken, lambda row: got.append(row["id"])])
    row = log.record("alert.exfiltration", user="alice", device="ct-01")
    assert got == [1]
    assert store.audit_rows() == [row]
    assert verify_chain(store).ok


def test_failing_sink_is_counted_and_logged_by_name(store: Store, clock: FakeClock,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    def broken(row: dict[str, Any]) -> None:
        raise OSError("disk full")

    log = AuditLog(store, clock, [broken, lambda row: None])
    with caplog.at_level("WARNING", logger="medbroker.audit"):
        log.record("broker.started")
        row = log.record("broker.stopped")
    assert log.sink_failures == {"broken": 2}  # the working sink is not counted
    lines = [r for r in caplog.records if r.name == "medbroker.audit"]
    assert len(lines) == 2
    assert "audit sink broken failed on row %d (broker.stopped): OSError: disk full" % row["id"] in lines[1].getMessage()
    assert lines[0].exc_info and not lines[1].exc_info  # the traceback once per sink


def test_sink_sees_the_stored_row(store: Store, clock: FakeClock) -> None:
    got: list[dict[str, Any]] = []
    row = AuditLog(store, clock, [got.append]).record("session.killed", actor="sec", session_id="s-1", reason="x")
    assert got == [row] == store.audit_rows()


# ---------------------------------------------------------------- concurrency


def test_two_writers_on_two_connections_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    open_store(path).close()
    stores = [open_store(path) for _ in range(2)]
    errors: list[BaseException] = []

    def write(s: Store, who: str) -> None:
        try:
            log = AuditLog(s, FakeClock())
            for i in range(40):
                log.record("auth.failure", user=who, n=i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(s, f"user{i}")) for i, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and not any(t.is_alive() for t in threads)
    result = verify_chain(stores[0])
    assert result.ok, result.problems
    assert result.rows == 80
    for s in stores:
        s.close()
