"""Keepalives without a timer per read: a pinned asyncssh hook.

asyncssh re-arms its keepalive timer on every read from the socket (``_recv_data`` cancels the timer and calls
``loop.call_later`` again). With ``keepalive_interval`` set on both sides of the broker that is two timer
replacements per keystroke round trip, ~2.6 µs each under uvloop (measured, docs/performance.md), for a timer
that fires at most once per interval.

The hook keeps asyncssh's behaviour and drops the churn: a read only notes the time; when the timer fires and
data arrived since it was armed, it is armed again for what is left of the interval from that read, so the
first keepalive still goes out ``keepalive_interval`` after the last data received, and
``keepalive_count_max`` unanswered keepalives still end the connection (tests/test_keepalive.py, both
sides, against stock clients and a real sshd). ``set_keepalive()`` with a new interval re-arms at once, as
before. Private names are touched, so the asyncssh range is pinned in pyproject.toml; when they changed,
nothing is installed and asyncssh's own timers run (slower, same behaviour).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

from asyncssh import connection as _connection

__all__ = ["install_keepalive_hook", "keepalive_hook_active"]

log = logging.getLogger("medbroker.keepalive")

_METHODS = ("_reset_keepalive_timer", "_set_keepalive_timer", "_cancel_keepalive_timer", "_keepalive_timer_callback")
_active = False


def _private_api_problem() -> str | None:
    """What changed in asyncssh's private names the hook relies on, or None."""
    cls = _connection.SSHConnection
    for name in _METHODS:
        if not callable(getattr(cls, name, None)):
            return f"SSHConnection.{name} is gone"
    if not cls.__dictoffset__:
        return "SSHConnection instances have no __dict__"
    try:
        init, recv = inspect.getsource(cls.__init__), inspect.getsource(cls._recv_data)
    except (OSError, TypeError):  # installed without sources: tests/test_keepalive.py pins the behaviour
        return None
    for name in ("self._keepalive_timer", "self._keepalive_interval", "self._auth_complete", "self._loop"):
        if name not in init:
            return f"SSHConnection.{name[5:]} is gone"
    if "self._reset_keepalive_timer()" not in recv:
        return "SSHConnection._recv_data no longer resets the keepalive timer"
    return None


def install_keepalive_hook() -> bool:
    """Install once per process (idempotent); False when asyncssh's private names changed (nothing installed)."""
    global _active
    if _active:
        return True
    problem = _private_api_problem()
    if problem is not None:
        log.warning("keepalive timers stay per read: asyncssh changed (%s)", problem)
        return False
    cls: Any = _connection.SSHConnection
    set_timer, fired = cls._set_keepalive_timer, cls._keepalive_timer_callback

    def _set_keepalive_timer(self: Any) -> None:
        set_timer(self)
        self._medbroker_ka_armed = (self._loop.time(), self._keepalive_interval)

    def _reset_keepalive_timer(self: Any) -> None:
        if not self._auth_complete:
            return
        self._medbroker_ka_rx = now = self._loop.time()
        armed = getattr(self, "_medbroker_ka_armed", None)
        if self._keepalive_timer is None or armed is None or armed[1] != self._keepalive_interval:
            self._cancel_keepalive_timer()  # none yet, or a new interval (set_keepalive): as asyncssh does
            set_timer(self)
            self._medbroker_ka_armed = (now, self._keepalive_interval)

    def _keepalive_timer_callback(self: Any) -> None:
        rx = getattr(self, "_medbroker_ka_rx", None)
        armed = getattr(self, "_medbroker_ka_armed", None)
        if rx is not None and armed is not None and rx > armed[0] and self._keepalive_interval:
            rest = rx + self._keepalive_interval - self._loop.time()
            if rest > 0:  # data came after the timer was armed: the interval counts from the last read
                self._keepalive_timer = self._loop.call_later(rest, self._keepalive_timer_callback)
                self._medbroker_ka_armed = (rx, self._keepalive_interval)
                return
        fired(self)

    cls._set_keepalive_timer = _set_keepalive_timer
    cls._reset_keepalive_timer = _reset_keepalive_timer
    cls._keepalive_timer_callback = _keepalive_timer_callback
    _active = True
    return True


def keepalive_hook_active() -> bool:
    """Whether reads in this process re-arm keepalive timers lazily."""
    return _active
