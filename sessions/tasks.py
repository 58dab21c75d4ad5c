"""Background tasks that are kept until they end and whose failures are logged: no fire-and-forget.

An asyncio task nobody holds may be garbage-collected mid-run, and an exception nobody retrieves vanishes
(at best a "Task exception was never retrieved" line at some later collection). Every task the broker starts
without awaiting it goes through :class:`TaskSet` (or, when something else keeps the task, :func:`watch`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Coroutine, Iterator

__all__ = ["TaskSet", "watch"]


def watch(task: asyncio.Task, log: logging.Logger | logging.LoggerAdapter, what: str) -> asyncio.Task:
    """Log ``task``'s exception (with its traceback) when it ends with one; a cancelled task is not a failure.

    :param what: says what failed, e.g. "judging an exec command"
    :returns: ``task``
    """

    def done(t: asyncio.Task) -> None:
        if t.cancelled():
            return
        exc = t.exception()  # retrieved: asyncio no longer reports it at garbage collection
        if exc is not None:
            log.error("%s failed: %s: %s", what, type(exc).__name__, exc, exc_info=exc)

    task.add_done_callback(done)
    return task


class TaskSet:
    """The tasks one owner (a channel, a session, the broker) started in the background."""

    def __init__(self, log: logging.Logger | logging.LoggerAdapter) -> None:
        self.log = log
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], what: str) -> asyncio.Task:
        """Run ``coro`` in the running loop, keep it until it ends, log its exception (``what`` failed: ...)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return watch(task, self.log, what)

    def __iter__(self) -> Iterator[asyncio.Task]:
        return iter(list(self._tasks))

    def __len__(self) -> int:
        return len(self._tasks)
