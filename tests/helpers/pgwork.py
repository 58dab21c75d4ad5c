"""Work for the PostgreSQL concurrency tests, run in separate processes: each opens its own store connection,
waits at a barrier with the others, then does one thing at the same moment as them.

The processes are forked (a "spawn" start would leave multiprocessing's resource tracker running after the
test): a child only opens connections of its own and leaves through os._exit, never touching the parent's.

Results come back as plain tuples: ("ok", value) or ("error", exception class name, message).

``hold`` widens a race window the way a slow node would: the store method named is made to pause (before or
after its work) inside the decision's transaction, so without the decision's lock the racers would surely
overlap; with it they take turns. This instruments medbroker's own store, never PostgreSQL.
"""

from __future__ import annotations

import multiprocessing
from typing import Any

__all__ = ["run_parallel"]


def _principal(store: Any, name: str) -> Any:
    from broker.identity import get_principal

    return get_principal(store, name)


def _hold(store: Any, method: str, seconds: float, *, after: bool) -> None:
    import time

    real = getattr(store, method)

    def slow(*args: Any, **kwargs: Any) -> Any:
        if not after:
            time.sleep(seconds)
        result = real(*args, **kwargs)
        if after:
            time.sleep(seconds)
        return result

    setattr(store, method, slow)


def _work(kind: str, url: str, arg: Any, barrier: Any, out: Any, hold: tuple | None) -> None:
    from broker.audit import AuditLog
    from broker.clock import FakeClock
    from broker.store import open_store

    store = open_store(url, migrate=kind == "migrate")
    try:
        clock = FakeClock()
        log = AuditLog(store, clock)
        if hold:
            _hold(store, hold[0], hold[1], after=hold[2])
        barrier.wait(30)
        try:
            value: Any = None
            if kind == "migrate":
                value = store.schema_version()
            elif kind == "audit":
                who, n = arg
                for i in range(n):
                    log.record("auth.failure", user=who, n=i)
                value = n
            elif kind == "approve":
                from broker.grants import GrantRules, approve_request

                rid, approver, now = arg
                rules = GrantRules(max_duration_s=8 * 3600, request_ttl_s=24 * 3600, critical_approvers=2)
                d = approve_request(store, log, rules, rid, _principal(store, approver), now)
                value = d.grant.id if d.grant else None
            elif kind == "failure":
                from broker.lockout import LockoutPolicy, record_failure

                user, source, now = arg
                value = record_failure(store, user, source, now, LockoutPolicy(max_failures=3, window_s=300,
                                                                                lockout_s=900))
            elif kind == "redeem":
                from broker.access_links import redeem_signin_link

                token, now = arg
                value = redeem_signin_link(store, token, now, "10.0.0.9")["user_name"]
            elif kind == "expire":
                from broker.grants import expire_requests

                value = expire_requests(store, log, arg)
            else:
                raise ValueError(kind)
            out.put(("ok", value))
        except Exception as exc:  # noqa: BLE001 - reported to the test
            out.put(("error", type(exc).__name__, str(exc)))
    finally:
        store.close()


def run_parallel(kind: str, url: str, args: list[Any], *, timeout: float = 60,
                 hold: tuple[str, float, bool] | None = None) -> list[tuple]:
    """Run ``kind`` once per item of ``args``, each in its own process, all released together.

    :param hold: (store method, seconds, after?) to slow down in every process (see the module doc)
    """
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(len(args))
    out = ctx.Queue()
    procs = [ctx.Process(target=_work, args=(kind, url, a, barrier, out, hold)) for a in args]
    for p in procs:
        p.start()
    results = []
    try:
        for _ in procs:
            results.append(out.get(timeout=timeout))
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)
    return results

