"""``medbroker migrate``: move a broker home's SQLite database into PostgreSQL, verified."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from broker.audit import verify_chain
from broker.commands.common import JSON_HELP, emit_json, say
from broker.errors import BrokerError, UsageError
from broker.store import is_postgres_url, open_store, redact_url
from broker.store.copy import copy_tables, table_counts

__all__ = ["register", "migrate"]

JsonOpt = Annotated[bool, typer.Option("--json", help=JSON_HELP)]
_EXAMPLE = ("e.g. medbroker migrate --from sqlite:/var/lib/medbroker "
            "--to postgresql://medbroker@/medbroker?host=/run/postgresql")


def _source_path(text: str) -> Path:
    if not text.startswith("sqlite:") or not text[len("sqlite:"):]:
        raise UsageError(f"--from {text!r}: expected sqlite:PATH (a broker home or its medbroker.db)", _EXAMPLE)
    path = Path(text[len("sqlite:"):]).expanduser()
    if path.is_dir():
        path = path / "medbroker.db"
    if not path.is_file():
        raise UsageError(f"--from {text!r}: {path} is not a file", "name the broker home or its medbroker.db")
    return path


def migrate(
    source: Annotated[str, typer.Option("--from", metavar="sqlite:PATH", show_default=False,
                                        help="The SQLite database to copy: sqlite:HOME or sqlite:HOME/medbroker.db.")],
    target: Annotated[str, typer.Option("--to", metavar="URL", show_default=False,
                                        help="The PostgreSQL database to fill: postgresql://USER@HOST/DB or "
                                             "postgresql://USER@/DB?host=SOCKET_DIR.")],
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace what the target already holds (refused by default).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Copy every table of a home's SQLite database into PostgreSQL (ids and audit chain kept), then verify it."""
    path = _source_path(source)
    if not is_postgres_url(target):
        raise UsageError(f"--to {redact_url(target)!r}: expected a postgresql:// URL", _EXAMPLE)
    src = open_store(path)  # brings an older home to this version's schema, as any medbroker command would
    try:
        dst = open_store(target)
        try:
            copied = copy_tables(src, dst, overwrite=overwrite)
            # Verify from what the target now holds, not from what we meant to write.
            expected, found = table_counts(src), table_counts(dst)
            differ = {t: (expected.get(t), found.get(t)) for t in sorted(set(expected) | set(found))
                      if expected.get(t) != found.get(t)}
            chain = verify_chain(dst)
            source_chain = verify_chain(src)
            same_head = chain.last_hash == source_chain.last_hash
        finally:
            dst.close()
    finally:
        src.close()
    ok = not differ and chain.ok and same_head
    if as_json:
        emit_json({"ok": ok, "from": str(path), "to": redact_url(target), "tables": copied,
                   "differences": {t: {"source": a, "target": b} for t, (a, b) in differ.items()},
                   "audit": {"ok": chain.ok, "rows": chain.rows, "last_hash": chain.last_hash,
                             "same_as_source": same_head, "problems": list(chain.problems)}})
    else:
        say(f"copied {sum(copied.values())} rows of {len(copied)} tables from {path} to {redact_url(target)}")
        for table, n in sorted(copied.items()):
            say(f"  {table}: {n}")
        for table, (a, b) in differ.items():
            say(f"  {table}: source has {a} rows, target {b}")
        if chain.ok:
            say(f"audit chain on the target: ok ({chain.rows} rows, last hash {chain.last_hash[:16]}…"
                + (", the same as the source)" if same_head else ", DIFFERENT from the source)"))
        else:
            say(f"audit chain on the target: BROKEN ({len(chain.problems)} problem(s))")
            for p in chain.problems[:20]:
                say(f"  {p}")
    if not ok:
        raise BrokerError("the copy does not match its source", "keep the SQLite home in service and report this")
    if not as_json:
        say(f'next: set [store] url = "{redact_url(target)}" in broker.toml on every node and restart them')


def register(app: typer.Typer) -> None:
    app.command("migrate")(migrate)
