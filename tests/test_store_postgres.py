"""The PostgreSQL store: its schema, search over pg_trgm, and every read-then-write decision under real
concurrency (separate processes, each with its own connection, released together at a barrier)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from broker.access_links import issue_signin_link, redeem_signin_link
from broker.audit import AuditLog, verify_chain
from broker.cli import app as cli_app
from broker.clock import FakeClock
from broker.config import BrokerConfig, WebConfig
from broker.errors import GrantExpiredError
from broker.grants import GrantRules, request_grant
from broker.identity import add_user, get_principal
from broker.store import MIGRATIONS, Store, open_store
from broker.store.copy import NOT_COPIED, table_counts
from helpers.pgwork import run_parallel

AT = "2026-01-01T08:00:00.000000Z"
RULES = GrantRules(max_duration_s=8 * 3600, request_ttl_s=24 * 3600, critical_approvers=2)


def _device_row(name: str, device_class: str) -> dict[str, Any]:
    return {"name": name, "host": "127.0.0.1", "port": 22, "login": "service", "auth_kind": "password",
            "credential": "k1:sealed", "host_key": "ssh-ed25519 AAAA", "host_key_fingerprint": "SHA256:x",
            "device_class": device_class, "created_at": "2026-01-01T00:00:00.000000Z"}


def populate(store: Store, clock: FakeClock) -> None:
    for name, role in [("alice", "vendor"), ("bob", "approver"), ("carol", "approver")]:
        add_user(store, name, role, None, clock.now())
    store.insert_device(_device_row("ct-01", "standard"))
    store.insert_device(_device_row("mri-01", "critical"))


@pytest.fixture
def pg(pg_url: str) -> Store:
    s = open_store(pg_url)
    yield s
    s.close()


@pytest.fixture
def store(store_target: Path | str) -> Store:
    s = open_store(store_target)
    yield s
    s.close()


# ---------------------------------------------------------------- schema


def _columns(store: Store, table: str) -> list[str]:
    return store.conn.execute(f'SELECT * FROM "{table}" LIMIT 0').columns


def test_both_stores_have_the_same_tables_and_columns(pg: Store, tmp_path: Path) -> None:
    lite = open_store(tmp_path / "medbroker.db")
    try:
        assert lite.conn.tables() == pg.conn.tables()
        for table in lite.conn.tables():
            assert _columns(lite, table) == _columns(pg, table), table
        assert pg.schema_version() == lite.schema_version() == max(MIGRATIONS)
    finally:
        lite.close()


def test_postgres_types_are_64_bit_identities_and_doubles(pg: Store) -> None:
    types = {(r["table_name"], r["column_name"]): (r["data_type"], r["is_identity"]) for r in pg.query(
        "SELECT table_name, column_name, data_type, is_identity FROM information_schema.columns "
        "WHERE table_schema = current_schema()")}
    assert types[("audit_events", "id")] == ("bigint", "YES")
    assert types[("sessions", "bytes_in")] == ("bigint", "NO")
    assert types[("commands", "offset")] == ("double precision", "NO")
    indexes = {r["indexname"]: r["indexdef"] for r in pg.query("SELECT indexname, indexdef FROM pg_indexes")}
    assert "gin_trgm_ops" in indexes["search_text_trgm"]


def test_nodes_starting_at_once_apply_each_migration_once(postgres: Any) -> None:
    url = postgres.new_database(migrated=False)
    try:
        results = run_parallel("migrate", url, [None] * 4)
        assert results == [("ok", max(MIGRATIONS))] * 4
        s = open_store(url, migrate=False)
        rows = s.query("SELECT version, count(*) AS n FROM schema_migrations GROUP BY version ORDER BY version")
        assert [(r["version"], r["n"]) for r in rows] == [(v, 1) for v in sorted(MIGRATIONS)]
        s.close()
    finally:
        postgres.drop(url)


def test_an_unreachable_postgres_is_a_storage_error_without_the_password(tmp_path: Path) -> None:
    from broker.errors import StorageError

    with pytest.raises(StorageError) as info:
        open_store(f"postgresql://mb:hunter2@/medbroker?host={tmp_path}&port=1&connect_timeout=2")
    assert "hunter2" not in info.value.message and "<secret>" in info.value.message
    assert "PostgreSQL" in info.value.message and info.value.hint


# ---------------------------------------------------------------- search (both stores, same answers)

SESSIONS = [("s-1", "alice", "ct-01", "2026-01-01T08:00:00.000000Z"),
            ("s-2", "bob", "mri-01", "2026-01-02T08:00:00.000000Z")]
TEXTS = {
    "s-1": [(1.0, "command", "cat /etc/needle-42.conf"), (2.5, "output", "Needle found: 69999 items"),
            (3.0, "output", "100% done_ok"), (4.0, "path", "/data/dicom/IMG_0001.dcm"), (5.0, "output", "ls")],
    "s-2": [(1.0, "command", "systemctl status needle"), (2.0, "output", "tube current 42 mA")],
}


def _index(store: Store) -> None:
    for sid, user, device, started in SESSIONS:
        store.insert_session({"id": sid, "user_name": user, "device": device, "grant_id": 1, "started_at": started,
                              "status": "ok", "recording": f"{sid}.rec"})
        store.save_session_text(sid, [(t[0], 0, "line", t[2]) for t in TEXTS[sid] if t[1] == "command"],
                                list(TEXTS[sid]), AT)


@pytest.mark.parametrize("needle,expected", [
    ("needle-42", ["cat /etc/needle-42.conf"]),
    ("69999", ["Needle found: 69999 items"]),
    ("NEEDLE", ["cat /etc/needle-42.conf", "Needle found: 69999 items", "systemctl status needle"]),  # ASCII case
    ("needle", ["cat /etc/needle-42.conf", "Needle found: 69999 items", "systemctl status needle"]),
    ("42", ["cat /etc/needle-42.conf", "tube current 42 mA"]),  # two characters: below a trigram
    ("100%", ["100% done_ok"]),  # LIKE's wildcards are literal
    ("e_o", ["100% done_ok"]),
    ("%", ["100% done_ok"]),
    ("IMG_0001", ["/data/dicom/IMG_0001.dcm"]),
    ("no-such-text", []),
])
def test_search_finds_the_same_on_both_stores(store: Store, needle: str, expected: list[str]) -> None:
    _index(store)
    assert [h["text"] for h in store.search_sessions(needle)] == expected


def test_search_filters_and_retention_on_both_stores(store: Store) -> None:
    _index(store)
    assert [h["text"] for h in store.search_sessions("needle", user="bob")] == ["systemctl status needle"]
    assert [h["text"] for h in store.search_sessions("needle", device="ct-01", user="alice")] == [
        "cat /etc/needle-42.conf", "Needle found: 69999 items"]
    assert [h["session_id"] for h in store.search_sessions("needle", since="2026-01-02T00:00:00Z")] == ["s-2"]
    assert len(store.search_sessions("e", limit=3)) == 3
    store.mark_payload_removed("s-1", AT)  # output text goes, commands and paths stay searchable
    assert [h["text"] for h in store.search_sessions("needle", device="ct-01")] == ["cat /etc/needle-42.conf"]
    kinds = store.session_kinds(["s-1", "s-2"])
    assert kinds["s-1"] == {"commands": 1, "sources": "line", "first": "cat /etc/needle-42.conf"}


ODD = ["naïve café ☕ 😀", "quote \" and 'single' and back\\slash", '["looks", {"like": "json"}]', "tab\tcr\rlf\n",
       "\x1b[31mred\x1b[0m", "line\u2028sep", "a stray\x00NUL", "", " " * 300]


def test_the_index_rows_come_back_as_written_on_both_stores(store: Store) -> None:
    """save_session_text writes each table in one statement (a JSON array on SQLite, arrays on PostgreSQL): every
    field comes back as given, offsets exactly, in order; a NUL in text is stored as U+FFFD (PostgreSQL's text
    cannot hold one, so such a session failed to index there before)."""
    store.insert_session({"id": "s-odd", "user_name": "alice", "device": "ct-01", "grant_id": 1, "started_at": AT,
                          "status": "ok", "recording": "s-odd.rec"})
    commands = [(i * 0.1 + 1 / 3, i % 3, "exec" if i % 2 else "line", text) for i, text in enumerate(ODD)]
    texts = [(float(i), "output", text) for i, text in enumerate(ODD)] + [(99, "path", "/data/x.dcm")]
    store.save_session_text("s-odd", commands, texts, AT)
    want = [(o, ch, src, c.replace("\0", "\ufffd")) for o, ch, src, c in commands]
    got = [(r["offset"], r["channel"], r["source"], r["command"]) for r in store.session_commands("s-odd")]
    assert got == want
    stored = store.query('SELECT "offset", kind, text FROM search_text WHERE session_id = ? ORDER BY "offset"',
                         ("s-odd",))
    assert [(r["offset"], r["kind"], r["text"]) for r in stored] == [
        (float(o), k, t.replace("\0", "\ufffd")) for o, k, t in texts]
    assert [h["text"] for h in store.search_sessions("café ☕")] == ["naïve café ☕ 😀"]
    assert store.get_session("s-odd")["indexed_at"] == AT
    # saved again (a re-index): replaced, not doubled
    store.save_session_text("s-odd", commands[:2], texts[:1], AT)
    assert len(store.session_commands("s-odd")) == 2
    assert store.query("SELECT count(*) AS n FROM search_text WHERE session_id = ?", ("s-odd",))[0]["n"] == 1


def test_a_malformed_index_row_changes_nothing_on_both_stores(store: Store) -> None:
    _index(store)
    before = [dict(r) for r in store.session_commands("s-1")]
    with pytest.raises(ValueError, match="3 fields, not 4"):
        store.save_session_text("s-1", [(1.0, 0, "line")], [(1.0, "output", "new")], AT)
    assert [dict(r) for r in store.session_commands("s-1")] == before  # the DELETE before it was rolled back
    assert [h["text"] for h in store.search_sessions("69999")] == ["Needle found: 69999 items"]


# ---------------------------------------------------------------- web links (both stores)


def _web_config(tmp_path: Path) -> BrokerConfig:
    return BrokerConfig(home=tmp_path, web=WebConfig(address="127.0.0.1:8080"))


def test_a_signin_link_works_once_on_both_stores(store: Store, tmp_path: Path) -> None:
    clock = FakeClock()
    populate(store, clock)
    link = issue_signin_link(store, AuditLog(store, clock), _web_config(tmp_path), "alice", clock.now())
    token = link.url.rsplit("/", 1)[1]
    assert redeem_signin_link(store, token, clock.now(), "10.0.0.1")["user_name"] == "alice"
    with pytest.raises(GrantExpiredError, match="already used"):
        redeem_signin_link(store, token, clock.now(), "10.0.0.2")
    assert store.get_web_token(link_hash(token))["used_from"] == "10.0.0.1"


def link_hash(token: str) -> str:
    from broker.access_links import token_hash

    return token_hash(token)


# ---------------------------------------------------------------- concurrency (PostgreSQL, several processes)


def test_parallel_writers_keep_one_linear_audit_chain(pg: Store, pg_url: str) -> None:
    results = run_parallel("audit", pg_url, [(f"w{i}", 40) for i in range(4)])
    assert results == [("ok", 40)] * 4
    chain = verify_chain(pg)
    assert chain.ok, chain.problems
    rows = pg.audit_rows()
    assert [r["id"] for r in rows] == list(range(1, 161))
    assert sorted({r["user_name"] for r in rows}) == ["w0", "w1", "w2", "w3"]


def _request(store: Store, clock: FakeClock, device: str) -> int:
    return request_grant(store, AuditLog(store, clock), RULES, get_principal(store, "alice"), device, 3600,
                         "replace the tube", clock.now()).id


def test_two_approvers_of_a_critical_request_at_once_make_one_grant(pg: Store, pg_url: str) -> None:
    clock = FakeClock()
    populate(pg, clock)
    rid = _request(pg, clock, "mri-01")
    # each approver pauses between recording their approval and counting them: without the request's row lock
    # both would count only their own and leave the request pending for good
    results = run_parallel("approve", pg_url, [(rid, "bob", clock.now()), (rid, "carol", clock.now())],
                           hold=("approvals", 1.0, False))
    assert all(r[0] == "ok" for r in results), results
    assert sorted(r[1] is not None for r in results) == [False, True]  # the second to count makes the grant
    assert sorted(a["approver"] for a in pg.approvals(rid)) == ["bob", "carol"]
    assert len(pg.list_grants()) == 1 and pg.get_request(rid)["status"] == "approved"
    assert [r["event"] for r in pg.audit_rows(event="grant.created")] == ["grant.created"]
    assert verify_chain(pg).ok


def test_two_approvers_of_a_standard_request_at_once_one_wins(pg: Store, pg_url: str) -> None:
    clock = FakeClock()
    populate(pg, clock)
    rid = _request(pg, clock, "ct-01")
    results = run_parallel("approve", pg_url, [(rid, "bob", clock.now()), (rid, "carol", clock.now())])
    assert sorted(r[0] for r in results) == ["error", "ok"], results
    assert [r[1] for r in results if r[0] == "error"] == ["ConflictError"]
    assert len(pg.list_grants()) == 1 and len(pg.approvals(rid)) == 1
    assert len(pg.audit_rows(event="request.refused")) == 1


def test_parallel_failures_are_all_counted_and_start_one_lockout(pg: Store, pg_url: str) -> None:
    clock = FakeClock()
    # each pauses after adding its failure, before counting again: without the pair's lock none would see the
    # others' uncommitted failures and none would start the lockout (or several would)
    results = run_parallel("failure", pg_url, [("alice", "10.0.0.9", clock.now())] * 6,
                           hold=("add_auth_failure", 0.3, True))
    assert all(r[0] == "ok" for r in results), results
    assert pg.count_auth_failures("alice", "10.0.0.9", "2000-01-01") == 6
    started = [r[1] for r in results if r[1]]
    assert started == [900]  # exactly one of them started the lockout (audited once as auth.lockout)


def test_a_one_time_link_redeemed_by_two_at_once_works_once(pg: Store, pg_url: str, tmp_path: Path) -> None:
    clock = FakeClock()
    populate(pg, clock)
    link = issue_signin_link(pg, AuditLog(pg, clock), _web_config(tmp_path), "alice", clock.now())
    token = link.url.rsplit("/", 1)[1]
    results = run_parallel("redeem", pg_url, [(token, clock.now())] * 4)
    assert sorted(r[0] for r in results) == ["error", "error", "error", "ok"], results
    assert {r[1] for r in results if r[0] == "error"} == {"GrantExpiredError"}


def test_nodes_expiring_requests_at_once_expire_each_once(pg: Store, pg_url: str) -> None:
    clock = FakeClock()
    populate(pg, clock)
    rids = [_request(pg, clock, "ct-01") for _ in range(12)]
    later = clock.now() + timedelta(days=2)
    results = run_parallel("expire", pg_url, [later] * 3)
    assert all(r[0] == "ok" for r in results), results
    expired = [rid for r in results for rid in r[1]]
    assert sorted(expired) == rids  # each by exactly one node
    assert sorted(r["request_id"] for r in pg.audit_rows(event="request.expired")) == rids
    assert verify_chain(pg).ok


# ---------------------------------------------------------------- medbroker migrate

runner = CliRunner()


def _sqlite_home(tmp_path: Path) -> Path:
    """A real home on SQLite with users, requests, a grant, audit rows, a checkpoint and search text."""
    home = tmp_path / "home"
    assert runner.invoke(cli_app, ["--home", str(home), "init"]).exit_code == 0
    from broker.app import open_app
    from broker.grants import approve_request

    app = open_app(home)
    try:
        clock = FakeClock()
        populate(app.store, clock)
        rid = _request(app.store, clock, "ct-01")
        approve_request(app.store, app.audit, RULES, rid, get_principal(app.store, "bob"), clock.now())
        _request(app.store, clock, "ct-01")
        _index(app.store)
        app.store.add_auth_failure("alice", "10.0.0.1", AT)
        from broker.audit import write_checkpoint

        assert write_checkpoint(app.audit, app.signing_key)  # a signed checkpoint travels with the chain
        app.audit.record("broker.started")
    finally:
        app.close()
    return home


def test_migrate_copies_everything_keeps_the_chain_and_verifies(tmp_path: Path, postgres: Any) -> None:
    home = _sqlite_home(tmp_path)
    url = postgres.new_database(migrated=False)
    try:
        done = runner.invoke(cli_app, ["migrate", "--from", f"sqlite:{home}", "--to", url, "--json"])
        assert done.exit_code == 0, done.output
        doc = json.loads(done.stdout)
        lite = open_store(home / "medbroker.db")
        target = open_store(url)
        try:
            assert doc["ok"] and doc["audit"]["ok"] and doc["audit"]["same_as_source"]
            assert table_counts(target) == table_counts(lite) == {t: n for t, n in doc["tables"].items()}
            assert doc["tables"]["audit_events"] == len(lite.audit_rows()) >= 4
            for table in lite.conn.tables():
                if table not in NOT_COPIED:
                    order = "ORDER BY 1, 2"
                    assert lite.query(f'SELECT * FROM "{table}" {order}') == target.query(
                        f'SELECT * FROM "{table}" {order}'), table
            # ids continue after the copied ones, and the chain grows on
            clock = FakeClock()
            rid = _request(target, clock, "ct-01")
            assert rid == max(r["id"] for r in lite.list_requests()) + 1
            assert verify_chain(target).ok
        finally:
            lite.close()
            target.close()
        # a second run refuses the filled target (exit 1, nothing changed) unless told to overwrite it
        again = runner.invoke(cli_app, ["migrate", "--from", f"sqlite:{home}", "--to", url])
        assert again.exit_code == 1 and "already holds data" in again.output and "--overwrite" in again.output
        forced = runner.invoke(cli_app, ["migrate", "--from", f"sqlite:{home}", "--to", url, "--overwrite"])
        assert forced.exit_code == 0, forced.output
        assert "same as the source" in forced.output and "[store] url" in forced.output
        # the home, pointed at the copy, verifies its chain and signed checkpoint with its own key
        (home / "broker.toml").write_text(f'[store]\nurl = "{url}"\n')
        # (the sessions _index made up have no recordings: only the audit half of the answer is looked at)
        verify = json.loads(runner.invoke(cli_app, ["--home", str(home), "audit", "verify", "--json"]).stdout)
        assert verify["audit"] == {"ok": True, "rows": doc["audit"]["rows"], "problems": [],
                                   "last_hash": doc["audit"]["last_hash"]}
        # a copy altered afterwards is caught by the same verification
        tampered = open_store(url, migrate=False)
        tampered.conn.execute("UPDATE audit_events SET actor = 'mallory' WHERE id = 2")
        tampered.close()
        broken = json.loads(runner.invoke(cli_app, ["--home", str(home), "audit", "verify", "--json"]).stdout)
        assert not broken["audit"]["ok"] and any(p.startswith("audit row 2:") for p in broken["audit"]["problems"])
    finally:
        postgres.drop(url)


@pytest.mark.parametrize("args,needle", [
    (["--from", "/var/lib/x", "--to", "postgresql://a@/b?host=/tmp"], "expected sqlite:PATH"),
    (["--from", "sqlite:/no/such/home", "--to", "postgresql://a@/b?host=/tmp"], "is not a file"),
])
def test_migrate_usage_errors_exit_2(args: list[str], needle: str) -> None:
    done = runner.invoke(cli_app, ["migrate", *args])
    assert done.exit_code == 2 and needle in done.output


def test_migrate_never_prints_the_password(tmp_path: Path) -> None:
    home = _sqlite_home(tmp_path)
    done = runner.invoke(cli_app, ["migrate", "--from", f"sqlite:{home}", "--to",
                                   f"postgresql://mb:hunter2@/medbroker?host={tmp_path}&port=1&connect_timeout=2"])
    assert done.exit_code == 1 and "hunter2" not in done.output and "<secret>" in done.output




# ---------------------------------------------------------------- retries and lost connections


def test_a_serialization_failure_is_retried_then_reported(pg: Store) -> None:
    import psycopg

    attempts: list[int] = []

    def once_aborted(conn: Any) -> int:
        attempts.append(1)
        conn.execute("INSERT INTO web_state (key, value) VALUES (?, ?)", (f"k{len(attempts)}", "v"))
        if len(attempts) == 1:  # PostgreSQL itself aborts the first attempt (SQLSTATE 40001)
            conn.execute("DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = 'serialization_failure'; END $$")
        return len(attempts)

    assert pg.atomic(once_aborted) == 2
    assert [r["key"] for r in pg.query("SELECT key FROM web_state ORDER BY key")] == ["k2"]  # the first rolled back

    def always_aborted(conn: Any) -> None:
        attempts.append(1)
        conn.execute("DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = 'serialization_failure'; END $$")

    attempts.clear()
    with pytest.raises(psycopg.errors.SerializationFailure):
        pg.atomic(always_aborted)
    assert len(attempts) == 6  # the first try and five retries, then the error


def test_a_lost_connection_fails_one_statement_then_reconnects(pg: Store, postgres: Any) -> None:
    from broker.errors import StorageError

    pg.insert_user("alice", "vendor", None, AT)
    pid = pg.scalar("SELECT pg_backend_pid()")
    with postgres.admin() as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    with pytest.raises(StorageError) as info:
        pg.get_user("alice")
    assert "PostgreSQL at postgresql://medbroker@/" in info.value.message and info.value.hint
    assert pg.get_user("alice")["role"] == "vendor"  # the next statement has a new connection
    assert pg.scalar("SELECT pg_backend_pid()") != pid


# ---------------------------------------------------------------- lockout (both stores)


def test_lockout_counts_and_starts_once_on_both_stores(store: Store) -> None:
    from broker.lockout import LockoutPolicy, clear_failures, lockout_left, record_failure

    policy = LockoutPolicy(max_failures=3, window_s=300, lockout_s=900)
    clock = FakeClock()
    started = [record_failure(store, "alice", "10.0.0.9", clock.now(), policy) for _ in range(4)]
    assert started == [0, 0, 900, 0]  # the third starts it; a fourth inside it does not start another
    assert lockout_left(store, "alice", "10.0.0.9", clock.now(), policy) == 900
    assert lockout_left(store, "alice", "10.0.0.8", clock.now(), policy) == 0  # another source is not locked
    clock.advance(901)
    assert lockout_left(store, "alice", "10.0.0.9", clock.now(), policy) == 0
    clear_failures(store, "alice", "10.0.0.9")
    assert store.count_auth_failures("alice", "10.0.0.9", "2000-01-01") == 0


# ---------------------------------------------------------------- live sessions that must end (both stores)


def test_sessions_to_stop_names_why_on_both_stores(store: Store) -> None:
    clock = FakeClock()
    populate(store, clock)
    store.add_user_key("alice", "SHA256:k", "ssh-ed25519 AAAA", AT)
    rid = _request(store, clock, "ct-01")
    gid = store.decide_request(rid, "approved", "bob", AT, None, {
        "request_id": rid, "user_name": "alice", "device": "ct-01", "starts_at": AT,
        "ends_at": "2026-01-01T09:00:00.000000Z", "approved_by": "bob"})
    base = {"user_name": "alice", "device": "ct-01", "grant_id": gid, "started_at": AT, "status": "live",
            "recording": "r", "broker_pid": 4242, "auth_key": "SHA256:k", "user_role": "vendor"}
    store.insert_session({"id": "s-ok", **base})
    store.insert_session({"id": "s-other-process", **base, "broker_pid": 1})
    assert store.sessions_to_stop(4242, AT) == []
    store.set_user_role("alice", "approver")  # the role it was authorised with changed
    [row] = store.sessions_to_stop(4242, AT)
    assert row["id"] == "s-ok" and row["role_now"] == "approver" and not row["key_gone"]
    store.set_user_role("alice", "vendor")
    store.delete_user_key("alice", "SHA256:k")
    [row] = store.sessions_to_stop(4242, AT)
    assert row["key_gone"] and not row["user_disabled"] and not row["device_gone"]
    store.add_user_key("alice", "SHA256:k", "ssh-ed25519 AAAA", AT)
    store.set_user_disabled("alice", True)
    assert store.sessions_to_stop(4242, AT)[0]["user_disabled"]
    store.set_user_disabled("alice", False)
    assert store.request_session_kill("s-ok", "sec", "enough", AT)
    assert not store.request_session_kill("s-ok", "sec", "again", AT)
    assert [r["kill_reason"] for r in store.sessions_to_stop(4242, AT)] == ["enough"]


def test_a_node_stuck_holding_the_audit_head_makes_others_fail_in_bounded_time(pg_url: str, postgres: Any) -> None:
    """Another session holds the audit head (a node frozen mid-append): an append waits lock_timeout, then fails
    with a clear error instead of hanging; the default is 30 s, the URL may set it (here 300 ms)."""
    from broker.errors import StorageError

    default = open_store(pg_url, migrate=False)
    assert default.scalar("SHOW lock_timeout") == "30s"
    assert default.scalar("SHOW idle_in_transaction_session_timeout") == "1min"
    default.close()
    store = open_store(pg_url + "&options=-c%20lock_timeout%3D300ms", migrate=False)
    holder = open_store(pg_url, migrate=False)
    try:
        with holder.transaction() as conn:
            conn.execute("SELECT id FROM audit_head WHERE id = 1 FOR UPDATE")
            import time

            started = time.monotonic()
            with pytest.raises(StorageError) as info:
                AuditLog(store, FakeClock()).record("broker.started")
            assert 0.25 < time.monotonic() - started < 5
            assert "lock timeout" in info.value.message and info.value.hint
        assert AuditLog(store, FakeClock()).record("broker.started")["id"] == 1  # released: it works again
        assert verify_chain(store).ok
    finally:
        holder.close()
        store.close()


# ---------------------------------------------------------------- LISTEN/NOTIFY: writes that end sessions


def test_writes_that_end_sessions_notify_the_nodes_and_other_writes_do_not(pg: Store, pg_url: str) -> None:
    """Each write that can end a live session sends NOTIFY on the channel every node listens on (delivered at
    its commit); a write that changed nothing, or one that ends nothing, sends none."""
    import psycopg

    from broker.grants import approve_request
    from broker.store.notify import STOP_CHANNEL

    clock = FakeClock()
    populate(pg, clock)
    pg.add_user_key("alice", "SHA256:one", "ssh-ed25519 AAAA1", "2026-01-01T00:00:00.000000Z")
    pg.add_user_key("alice", "SHA256:two", "ssh-ed25519 AAAA2", "2026-01-01T00:00:00.000000Z")
    grant = approve_request(pg, AuditLog(pg, clock), RULES, _request(pg, clock, "ct-01"),
                            get_principal(pg, "bob"), clock.now()).grant
    pg.insert_session({"id": "s-1", "user_name": "alice", "device": "ct-01", "grant_id": grant.id,
                       "started_at": "2026-01-01T00:00:00.000000Z", "status": "live", "recording": "s-1.mbr",
                       "broker_pid": 1, "node_id": "a"})
    listener = psycopg.connect(pg_url, autocommit=True, connect_timeout=10)
    try:
        listener.execute(f"LISTEN {STOP_CHANNEL}")

        def notified() -> int:
            return sum(1 for n in listener.notifies(timeout=0.3) if n.channel == STOP_CHANNEL)

        now = "2026-01-01T00:01:00.000000Z"
        writes = [
            ("kill", lambda: pg.request_session_kill("s-1", "bob", "why", now), 1),
            ("kill again (no change)", lambda: pg.request_session_kill("s-1", "bob", "why", now), 0),
            ("revoke", lambda: pg.revoke_grant(grant.id, "bob", now, "why"), 1),
            ("revoke again (no change)", lambda: pg.revoke_grant(grant.id, "bob", now, "why"), 0),
            ("disable", lambda: pg.set_user_disabled("alice", True), 1),
            ("role", lambda: pg.set_user_role("alice", "approver"), 1),
            ("key removed", lambda: pg.delete_user_key("alice", "SHA256:one"), 1),
            ("keys replaced, none removed", lambda: pg.replace_user_keys(
                "alice", [("SHA256:two", "ssh-ed25519 AAAA2"), ("SHA256:new", "ssh-ed25519 AAAA3")], now), 0),
            ("keys replaced, one removed", lambda: pg.replace_user_keys(
                "alice", [("SHA256:new", "ssh-ed25519 AAAA3")], now), 1),
            ("device removed", lambda: pg.delete_device("mri-01"), 1),
            ("company (ends nothing)", lambda: pg.set_user_company("alice", "Acme"), 0),
        ]
        seen = {}
        for name, write, _ in writes:
            write()
            seen[name] = notified()
        assert seen == {name: n for name, _, n in writes}
        # a NOTIFY inside a transaction that rolls back is never delivered
        with pytest.raises(RuntimeError):
            with pg.transaction() as conn:
                pg.notify_ending(conn)
                raise RuntimeError("rolled back")
        assert notified() == 0
    finally:
        listener.close()
