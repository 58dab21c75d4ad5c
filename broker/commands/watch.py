"""``medbroker sessions watch``: follow a live session's terminal read-only, from its recording (audited)."""

import signal
import sys
import time
from typing import Annotated

import typer

from broker.commands.common import admin_actor, open_home, safe
from broker.commands.sessions import get_session_row
from broker.config import parse_duration
from broker.errors import ConflictError, RecordingError

__all__ = ["register", "watch", "WATCH_ROLES"]

WATCH_ROLES = ("security", "admin")


def watch(
    ctx: typer.Context,
    session_id: Annotated[str, typer.Argument(
        metavar="ID", help="A live session's id (see: medbroker sessions list).")],
    by: Annotated[str | None, typer.Option(
        "--by", metavar="NAME",
        help="Security or admin user watching (audited; default: local:<your OS login>).")] = None,
    limit: Annotated[str | None, typer.Option(
        "--for", metavar="DURATION", help="Stop watching after this long, e.g. 10m (default: until the session ends).")
    ] = None,
) -> None:
    """Watch a live session's terminal read-only, as the vendor sees it (works from any process on the broker).

    Earlier output is shown at once, then new output as the broker records it. Ends when the session
    ends, after --for, or on Ctrl-C. Nothing typed here reaches the session.
    """
    from sessions.recording import read_frames
    from sessions.replay import replay as play

    seconds = None if limit is None else float(parse_duration(limit, what="--for"))
    a = open_home(ctx)
    row = get_session_row(a, session_id)
    actor = admin_actor(a, by, action="watch live sessions", roles=WATCH_ROLES)
    if row["status"] != "live":
        raise ConflictError(f"session {session_id} is not live (status {row['status']})",
                            f"replay it instead: medbroker replay {session_id}")
    a.audit.record("recording.watched", actor=actor, user=row["user_name"], device=row["device"],
                   session_id=session_id, grant_id=row["grant_id"], source="cli")
    typer.echo(f"medbroker: watching session {session_id} ({row['user_name']} on {row['device']}, live since "
               f"{row['started_at']}), read-only; Ctrl-C stops watching", err=True)
    stopped = False

    def on_term(signum, frame) -> None:  # a supervisor's SIGTERM ends the watch cleanly, like Ctrl-C
        nonlocal stopped
        stopped = True

    previous = signal.signal(signal.SIGTERM, on_term)
    out = sys.stdout.buffer

    def write(data: bytes) -> None:
        out.write(data)
        out.flush()

    from broker.journal import live_source  # the local file, or the journal when another node records it

    frames = read_frames(live_source(a, row), key_lookup=a.keys.get, follow=True, stop=lambda: stopped,
                         timeout=seconds)
    ended = False

    def tracked():
        nonlocal ended
        for frame in frames:
            ended = ended or frame.kind == "end"
            yield frame

    try:
        play(tracked(), write, instant=True)
    except KeyboardInterrupt:
        stopped = True
    except BrokenPipeError:  # `… | head`: the reader went away
        return
    except RecordingError as exc:
        raise RecordingError(f"cannot follow the recording of session {session_id}: {exc.message}",
                             "run: medbroker audit verify") from None
    finally:
        frames.close()
        signal.signal(signal.SIGTERM, previous)
    out.write(b"\r\n")
    out.flush()
    end = get_session_row(a, session_id)
    for _ in range(20):  # the end frame comes a moment before the broker stores the outcome
        if not ended or end["status"] != "live":
            break
        time.sleep(0.1)
        end = get_session_row(a, session_id)
    if end["status"] == "live":
        typer.echo(f"medbroker: stopped watching; session {session_id} is still live", err=True)
    else:
        typer.echo(f"medbroker: session {session_id} ended ({end['status']}: {safe(end['end_reason'])[:300]})",
                   err=True)


def register(sessions_app: typer.Typer) -> None:
    """Add ``watch`` to ``medbroker sessions``."""
    sessions_app.command("watch")(watch)
