"""Log lines that name their session and channel, like asyncssh's ``SSHLogger`` (``[conn=0, chan=1] ...``).

``session_log(logger, "s-1a2b")`` gives a :class:`logging.LoggerAdapter` whose lines read
``[session=s-1a2b] message``; ``.channel(3)`` of it gives ``[session=s-1a2b channel=3] message``. The values
are also set on each record (``session_id``, ``channel``) for handlers that format or filter on them.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, MutableMapping

__all__ = ["SessionLog", "session_log"]


class SessionLog(logging.LoggerAdapter):
    """A logger adapter for one session (and optionally one channel of it)."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        extra: Mapping[str, object] = self.extra or {}  # always given: session_log() builds it
        kwargs["extra"] = {**extra, **(kwargs.get("extra") or {})}
        context = f"session={extra['session_id']}"
        if extra.get("channel") is not None:
            context += f" channel={extra['channel']}"
        return f"[{context}] {msg}", kwargs

    def channel(self, number: int) -> "SessionLog":
        """The same session's logger for channel ``number``."""
        return SessionLog(self.logger, {**(self.extra or {}), "channel": number})

    def named(self, logger: logging.Logger | str) -> "SessionLog":
        """The same context on another logger (``"medbroker.scp"`` for the scp code of this channel)."""
        return SessionLog(logging.getLogger(logger) if isinstance(logger, str) else logger, dict(self.extra or {}))


def session_log(logger: logging.Logger, session_id: str, channel: int | None = None) -> SessionLog:
    """An adapter of ``logger`` whose lines start ``[session=ID]`` (``[session=ID channel=N]``)."""
    return SessionLog(logger, {"session_id": session_id, "channel": channel})
