"""``medbroker replay`` and ``export``: watch or convert a session recording (both audited)."""

from pathlib import Path
from typing import Annotated, Any

import sys
import typer

from broker.commands.common import admin_actor, emit_json, open_home, say, write_output_file
from broker.commands.sessions import get_session_row
from broker.errors import RecordingError, UsageError
from broker.session_ops import verify_session

__all__ = ["register", "replay", "export", "FORMATS"]

FORMATS = ("asciicast", "text", "json", "html")
VIEW_ROLES = ("security", "admin")
ByOpt = Annotated[str | None, typer.Option(
    "--by", metavar="NAME", help="Security or admin user viewing it (audited; default: local:<your OS login>).")]


def _seconds(text: str | None, option: str) -> float | None:
    if text is None:
        return None
    from broker.commands.player import parse_offset  # 0, 90s, 1m30s, 00:01:30 (as show/search print offsets)

    return parse_offset(text, what=option)


def replay(
    ctx: typer.Context,
    session_id: Annotated[str, typer.Argument(metavar="ID", help="Session id (see: medbroker sessions list).")],
    speed: Annotated[float, typer.Option("--speed", metavar="X", help="Playback speed factor, e.g. 2 or 0.5.")] = 1.0,
    max_idle: Annotated[str | None, typer.Option(
        "--max-idle", metavar="DURATION", help="Shorten every pause to at most this, e.g. 2s.")] = None,
    start: Annotated[str | None, typer.Option(
        "--from", metavar="DURATION",
        help="Start this far into the session (earlier output is shown at once).")] = None,
    instant: Annotated[bool, typer.Option("--instant", help="No pauses: print the whole terminal output.")] = False,
    by: ByOpt = None,
    bundle: Annotated[Path | None, typer.Option(
        "--bundle", metavar="FILE", dir_okay=False,
        help="Replay from an evidence bundle exported with --include-data-key (offline, no broker home; the whole "
             "bundle is verified first).")] = None,
) -> None:
    """Play a session's terminal output with its recorded timing (verifies the recording first)."""
    from sessions.replay import verification_summary

    if not speed > 0 or speed > 1000:
        raise UsageError(f"--speed {speed} must be above 0 and at most 1000", "e.g. --speed 1 or --speed 4")
    idle = _seconds(max_idle, "--max-idle")
    start_at = _seconds(start, "--from") or 0.0
    if bundle is not None:
        if by is not None:
            raise UsageError("--by goes with a broker home; a bundle replay is not audited by the broker",
                             "leave out --by")
        _replay_bundle(bundle, session_id, speed=speed, idle=idle, start_at=start_at, instant=instant)
        return
    a = open_home(ctx)
    row = get_session_row(a, session_id)
    actor = admin_actor(a, by, action="replay recordings", roles=VIEW_ROLES)
    if not a.recordings.exists(row["recording"]):
        raise RecordingError(f"the recording of session {session_id} is missing from {a.config.recordings_dir} "
                             f"({a.recordings.key_of(row['recording'])})",
                             "restore the recordings directory from backup; run: medbroker audit verify")
    result = verify_session(a, row)
    path = a.recordings.local_path(row["recording"])
    if result.ok and row.get("payload_removed_at"):
        raise RecordingError(f"the terminal content of session {session_id} was removed by retention on "
                             f"{row['payload_removed_at'][:10]}; nothing is left to replay",
                             f"its metadata remains: medbroker sessions show {session_id}, or "
                             f"medbroker export {session_id} --format text -o FILE")
    if not result.ok:
        raise RecordingError(f"recording of session {session_id} failed verification: {verification_summary(result)}",
                             f"inspect the evidence with: medbroker export {session_id} --format json -o FILE; "
                             "and run: medbroker audit verify")
    a.audit.record("recording.replayed", actor=actor, user=row["user_name"], device=row["device"],
                   session_id=session_id, source="cli", speed=speed, max_idle=idle, start=start_at, instant=instant)
    typer.echo(f"medbroker: replaying session {session_id} ({row['user_name']} on {row['device']}, started "
               f"{row['started_at']}); recording {verification_summary(result)}", err=True)
    _play(path, a.keys.get, session_id, speed=speed, idle=idle, start_at=start_at, instant=instant)


