"""sessions/tasks.py and sessions/sessionlog.py: a background task's exception is logged, never lost; a channel
task that fails says so, naming its session and channel."""

from __future__ import annotations

import asyncio
import logging

import asyncssh
import pytest

from sessions.relay import ChannelContext, RelaySession
from sessions.tasks import TaskSet

TIMEOUT = 15


def test_a_failing_task_is_logged_with_its_traceback_and_let_go(caplog: pytest.LogCaptureFixture) -> None:
    async def boom() -> None:
        await asyncio.sleep(0)
        raise RuntimeError("store gone")

    async def main() -> TaskSet:
        tasks = TaskSet(logging.getLogger("medbroker.test"))
        failing = tasks.spawn(boom(), "writing the summary")
        slow = tasks.spawn(asyncio.sleep(10), "waiting")
        assert len(tasks) == 2
        await asyncio.wait([failing])
        slow.cancel()
        await asyncio.wait([slow])
        await asyncio.sleep(0)  # done callbacks run
        return tasks

    with caplog.at_level(logging.ERROR, logger="medbroker.test"):
        tasks = asyncio.run(main())
    assert len(tasks) == 0  # ended tasks are not kept
    lines = [r for r in caplog.records if r.name == "medbroker.test"]
    assert [r.getMessage() for r in lines] == ["writing the summary failed: RuntimeError: store gone"]  # not the cancel
    assert lines[0].exc_info and "raise RuntimeError" in caplog.text


class _Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[int, str, dict]] = []

    def append_data(self, channel: int, kind: str, data: bytes) -> int:
        return len(data)

    def append_event(self, channel: int, kind: str, event: dict) -> int:
        self.events.append((channel, kind, event))
        return 1

    def expect_unit(self, size: int, key: object = None) -> None:
        pass


class _Relaying(asyncssh.SSHServer):
    def __init__(self, ctx: ChannelContext) -> None:
        self.ctx = ctx

    def begin_auth(self, username: str) -> bool:
        return False

    def session_requested(self) -> RelaySession:
        return RelaySession(self.ctx)


def test_a_channel_task_that_fails_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    """The exec judge refuses a command and the refusal hook itself fails (its audit write raised): before,
    the task that opens the device channel died silently; now the failure is logged."""
    async def judge(command: str, pty: bool) -> str | None:
        return "it names /data/dicom"

    def refused(relay: RelaySession, kind: str, message: str) -> None:
        raise RuntimeError("cannot write the audit row")

    async def no_device(*args):
        raise AssertionError("a refused command never reaches the device")

    async def main() -> None:
        key = asyncssh.generate_private_key("ssh-ed25519")
        ctx = ChannelContext(number=3, recorder=_Recorder(), open_upstream=no_device, judge_exec=judge,
                             on_refused=refused, session_id="s-20261206-abcd")
        server = await asyncssh.listen("127.0.0.1", 0, server_factory=lambda: _Relaying(ctx),
                                       server_host_keys=[key])
        port = server.sockets[0].getsockname()[1]
        try:
            async with asyncssh.connect("127.0.0.1", port, username="alice", known_hosts=None,
                                        client_keys=None, agent_path=None) as conn:
                await conn.create_process("cat /data/dicom/1.dcm")
                for _ in range(TIMEOUT * 20):
                    if any(r.name == "medbroker.relay" for r in caplog.records):
                        break
                    await asyncio.sleep(0.05)
        finally:
            server.close()
            await server.wait_closed()

    with caplog.at_level(logging.ERROR, logger="medbroker.relay"):
        asyncio.run(asyncio.wait_for(main(), TIMEOUT * 2))
    lines = [r for r in caplog.records if r.name == "medbroker.relay"]
    assert [r.getMessage() for r in lines] == [  # the line names its session and channel (sessions/sessionlog.py)
        "[session=s-20261206-abcd channel=3] opening the device channel failed: RuntimeError: cannot write the audit row"]
    assert (lines[0].session_id, lines[0].channel) == ("s-20261206-abcd", 3)  # for handlers that filter on them
