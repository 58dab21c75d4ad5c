"""Web console data feeds: asciicast for the player, server-sent events for live pages and live terminals."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import threading
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse

from broker.errors import BrokerError, NotFoundError
from broker.session_ops import get_session, list_live_sessions, running_counters
from broker.web_base import Web, page, source_of
from broker.web_auth import COOKIE, SignedOut, load_session
from broker.access_links import resolve_share_link

KEEPALIVE_S = 15.0
POLL_S = 1.0
MAX_STREAM_S = 3600.0  # EventSource reconnects by itself; a stream never outlives an hour
RECHECK_S = 20.0
_SSE_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}


def _web(request: Request) -> Web:
    return request.app.state.web


def _sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


# ---------------------------------------------------------------------------- player data
def _asciicast(app, row: dict[str, Any]) -> str:
    from broker.session_ops import verify_session
    from sessions.retention import open_frames, read_any_header  # complete or retention-redacted recordings
    from sessions.replay import to_asciicast

    result = verify_session(app, row)
    path = app.recordings.local_path(row["recording"])
    frames = open_frames(path, key_lookup=app.keys.get, strict=False)
    try:
        return to_asciicast(frames, header=read_any_header(path), verify_result=result)
    finally:
        frames.close()


async def _cast_response(web: Web, row: dict[str, Any]) -> Response:
    try:
        text = await asyncio.get_running_loop().run_in_executor(None, _asciicast, web.app, row)
    except (OSError, BrokerError) as exc:
        return PlainTextResponse(f"cannot read the recording: {exc}", status_code=500)
    return Response(text, media_type="application/x-asciicast", headers={"Cache-Control": "no-store"})


@page("security", action="replay recordings", touch=False, stream=True)
async def cast(request: Request, viewer) -> Response:
    web = _web(request)
    sid = request.path_params["sid"]
    try:
        row = await web.db(get_session, web.app.store, sid)
    except NotFoundError as exc:
        return PlainTextResponse(exc.message, status_code=404)
    await web.audit("recording.replayed", actor=viewer.name, user=row["user_name"], device=row["device"],
                    session_id=sid, source=source_of(request), via="web")
    return await _cast_response(web, row)


async def shared_cast(request: Request) -> Response:
    web = _web(request)
    token = request.path_params["token"]
    try:
        share = await web.db(resolve_share_link, web.app.store, token, web.now())
    except BrokerError as exc:
        return PlainTextResponse(exc.message, status_code=410)
    row = await web.db(get_session, web.app.store, share["session_id"])
    await web.audit("recording.replayed", actor=f"share:{share['id']}", user=row["user_name"], device=row["device"],
                    session_id=row["id"], source=source_of(request), via="share link", share_id=share["id"],
                    shared_by=share["created_by"], note=share["note"])
    return await _cast_response(web, row)


# ---------------------------------------------------------------------------- "something changed" feeds
def _fingerprint(web: Web, topic: str, running: dict[str, Any]) -> Any:
    """What the page shows changed; ``running`` are this process's byte counters, taken on the event loop."""
    store = web.app.store
    if topic == "inbox":
        newest = store.search_audit(event="request", limit=1)
        return newest[0]["id"] if newest else 0
    counters = [(s["id"], s["bytes_in"], s["bytes_out"], s["kill_requested_at"])
                for s in list_live_sessions(store, running, details=False)]
    newest = store.search_audit(session_id=None, event="session", limit=1)
    return [counters, newest[0]["id"] if newest else 0]


def _running(web: Web) -> dict[str, Any]:
    return running_counters(web.broker.live if web.broker is not None else None)


async def _still_signed_in(web: Web, request: Request) -> bool:
    try:
        await web.db(lambda: load_session(web.app, request.cookies.get(COOKIE), web.now(), touch=False,
                                          source=source_of(request)))
        return True
    except SignedOut:
        return False


@page("approver", "security", "admin", action="follow live updates", touch=False, stream=True)
async def changes(request: Request, viewer) -> Response:
    """``event: changed`` whenever the inbox or the live-session list changes (the page refetches)."""
    web = _web(request)
    topic = request.path_params["topic"]
    if topic not in ("inbox", "sessions"):
        return PlainTextResponse("unknown topic", status_code=404)
    if topic == "inbox" and viewer.role not in ("approver", "admin"):
        await web.audit("web.denied", actor=viewer.name, user=viewer.name, source=source_of(request), reason="role",
                        path=request.url.path, action="follow the approval inbox")
        return PlainTextResponse("forbidden", status_code=403)

    async def events() -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        start = last_beat = last_check = loop.time()
        seen = await web.db(_fingerprint, web, topic, _running(web))
        yield "retry: 2000\n\n"
        while not web.closing.is_set() and loop.time() - start < MAX_STREAM_S:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(web.closing.wait(), POLL_S)
            now = loop.time()
            if now - last_check > RECHECK_S:
                last_check = now
                if not await _still_signed_in(web, request):
                    yield _sse("signedout", {})
                    return
            current = await web.db(_fingerprint, web, topic, _running(web))
            if current != seen:
                seen = current
                last_beat = now
                yield _sse("changed", {})
            elif now - last_beat > KEEPALIVE_S:
                last_beat = now
                yield ": keepalive\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers=_SSE_HEADERS)