def _replay_bundle(bundle: Path, session_id: str, *, speed: float, idle: float | None, start_at: float,
                   instant: bool) -> None:
    """``replay --bundle FILE ID``: verify the whole bundle, then play one of its recordings with its own key."""
    from broker.errors import BrokerError, NotFoundError
    from broker.evidence_verify import bundle_key_lookup, open_bundle

    contents, check = open_bundle(bundle)
    with contents:
        if not check.ok:
            raise BrokerError(f"bundle {bundle} failed verification: {check.problems[0]}",
                              f"see all problems with: medbroker audit verify --bundle {bundle}")
        item = next((s for s in check.manifest.get("sessions", []) if s.get("id") == session_id), None)
        if item is None:
            raise NotFoundError(f"session {session_id[:64]!r} is not in bundle {bundle}",
                                f"it holds: {', '.join(str(s.get('id')) for s in check.manifest.get('sessions', []))}")
        lookup = bundle_key_lookup(contents, session_id)
        if lookup is None:
            raise RecordingError(f"bundle {bundle} holds no key for session {session_id}; its recording verifies, "
                                 "but its content is encrypted",
                                 "ask for an export with --include-data-key, or replay it on the broker")
        from sessions.retention import is_redacted

        if is_redacted(contents.files[item["recording"]]):
            raise RecordingError(f"the terminal content of session {session_id} was removed by retention before "
                                 "the export; nothing is left to replay", "its audit rows are in the bundle")
        typer.echo(f"medbroker: replaying session {session_id} ({item.get('user')} on {item.get('device')}) from "
                   f"bundle {bundle}, verified, signed with {check.key_id}", err=True)
        _play(contents.files[item["recording"]], lookup, session_id, speed=speed, idle=idle, start_at=start_at,
              instant=instant)


def _play(path: Path, key_lookup: Any, session_id: str, *, speed: float, idle: float | None, start_at: float,
          instant: bool) -> None:
    from sessions.recording import read_frames
    from sessions.replay import replay as play

    out = sys.stdout.buffer

    def write(data: bytes) -> None:
        out.write(data)
        out.flush()

    if not instant and sys.stdin.isatty() and sys.stdout.isatty():  # keys pause, seek and change speed
        from broker.commands.player import KEYS_HELP, play_on_terminal

        typer.echo(f"medbroker: {KEYS_HELP}", err=True)
        player = play_on_terminal(lambda: read_frames(path, key_lookup=key_lookup), write,
                                  fd=sys.stdin.fileno(), play=play, speed=speed, max_idle=idle, start_at=start_at)
        if not player.finished:
            out.write(b"\r\n")
            out.flush()
            typer.echo(f"medbroker: stopped at {player.shown:.0f}s of session {session_id}", err=True)
            return
    else:
        frames = read_frames(path, key_lookup=key_lookup)
        try:
            play(frames, write, speed=speed, max_idle=idle, start_at=start_at, instant=instant)
        finally:
            frames.close()
    out.write(b"\r\n")
    out.flush()
    typer.echo(f"medbroker: end of session {session_id}", err=True)


def export(
    ctx: typer.Context,
    session_id: Annotated[str, typer.Argument(metavar="ID", help="Session id (see: medbroker sessions list).")],
    fmt: Annotated[str, typer.Option("--format", help="asciicast (v2, for players), text (transcript), json, or "
                                                      "html (one self-contained replay page).")],
    output: Annotated[Path, typer.Option("-o", "--output", metavar="FILE", dir_okay=False,
                                         help="Where to write it; '-' for stdout.")],
    by: ByOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary of the export.")] = False,
) -> None:
    """Export a recording as asciicast v2, a text transcript, JSON or an HTML replay page, with its verification.

    Damaged recordings export what can be read, and the export says what is broken.
    """
    from sessions.htmlexport import to_html
    from sessions.retention import open_frames as read_frames, read_any_header as read_header
    from sessions.replay import to_asciicast, to_json, to_text, verification_summary

    if fmt not in FORMATS:
        raise UsageError(f"format {fmt!r} is not known", f"use one of: {', '.join(FORMATS)}")
    a = open_home(ctx)
    row = get_session_row(a, session_id)
    actor = admin_actor(a, by, action="export recordings", roles=VIEW_ROLES)
    result = verify_session(a, row)
    path = a.recordings.local_path(row["recording"])
    header = read_header(path)
    frames = read_frames(path, key_lookup=a.keys.get, strict=False)
    try:
        if fmt == "asciicast":
            text = to_asciicast(frames, header=header, verify_result=result)
        elif fmt == "text":
            text = to_text(frames, header=header, verify_result=result)
        elif fmt == "html":
            text = to_html(frames, header=header, verify_result=result)
        else:
            text = to_json(frames, header=header, verify_result=result)
    finally:
        frames.close()
    to_stdout = str(output) == "-"
    if not to_stdout:
        write_output_file(output, text.encode("utf-8"))
    a.audit.record("recording.exported", actor=actor, user=row["user_name"], device=row["device"],
                   session_id=session_id, source="cli", format=fmt,
                   path="-" if to_stdout else str(output.absolute()), verified=result.ok)
    if to_stdout:
        sys.stdout.write(text)
        sys.stdout.flush()
    elif as_json:
        emit_json({"session_id": session_id, "format": fmt, "path": str(output.absolute()), "bytes": len(text.encode()),
                   "verification": {"ok": result.ok, "incomplete": result.incomplete,
                                    "problems": list(result.problems), "summary": verification_summary(result)}})
    else:
        say(f"Exported session {session_id} as {fmt} to {output} (recording {verification_summary(result)}).")
    if not result.ok:
        typer.echo(f"Warning: the recording failed verification: {verification_summary(result)}", err=True)


def register(app: typer.Typer) -> None:
    """Add ``replay`` and ``export`` to the root app."""
    app.command("replay")(replay)
    app.command("export")(export)
