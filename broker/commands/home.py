"""``medbroker init``, ``check``, ``serve`` and ``demo``: the broker home and running the broker."""

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from broker.app import check_home, init_home
from broker.service import sd_notify
from broker.config import parse_listen, redact_url
from broker.errors import ConfigError, StorageError, UsageError
from broker.identity import parse_public_key
from broker.commands.common import JSON_HELP, emit_json, print_fields, safe, say, state

__all__ = ["register", "init", "check", "serve", "demo"]


def init(ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False) -> None:
    """Create the broker home: broker.toml, host key, signing key, data key, database, recordings/.

    Running it again keeps every existing file.
    """
    st = state(ctx)
    existed = (st.home / "broker.toml").exists()
    app = init_home(st.home)
    try:
        cfg = app.config
        host_pub = cfg.path(cfg.listen.host_key + ".pub")
        try:
            fingerprint = parse_public_key(host_pub.read_text()).fingerprint
        except OSError:
            fingerprint = None
        doc = {
            "home": str(cfg.home), "created": not existed, "config": str(cfg.home / "broker.toml"),
            "database": redact_url(cfg.store.url) if cfg.store.url else str(cfg.db_path),
            "recordings": str(cfg.recordings_dir),
            "host_key": str(cfg.path(cfg.listen.host_key)), "host_key_fingerprint": fingerprint,
            "schema_version": app.store.schema_version(),
        }
    finally:
        app.close()
    if as_json:
        emit_json(doc)
        return
    say(f"{'Initialised' if not existed else 'Checked existing'} medbroker home {safe(doc['home'])}")
    print_fields([("config", doc["config"]), ("database", f"{doc['database']} (schema {doc['schema_version']})"),
                  ("recordings", doc["recordings"]), ("host key", doc["host_key"]),
                  ("host key fingerprint", fingerprint)])
    say("Next: medbroker user add NAME --role admin; medbroker device add …; medbroker check")


def check(ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False) -> None:
    """Validate broker.toml, key files, the database and the recordings directory (changes nothing).

    Exit status 2 when anything is wrong, naming it.
    """
    st = state(ctx)
    results = check_home(st.home)
    failed = [r for r in results if not r.ok]
    if as_json:
        emit_json({"home": str(st.home), "ok": not failed,
                   "checks": [{"name": r.name, "ok": r.ok, "detail": r.detail} for r in results]})
    else:
        for r in results:
            say(f"{'ok  ' if r.ok else 'FAIL'}  {r.name:<13} {safe(r.detail)}")
    if failed:
        names = ", ".join(r.name for r in failed)
        raise ConfigError(f"{st.home}: {len(failed)} check(s) failed: {names}",
                          "fix the lines marked FAIL above, then run: medbroker check")


def serve(
    ctx: typer.Context,
    listen: Annotated[str | None, typer.Option(
        "--listen", metavar="HOST:PORT",
        help="Vendor SSH address (default: listen.address in broker.toml, normally 0.0.0.0:2222).")] = None,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning or error.")] = "info",
    web: Annotated[str | None, typer.Option(
        "--web", metavar="HOST:PORT",
        help="Also serve the web console here (default: web.address in broker.toml; empty = off).")] = None,
    workers: Annotated[int | None, typer.Option(
        "--workers", min=1, max=64, metavar="N",
        help="Broker processes accepting on the port (default: listen.workers in broker.toml, normally 1). "
             "With more than 1 this process supervises them.")] = None,
    node_id: Annotated[str | None, typer.Option(
        "--node-id", metavar="ID",
        help="This node's id in a cluster of brokers sharing one database (default: cluster.node_id in "
             "broker.toml, else the host name).")] = None,
    worker_of: Annotated[str | None, typer.Option(
        "--worker-of", hidden=True, help="Internal: run as worker INDEX of the supervisor SUPERVISOR_PID.",
        metavar="SUPERVISOR_PID:INDEX")] = None,
) -> None:
    """Serve the vendor SSH port (and the web console with --web) until Ctrl-C or SIGTERM."""
    level = getattr(logging, log_level.upper(), None)
    if log_level.lower() not in ("debug", "info", "warning", "error") or not isinstance(level, int):
        raise typer.BadParameter("use debug, info, warning or error", param_hint="--log-level")
    app = state(ctx).app()
    address = listen or app.config.listen.address
    parse_listen(address)
    if workers is not None:
        app.config = replace(app.config, listen=replace(app.config.listen, workers=workers))
    if node_id is not None:
        try:
            app.config = app.config.with_node_id(node_id)
        except UsageError as exc:
            raise typer.BadParameter(exc.message, param_hint="--node-id") from None
    if web:
        app.config = app.config.with_web(web)  # run_server starts the console when web.address is set
    from broker.serve import run_server, run_worker  # lazily: the CLI works without the SSH stack loaded

    several = app.config.listen.workers > 1
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s"
                        + ("[%(process)d]" if several else "") + ": %(message)s")
    if level > logging.DEBUG:  # asyncssh logs every connection and channel at INFO
        logging.getLogger("asyncssh").setLevel(max(level, logging.WARNING))

    def ready(port: int) -> None:
        host = address.rpartition(":")[0]
        processes = f", {app.config.listen.workers} worker processes" if several else ""
        from sessions.anchors import engine  # Hyperscan, when installed, makes judging binary streams cheaper
        from sessions.fastscan import native  # the deep scanner's byte scans, compiled when the build had a compiler

        scans = "compiled" if native() else "python"
        say(f"medbroker listening on {host}:{port} (home {app.home}{processes}; binary stream search: {engine()}; "
            f"output scans: {scans}); Ctrl-C stops it")
        sd_notify(f"READY=1\nSTATUS=listening on {host}:{port}\nMAINPID={os.getpid()}")  # systemd Type=notify

    try:
        if worker_of is not None:
            from broker.workers import parse_worker_of

            try:
                supervisor_pid, index = parse_worker_of(worker_of)
            except ValueError as exc:
                raise typer.BadParameter(str(exc), param_hint="--worker-of") from None
            run_worker(app, address, index=index, supervisor_pid=supervisor_pid)
        else:
            run_server(app, address, on_ready=ready)
    except OSError as exc:
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        raise StorageError(f"cannot listen on {address}: {why}",
                           "is another broker running? choose another port with --listen HOST:PORT") from None


def demo(
    directory: Annotated[Path | None, typer.Option(
        "--dir", file_okay=False, help="Where to build the demo world (default: a new temporary directory).")] = None,
    port: Annotated[int, typer.Option("--port", min=0, max=65535,
                                      help="Broker port (a free one is chosen if it is taken).")] = 2222,
) -> None:
    """A newcomer's sandbox: a throwaway broker, a local sshd playing ct-01 and sample people."""
    from broker.demo import run_demo  # lazily: it starts sshd and the broker

    run_demo(directory, broker_port=port, echo=say)


def register(app: typer.Typer) -> None:
    """Add these commands to the root app."""
    app.command("init")(init)
    app.command("check")(check)
    app.command("serve")(serve)
    app.command("demo")(demo)
