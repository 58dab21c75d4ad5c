"""Shared plumbing for CLI commands: the broker home, acting principals, JSON and table output."""

from __future__ import annotations

import getpass
import json
import os
import re
import unicodedata
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Sequence

import typer

from broker.app import App, open_app
from broker.clock import display_zone, local_text
from broker.errors import PermissionDeniedError, StorageError, UsageError
from broker.identity import Principal, get_principal, require_role
from broker.keys import write_private

__all__ = [
    "State",
    "default_home",
    "state",
    "open_home",
    "acting",
    "admin_actor",
    "local_actor",
    "emit_json",
    "print_table",
    "print_fields",
    "say",
    "safe",
    "when",
    "read_text_file",
    "JSON_HELP",
    "BY_ADMIN_HELP",
]

JSON_HELP = "Print one JSON document on stdout instead of text."
BY_ADMIN_HELP = ("Act as this medbroker admin (audited as the actor). Without it the actor is "
                 "local:<your OS login>, i.e. whoever can write the broker home.")

# C0 controls (except tab), DEL, C1 controls and the Unicode line/paragraph separators: never sent
# to a terminal from stored data (a device description or a reason could carry escape sequences).
_UNSAFE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")


def default_home() -> Path:
    """Where the broker home lives without ``--home``/``MEDBROKER_HOME``: ``$XDG_DATA_HOME/medbroker``,
    else ``~/.local/share/medbroker``."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "medbroker"


@dataclass
class State:
    """Per-invocation CLI state, stored on the root click context (``ctx.obj``)."""

    home: Path
    _app: App | None = field(default=None, repr=False)

    def app(self) -> App:
        """Open the broker home once per invocation (closed when the command ends).

        :raises ConfigError: no home or a broken broker.toml
        """
        if self._app is None:
            self._app = open_app(self.home)
            set_display_zone(self._app.config.display.timezone)
        return self._app

    def close(self) -> None:
        if self._app is not None:
            self._app.close()
            self._app = None


def state(ctx: typer.Context) -> State:
    """The :class:`State` of this invocation (set by the root callback)."""
    obj = ctx.find_root().obj
    if not isinstance(obj, State):  # a command invoked on its own, outside the root group
        obj = State(default_home())
        ctx.find_root().obj = obj
        ctx.find_root().call_on_close(obj.close)
    return obj


def open_home(ctx: typer.Context) -> App:
    """Shortcut: the opened :class:`App` for this invocation."""
    return state(ctx).app()


def local_actor() -> str:
    """The audit actor for administrative commands run without ``--by``: ``local:<OS login>``."""
    try:
        name = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry and no LOGNAME/USER (containers)
        name = str(os.getuid())
    return f"local:{safe(name)}"


def acting(app: App, name: str, *roles: str, action: str = "do this") -> Principal:
    """The person named with ``--by``/``--user``, checked to be enabled and (optionally) in ``roles``.

    :raises NotFoundError: unknown user
    :raises PermissionDeniedError: disabled, or none of ``roles``
    """
    principal = get_principal(app.store, name)
    if principal.disabled:
        raise PermissionDeniedError(f"user {name} is disabled",
                                    f"an administrator can run: medbroker user enable {name}")
    if roles:
        require_role(principal, *roles, action=action)
    return principal


def admin_actor(app: App, by: str | None, *, action: str, roles: Sequence[str] = ("admin",)) -> str:
    """The audit actor of an administrative command: the ``--by`` admin, else :func:`local_actor`."""
    if by is None:
        return local_actor()
    return acting(app, by, *roles, action=action).name


# Inside JSON strings: C1 controls and line/paragraph separators as \u escapes, so a stored value can
# never reach a terminal as a raw control sequence (json.dumps already escapes C0 controls).
_JSON_ESCAPES = {c: f"\\u{c:04x}" for c in (*range(0x80, 0xA0), 0x2028, 0x2029)}


def emit_json(doc: Any) -> None:
    """Print one JSON document on stdout (UTF-8, indented, control characters escaped)."""
    typer.echo(json.dumps(doc, indent=2, ensure_ascii=False, default=str).translate(_JSON_ESCAPES))


def safe(value: Any) -> str:
    """Text fit for a terminal: ``None`` → ``-``, control characters shown as ``?``."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    text = _UNSAFE.sub("?", str(value))
    # bidi overrides, zero-width and other format characters (issue 11): shown, not obeyed
    return text if text.isascii() else "".join(
        f"<U+{ord(c):04X}>" if unicodedata.category(c) in ("Cf", "Cs") else c for c in text)


