"""The SFTP filter's second session on the device: realpath and content pre-reads (asyncssh client side)."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, cast

import asyncssh

from medcore.errors import PermissionDeniedError

__all__ = ["DeviceSftp", "NotRegularFileError"]


class NotRegularFileError(PermissionDeniedError):
    """The vendor asked to read something that is not a regular file (device node, FIFO, socket)."""


class DeviceSftp:
    """The filter's second SFTP session on the device: ``realpath`` and content pre-reads.

    :param start_client: ``await start_client()`` -> an ``asyncssh.SFTPClient`` (typically
        ``upstream_connection.start_sftp_client``); called once, on first use
    """

    def __init__(self, start_client: Callable[[], Awaitable[asyncssh.SFTPClient]]) -> None:
        self._start = start_client
        self._client: asyncssh.SFTPClient | None = None
        self._lock = asyncio.Lock()

    async def _sftp(self) -> asyncssh.SFTPClient:
        async with self._lock:
            if self._client is None:
                self._client = await self._start()
            return self._client

    async def realpath(self, path: bytes) -> bytes:
        """The device's canonical form of ``path``.

        :raises asyncssh.SFTPError: as the device answers
        """
        return await (await self._sftp()).realpath(path)

    async def head(self, path: bytes, size: int) -> bytes:
        """The first ``size`` bytes of a regular file (fewer if it is shorter).

        :raises NotRegularFileError: a directory, device node, FIFO or socket (reading a FIFO would
            steal its data; reading a disk device would copy every patient's data)
        :raises asyncssh.SFTPError: as the device answers
        """
        sftp = await self._sftp()
        attrs = await sftp.stat(path)
        if attrs.permissions is None or attrs.type != asyncssh.FILEXFER_TYPE_REGULAR:
            raise NotRegularFileError("it is not a regular file, and medbroker only transfers regular files")
        async with sftp.open(path, "rb") as f:
            out = b""
            while len(out) < size:
                chunk = cast(bytes, await f.read(size - len(out), len(out)))  # opened "rb": bytes
                if not chunk:
                    break
                out += chunk
            return out

    async def remove(self, path: str) -> None:
        """Delete a file on the device (an upload medbroker refused after its bytes were written).

        :raises asyncssh.SFTPError: as the device answers
        """
        await (await self._sftp()).remove(path.encode("utf-8", "surrogateescape"))

    def close(self) -> None:
        """End the second session."""
        if self._client is not None:
            self._client.exit()

    async def wait_closed(self) -> None:
        if self._client is not None:
            await self._client.wait_closed()
