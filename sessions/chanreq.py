"""Session-channel requests the broker refuses, made visible: agent forwarding (``ssh -A``) and X11 (``ssh -X``).

asyncssh answers ``auth-agent-req@openssh.com`` and ``x11-req`` itself when ``agent_forwarding`` and
``x11_forwarding`` are off, without telling the server: OpenSSH sends the agent request without asking for
a reply, so the vendor saw nothing, and for X11 only "X11 forwarding request failed on channel 0". There is
no public callback for these two requests, so :func:`watch_refused_requests` gives one channel a subclass
whose two request handlers report the request and refuse it, exactly as asyncssh would (failure reply, no
listener, no forwarding). Everything else about the channel is asyncssh's own.
"""

from __future__ import annotations

from typing import Callable, cast

import asyncssh

__all__ = ["watch_refused_requests", "AGENT", "X11"]

AGENT = "auth-agent"
X11 = "x11"


class _WatchedChannel(asyncssh.SSHServerChannel):
    """An :class:`asyncssh.SSHServerChannel` that reports agent and X11 requests before refusing them."""

    _medbroker_on_refused: Callable[[asyncssh.SSHServerChannel, str], None]

    # asyncssh dispatches channel requests to _process_<name>_request; returning False sends the failure reply.
    # the base's handler is typed "-> None" but asyncssh's dispatcher reads a False result as the failure reply
    def _process_auth_agent_req_at_openssh_dot_com_request(self, packet) -> bool:  # type: ignore[override]
        packet.check_end()
        self._medbroker_on_refused(self, AGENT)
        return False

    def _process_x11_req_request(self, packet) -> bool:
        packet.get_boolean()  # single connection
        packet.get_string()  # auth protocol
        packet.get_string()  # auth cookie
        packet.get_uint32()  # screen
        packet.check_end()
        self._medbroker_on_refused(self, X11)
        return False


def watch_refused_requests(chan: asyncssh.SSHServerChannel,
                           on_refused: Callable[[asyncssh.SSHServerChannel, str], None]) -> asyncssh.SSHServerChannel:
    """Make ``chan`` (fresh from ``conn.create_server_channel()``) call ``on_refused(chan, AGENT|X11)`` when
    the client asks for agent or X11 forwarding; the request is still refused. Returns ``chan``."""
    if type(chan) is not asyncssh.SSHServerChannel:  # only the plain class: never stack on another subclass
        raise TypeError(f"expected an asyncssh.SSHServerChannel, got {type(chan).__name__}")
    chan.__class__ = _WatchedChannel
    cast(_WatchedChannel, chan)._medbroker_on_refused = on_refused
    return chan