_DISPLAY: dict[str, Any] = {"zone": None}  # this invocation's [display] timezone (set when the home opens)


def set_display_zone(name: str) -> None:
    """Show times in the zone ``[display] timezone`` names ("" = the host's)."""
    _DISPLAY["zone"] = display_zone(name)


def when(value: datetime | str | None) -> str:
    """A timestamp to the second in the display zone: ``2026-01-01 09:00:00 CET``, ``…Z`` in UTC."""
    if value is None:
        return "-"
    text = value if isinstance(value, datetime) else str(value)
    if isinstance(text, str) and len(text) < 19:
        return safe(text)
    return safe(local_text(text, _DISPLAY["zone"]))


def _console():
    from rich.console import Console

    tty = sys.stdout.isatty()
    width = None
    if not tty:  # a pipe, a file, CI logs: wide enough that tables never cut headers, fingerprints or times
        try:  # (an exported COLUMNS=80, as pytest-xdist and some shells set, must not narrow a redirected table)
            width = max(200, int(os.environ.get("COLUMNS", "200")))
        except ValueError:
            width = 200
    return Console(file=sys.stdout, highlight=False, soft_wrap=False, width=width, emoji=False,
                   markup=False, color_system="auto" if tty else None)


def print_table(columns: Sequence[str], rows: Iterable[Sequence[Any]], *, title: str | None = None,
                empty: str = "none") -> None:
    """Print a plain table (colour only on a terminal; cell text is never parsed as markup)."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    rows = list(rows)
    console = _console()
    if title:
        console.print(Text(title, style="bold"))
    if not rows:
        console.print(Text(f"  ({empty})"))
        return
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
    for name in columns:
        table.add_column(name, overflow="fold")
    for row in rows:
        table.add_row(*(Text(safe(v)) for v in row))
    console.print(table)


def print_fields(pairs: Iterable[tuple[str, Any]]) -> None:
    """Print ``label: value`` lines with aligned values."""
    pairs = list(pairs)
    width = max((len(k) for k, _ in pairs), default=0)
    for key, value in pairs:
        typer.echo(f"{key + ':':<{width + 1}} {safe(value)}")


def say(text: str) -> None:
    """One line of human output on stdout (stored values pass through :func:`safe` first)."""
    typer.echo(text)


def read_text_file(path: Path, *, what: str, limit: int = 1 << 20) -> str:
    """Read a small text file named on the command line.

    :raises UsageError: unreadable, too big or not UTF-8
    """
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror}", "check the path and its permissions") from None
    if len(data) > limit:
        raise UsageError(f"{what} {path} is larger than {limit // 1024} KiB", "is this the right file?")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{what} {path} is not a text file", "is this the right file?") from None


def write_output_file(path: Path, data: bytes) -> None:
    """Write an export or report named with ``-o``: mode 0600 (it can hold sensitive output), complete or
    not at all (:func:`broker.keys.write_private`); a missing directory is an error, never created.

    :raises StorageError: the directory is missing or not writable, or the disk is full
    """
    directory = path.parent if str(path.parent) else Path(".")
    try:
        if not directory.is_dir():
            raise FileNotFoundError(2, "No such directory", str(directory))
        write_private(path, data)
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}", "choose a writable -o path") from None
