"""Audit append rate of the store (events/s): SQLite (the home's file, WAL) and PostgreSQL 15 (a throwaway
cluster on a unix socket, fsync and synchronous commit ON as in production), one writer and N processes.

    python3 bench/store_append.py [--events 2000] [--procs 4]

Every append is one transaction: read the chain's last row, hash, insert (PostgreSQL: under the audit_head row
lock); the chain is verified afterwards.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests")]

from broker.audit import AuditLog, verify_chain  # noqa: E402
from broker.clock import SystemClock  # noqa: E402
from broker.store import open_store  # noqa: E402


def _writer(target: str, n: int, who: str, barrier: object) -> None:
    store = open_store(target, migrate=False)
    log = AuditLog(store, SystemClock())
    barrier.wait(60)  # type: ignore[attr-defined]
    for i in range(n):
        log.record("auth.failure", user=who, source="10.0.0.1", n=i)
    store.close()


def measure(target: str, events: int, procs: int) -> float:
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(procs + 1)
    workers = [ctx.Process(target=_writer, args=(target, events // procs, f"w{i}", barrier)) for i in range(procs)]
    for w in workers:
        w.start()
    barrier.wait(60)
    start = time.perf_counter()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - start
    store = open_store(target, migrate=False)
    chain = verify_chain(store)
    store.close()
    assert chain.ok and chain.rows == events - events % procs, chain
    return (events - events % procs) / elapsed


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=2000)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--no-fsync", action="store_true", help="PostgreSQL without fsync/synchronous commit (the tests')")
    args = ap.parse_args()
    from helpers.postgres import Postgres

    pg = Postgres(durable=not args.no_fsync)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for procs in (1, args.procs):
                lite = str(Path(tmp) / f"bench-{procs}.db")
                open_store(lite).close()
                url = pg.new_database()
                rate_lite = measure(lite, args.events, procs)
                rate_pg = measure(url, args.events, procs)
                print(f"{procs} writer(s): sqlite {rate_lite:8.0f} events/s   postgresql {rate_pg:8.0f} events/s")
    finally:
        pg.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