# ---------------------------------------------------------------------------- live terminal
_SHOWN = ("output", "stderr", "resize", "pty", "notice", "alert", "policy-denial", "exec", "end")


def _pump(path: Any, keys, stop: threading.Event, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
    """Tail the recording in a worker thread and hand frames to the event loop (bounded queue)."""
    from sessions.recording import read_frames

    def put(item: Any) -> bool:
        while not stop.is_set():
            fut = asyncio.run_coroutine_threadsafe(queue.put(item), loop)
            try:
                fut.result(1.0)
                return True
            except TimeoutError:
                fut.cancel()
        return False

    try:
        for frame in read_frames(path, key_lookup=keys.get, follow=True, stop=stop.is_set, timeout=MAX_STREAM_S,
                                 poll_interval=0.1, strict=False):
            if frame.kind in _SHOWN and not put(frame):
                return
    except BrokerError as exc:
        put(exc)
    finally:
        with contextlib.suppress(RuntimeError):  # the loop may be gone at shutdown
            put(None)


def _frame_event(frame: Any, decoders: dict) -> str | None:
    if frame.kind in ("output", "stderr"):
        from sessions.termguard import TerminalGuard  # the browser's terminal ignores OSC/DCS; dropped here too

        dec, guard = decoders.setdefault((frame.channel, frame.kind), (
            codecs.getincrementaldecoder("utf-8")("replace"), TerminalGuard()))
        text = dec.decode(guard.feed(frame.payload))
        return _sse("o", {"t": round(frame.mono_ns / 1e9, 3), "d": text}) if text else None
    try:
        ev = json.loads(frame.payload)
    except ValueError:
        ev = {}
    if frame.kind in ("pty", "resize"):
        return _sse("r", {"cols": ev.get("cols"), "rows": ev.get("rows")})
    if frame.kind == "end":
        return _sse("end", {"reason": ev.get("reason")})
    from sessions.replay import notice_bytes

    if frame.kind == "notice":
        return _sse("o", {"t": round(frame.mono_ns / 1e9, 3), "d": notice_bytes(ev).decode("utf-8", "replace")})
    what = ev.get("command") or ev.get("content") or ev.get("reason") or ev.get("path") or ""
    return _sse("m", {"t": round(frame.mono_ns / 1e9, 3), "d": f"{frame.kind}: {what}"[:300]})


@page("security", action="watch live sessions", touch=False, stream=True)
async def watch_stream(request: Request, viewer) -> Response:
    """The session's terminal output from its start, then live, as server-sent events (read-only)."""
    web = _web(request)
    sid = request.path_params["sid"]
    try:
        row = await web.db(get_session, web.app.store, sid)
    except NotFoundError as exc:
        return PlainTextResponse(exc.message, status_code=404)
    from broker.journal import live_source  # the local file, or the journal when another node records it

    path = await web.db(live_source, web.app, row)
    await web.audit("recording.watched", actor=viewer.name, user=row["user_name"], device=row["device"],
                    session_id=sid, source=source_of(request), via="web", live=row["status"] == "live")

    async def events() -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue(maxsize=256)
        stop = threading.Event()
        worker = threading.Thread(target=_pump, args=(path, web.app.keys, stop, loop, queue),
                                  name=f"watch-{sid}", daemon=True)
        worker.start()
        decoders: dict = {}
        try:
            yield "retry: 600000\n\n"
            quiet = 0.0
            while not web.closing.is_set():
                try:  # short waits, so a stopping console ends the stream at once
                    item = await asyncio.wait_for(queue.get(), POLL_S)
                except asyncio.TimeoutError:
                    quiet += POLL_S
                    if quiet >= KEEPALIVE_S:
                        quiet = 0.0
                        yield ": keepalive\n\n"
                    continue
                quiet = 0.0
                if item is None:
                    yield _sse("end", {"reason": "the recording ended"})
                    return
                if isinstance(item, BaseException):
                    yield _sse("failed", {"reason": str(item)})
                    return
                text = _frame_event(item, decoders)
                if text:
                    yield text
        finally:
            stop.set()
            while not queue.empty():
                queue.get_nowait()
            await asyncio.get_running_loop().run_in_executor(None, worker.join, 3.0)

    return StreamingResponse(events(), media_type="text/event-stream", headers=_SSE_HEADERS)
