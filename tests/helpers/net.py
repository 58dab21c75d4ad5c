"""Loopback ports for tests: free ports, a dead port, and a listener that accepts but never answers."""

from __future__ import annotations

import random
import selectors
import socket
import threading
import time

from helpers import HelperTimeoutError

__all__ = ["SilentListener", "closed_port", "free_port", "wait_for_port"]


_PORTS = random.Random()  # seeded from the OS: parallel runs and processes pick different ports


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on `host` a moment ago, below the kernel's ephemeral range.

    A port the kernel picks (bind to 0) comes from the ephemeral range, which every outgoing connection of the
    suite (ssh to the broker, the broker to its devices) also draws from: one of them could take it before
    the test's listener (``ssh -L``, a broker) binds it ("Address already in use"). Ports 20000-32767 are
    never handed out for outgoing connections, so only another listener can race for them.
    """
    low, high = 20000, 32767
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            high = min(high, int(f.read().split()[0]) - 1)
    except (OSError, ValueError, IndexError):
        pass
    for _ in range(200):
        port = _PORTS.randint(low, high)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # a crowded range: the kernel's pick
        sock.bind((host, 0))
        return sock.getsockname()[1]


def closed_port(host: str = "127.0.0.1") -> int:
    """Return a port with nothing listening: connecting to it is refused at once (a device that is down)."""
    return free_port(host)


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Block until a TCP connect to host:port succeeds; raise HelperTimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_error: OSError | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError as exc:
            last_error = exc
            time.sleep(0.02)
    raise HelperTimeoutError(f"{host}:{port} did not accept a connection within {timeout}s: {last_error}")


class SilentListener:
    """A TCP listener that accepts connections and then never says anything (a hung device).

    banner: if given, sent once after accept (e.g. b"SSH-2.0-Hung\\r\\n" stalls the client in key exchange
    instead of in the banner exchange). Connections stay open until close(). Use as a context manager.
    Attributes: host, port, accepted (number of connections accepted so far).
    """

    def __init__(self, host: str = "127.0.0.1", *, banner: bytes | None = None) -> None:
        self.host = host
        self.banner = banner
        self.accepted = 0
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, 0))
        self._listener.listen(64)
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"silent-listener-{self.port}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            while not self._stop.is_set():
                if not selector.select(timeout=0.05):
                    continue
                try:
                    conn, _ = self._listener.accept()
                except (BlockingIOError, OSError):
                    continue
                self._conns.append(conn)
                self.accepted += 1
                if self.banner:
                    try:
                        conn.sendall(self.banner)
                    except OSError:
                        pass

    def close(self) -> None:
        """Stop accepting, close every held connection and the listening socket (bounded: 5 s)."""
        self._stop.set()
        self._thread.join(timeout=5.0)
        for conn in self._conns:
            conn.close()
        self._conns.clear()
        self._listener.close()

    def __enter__(self) -> SilentListener:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
