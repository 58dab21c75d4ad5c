"""Wake-ups between nodes on PostgreSQL: ``LISTEN``/``NOTIFY`` on one channel (issue 13; docs/ha.md "Nodes").

A write that may end live sessions (a kill, a revoke, a user disabled, a login key or role changed, a device
removed: :meth:`broker.store.base.StoreBase.execute_ending`) sends ``NOTIFY`` on :data:`STOP_CHANNEL` in its
own transaction, so PostgreSQL delivers it at the commit. Each serving process keeps one listening connection
(:class:`StopListener`, a thread of its own with its own psycopg connection) and wakes its control loop, which
then asks the database which of its sessions must end, as its 0.25 s poll does. The poll stays: it covers a
notification lost while the listener reconnects (a restarted server, a terminated backend, a network cut).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

__all__ = ["STOP_CHANNEL", "StopListener"]

log = logging.getLogger("medbroker.store.notify")

STOP_CHANNEL = "medbroker_sessions_end"
RETRY_S = 0.5  # between attempts to reopen a lost listening connection
_WAIT_S = 0.5  # each wait for notifications; bounds how long stop() takes


class StopListener:
    """``LISTEN`` on :data:`STOP_CHANNEL` in a daemon thread; ``wake()`` runs (in that thread) for each notification
    and once after every reconnect (notifications sent while it was away are lost).

    ``on_reconnect(details)`` runs (in that thread) when a lost connection is back: ``down_s`` and ``error``
    (the error's first line, never the URL's password). ``backend_pid`` is the listening connection's backend
    (None while it is down); ``application_name`` names it in ``pg_stat_activity``.
    """

    def __init__(self, url: str, wake: Callable[[], object], *, name: str = "medbroker-listen",
                 on_reconnect: Callable[[dict[str, Any]], object] | None = None) -> None:
        self.url = url
        self.wake = wake
        self.application_name = name[:63]
        self.on_reconnect = on_reconnect
        self.backend_pid: int | None = None
        self.notified = 0  # notifications received (for tests and status)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="medbroker-listen", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        import psycopg

        lost_at: float | None = None
        error = ""
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=5,
                                     application_name=self.application_name) as conn:
                    conn.execute(f"LISTEN {STOP_CHANNEL}")
                    self.backend_pid = conn.info.backend_pid
                    if lost_at is not None:
                        down_s = round(time.monotonic() - lost_at, 2)
                        log.warning("listening connection to PostgreSQL is back after %.1fs (LISTEN %s)", down_s,
                                    STOP_CHANNEL)
                        if self.on_reconnect is not None:
                            self.on_reconnect({"down_s": down_s, "error": error})
                        self.wake()  # what was notified meanwhile is lost: look now
                        lost_at = None
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=_WAIT_S):
                            self.notified += 1
                            self.wake()
            except psycopg.Error as exc:
                self.backend_pid = None
                if lost_at is None:
                    lost_at = time.monotonic()
                    error = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                    log.warning("listening connection to PostgreSQL lost (%s); sessions are still ended by the "
                                "0.25 s poll; reconnecting", error)
                self._stop.wait(RETRY_S)
            except Exception:  # never let the thread die silently: the poll goes on, try again
                self.backend_pid = None
                log.exception("listener for %s failed", STOP_CHANNEL)
                if lost_at is None:
                    lost_at, error = time.monotonic(), "listener failed"
                self._stop.wait(RETRY_S)
        self.backend_pid = None
