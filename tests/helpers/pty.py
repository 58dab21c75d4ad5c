"""Drive an interactive program (usually `ssh -tt`) through a real pseudo-terminal, with bounded waits."""

from __future__ import annotations

import fcntl
import os
import re
import select
import shutil
import struct
import subprocess
import tempfile
import termios
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from helpers import HelperTimeoutError, find_binary
from helpers.clients import KeyLike, client_environment, ssh_options
from helpers.procs import kill_tree

__all__ = ["PtySession", "live_pty_sessions"]

_READ_CHUNK = 65536
_LIVE: set[PtySession] = set()


def live_pty_sessions() -> list[PtySession]:
    """Return PtySessions that were started and not closed yet (for the leftover check)."""
    return list(_LIVE)


def _set_winsize(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class PtySession:
    """A program running on the slave side of a new pty, driven from the master side.

    argv: the program; cols/rows: initial window size; env: its environment (default: os.environ
    with TERM=xterm and without SSH_AUTH_SOCK). The program is a session leader whose controlling
    terminal is the pty (`setsid --ctty`), so resize() reaches it as SIGWINCH like a real terminal.
    Attributes: output (every byte read so far), pid.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        cols: int = 80,
        rows: int = 24,
        env: Mapping[str, str] | None = None,
        cleanup_dir: Path | None = None,
    ) -> None:
        setsid = find_binary("setsid")
        if setsid is None:
            raise FileNotFoundError("setsid (util-linux) is needed to give the pty a controlling process")
        if env is None:
            env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
            env["TERM"] = "xterm"
        master, slave = os.openpty()
        _set_winsize(slave, cols, rows)
        try:
            self._proc = subprocess.Popen(
                [setsid, "--ctty", *argv],
                stdin=slave,
                stdout=slave,
                stderr=slave,
                env=dict(env),
                close_fds=True,
            )
        except BaseException:
            os.close(master)
            os.close(slave)
            raise
        os.close(slave)  # only the child holds the slave now, so its exit gives EIO/EOF on the master
        self._master: int | None = master
        self._cleanup_dir = cleanup_dir
        self.output = bytearray()
        self._pos = 0  # expect() consumed output[:_pos]
        self._eof = False
        self.pid = self._proc.pid
        _LIVE.add(self)

    @classmethod
    def spawn_ssh(
        cls,
        user_string: str,
        host: str,
        port: int,
        key: KeyLike,
        command: str | None = None,
        *,
        cols: int = 80,
        rows: int = 24,
        known_hosts: Path | str | None = None,
        host_key_checking: str | None = None,
        extra_opts: Sequence[str] = (),
        connect_timeout: int = 10,
    ) -> PtySession:
        """Start `ssh -tt -p port user_string@host [command]` (hermetic options, see ssh_options) in a pty.

        known_hosts: pinned file (StrictHostKeyChecking=yes) or None for a throwaway one (accept-new).
        Password/TOTP prompts appear on the terminal; answer them with expect()/sendline().
        Expect the shell prompt before typing: keystrokes sent before ssh puts the local tty in raw mode
        are echoed twice (once by the local line discipline, once by the remote pty).
        """
        ssh = find_binary("ssh")
        if ssh is None:
            raise FileNotFoundError("ssh is not installed; run scripts/install.sh")
        scratch = Path(tempfile.mkdtemp(prefix="mbpty-"))
        try:
            kh, checking, env = client_environment(scratch, known_hosts, host_key_checking, None)
            argv = [
                ssh,
                *ssh_options(
                    key=key, known_hosts=kh, host_key_checking=checking, connect_timeout=connect_timeout, batch=False
                ),
            ]
            argv += ["-tt", "-p", str(port), *extra_opts, f"{user_string}@{host}"]
            if command is not None:
                argv.append(command)
            env["TERM"] = "xterm"
            return cls(argv, cols=cols, rows=rows, env=env, cleanup_dir=scratch)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise

    # ------------------------------------------------------------------ I/O
    def _read(self, timeout: float) -> bytes | None:
        """Read what arrives within `timeout` (b"" if nothing); None at EOF."""
        if self._eof or self._master is None:
            return None
        ready, _, _ = select.select([self._master], [], [], max(timeout, 0.0))
        if not ready:
            return b""
        try:
            data = os.read(self._master, _READ_CHUNK)
        except OSError:  # EIO: every slave fd is closed (the program exited)
            data = b""
        if not data:
            self._eof = True
            return None
        self.output += data
        return data

    def send(self, data: bytes | str) -> None:
        """Write bytes (str is UTF-8 encoded) to the terminal, as keystrokes (bounded: 10 s)."""
        if self._master is None:
            raise RuntimeError("PtySession is closed")
        payload = data.encode() if isinstance(data, str) else data
        while payload:
            _, writable, _ = select.select([], [self._master], [], 10)
            if not writable:
                raise HelperTimeoutError("pty did not accept input for 10 s")
            payload = payload[os.write(self._master, payload) :]

    def sendline(self, text: str) -> None:
        """Send text followed by carriage return (what the Enter key sends)."""
        self.send(text + "\r")

    def expect(self, pattern: bytes | re.Pattern[bytes], timeout: float = 10.0) -> bytes:
        """Wait until pattern (literal bytes or compiled bytes regex) appears in unconsumed output.

        Returns the output from the previous expect up to and including the match, and consumes it.
        Raises HelperTimeoutError (with the unconsumed output) after `timeout` seconds or at EOF.
        """
        regex = pattern if isinstance(pattern, re.Pattern) else re.compile(re.escape(pattern))
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.output, self._pos)
            if match is not None:
                chunk = bytes(self.output[self._pos : match.end()])
                self._pos = match.end()
                return chunk
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._eof:
                why = "EOF" if self._eof else f"{timeout}s"
                raise HelperTimeoutError(
                    f"{regex.pattern!r} not seen before {why}; unconsumed output: {bytes(self.output[self._pos :])!r}"
                )
            self._read(min(remaining, 0.5))

    def read_until_eof(self, timeout: float = 10.0) -> bytes:
        """Read until the program closes the terminal; return the unconsumed output (bounded)."""
        deadline = time.monotonic() + timeout
        while not self._eof:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HelperTimeoutError(f"no EOF within {timeout}s; output: {bytes(self.output[self._pos :])!r}")
            self._read(min(remaining, 0.5))
        chunk = bytes(self.output[self._pos :])
        self._pos = len(self.output)
        return chunk

    def resize(self, cols: int, rows: int) -> None:
        """Set the terminal size; the kernel sends SIGWINCH to the program (ssh forwards window-change)."""
        if self._master is None:
            raise RuntimeError("PtySession is closed")
        _set_winsize(self._master, cols, rows)

    # ------------------------------------------------------------------ lifecycle
    @property
    def returncode(self) -> int | None:
        """Return the exit code once the program has ended (negative: killed by that signal), else None."""
        return self._proc.poll()

    def wait(self, timeout: float = 10.0) -> int:
        """Drain output until the program exits and return its exit code (bounded by `timeout`).

        Raises HelperTimeoutError (after killing the program) if it is still running.
        """
        deadline = time.monotonic() + timeout
        while self._proc.poll() is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                tail = bytes(self.output[-2000:])
                self.close()
                raise HelperTimeoutError(
                    f"pty program {self.pid} still running after {timeout}s; output tail: {tail!r}"
                )
            if self._read(min(remaining, 0.05)) is None:  # EOF: it closed the terminal, so it is exiting
                try:
                    self._proc.wait(timeout=max(remaining, 0.01))
                except subprocess.TimeoutExpired:
                    pass
        for _ in range(1000):  # pick up bytes still buffered in the pty (bounded)
            if not self._read(0):
                break
        return self._proc.returncode

    def close(self) -> None:
        """Kill the program (whole tree) if it still runs, reap it and close the master fd. Idempotent."""
        if self._proc.poll() is None:
            kill_tree(self._proc.pid)
        self._proc.wait(timeout=10)
        if self._master is not None:
            os.close(self._master)
            self._master = None
        if self._cleanup_dir is not None:
            shutil.rmtree(self._cleanup_dir, ignore_errors=True)
            self._cleanup_dir = None
        _LIVE.discard(self)

    def __enter__(self) -> PtySession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
