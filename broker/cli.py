"""The ``medbroker`` command line: argv, printing and exit codes around the domain layer."""

import os
import sys
from pathlib import Path
from typing import Annotated, Any, cast

import typer
from typer.core import TyperGroup

from broker.commands import archive as archive_cmds
from broker.commands import audit as audit_cmds
from broker.commands import cluster as cluster_cmds
from broker.commands import devices as device_cmds
from broker.commands import evidence as evidence_cmds
from broker.commands import grants as grant_cmds
from broker.commands import home as home_cmds
from broker.commands import keys as keys_cmds
from broker.commands import recordings as recording_cmds
from broker.commands import report as report_cmds
from broker.commands import retention as retention_cmds
from broker.commands import search as search_cmds
from broker.commands import service as service_cmds
from broker.commands import sessions as session_cmds
from broker.commands import sshconfig as sshconfig_cmds
from broker.commands import totp as totp_cmds
from broker.commands import users as user_cmds
from broker.commands import watch as watch_cmds
from broker.commands.common import State, default_home
from broker.errors import BrokerError

__all__ = ["app", "main", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def report_error(message: str, hint: str | None = None) -> None:
    """``Error: …`` and ``Hint: …`` on stderr: the only way the CLI reports a failure."""
    typer.echo(f"Error: {message}", err=True)
    if hint:
        typer.echo(f"Hint: {hint}", err=True)


# typer's own control-flow exceptions (help, usage errors, exit) pass through untouched; typer >= 0.24
# vendors click, so find its ClickException through a class typer exports rather than importing click.
_CLICK_EXCEPTION = cast(type[Exception],
                        next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"))
_PASS_THROUGH = (typer.Exit, typer.Abort, _CLICK_EXCEPTION)


class BrokerGroup(TyperGroup):
    """The root group: turns domain errors into ``Error:``/``Hint:`` lines and exit codes, never a traceback."""

    # typer passes its own typer.Context; the base declares the vendored click Context, a private name
    def invoke(self, ctx: typer.Context) -> Any:  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except BrokerError as exc:
            report_error(exc.message, exc.hint)
            raise typer.Exit(exc.exit_code) from None
        except _PASS_THROUGH:
            raise
        except KeyboardInterrupt:
            report_error("interrupted")
            raise typer.Exit(130) from None
        except Exception as exc:  # a bug: say so in one line (MEDBROKER_DEBUG=1 shows the traceback)
            if os.environ.get("MEDBROKER_DEBUG") == "1":
                raise
            report_error(f"internal error: {type(exc).__name__}: {exc}",
                         "this is a medbroker bug; rerun with MEDBROKER_DEBUG=1 and report the traceback")
            raise typer.Exit(EXIT_FAILED) from None


app = typer.Typer(
    name="medbroker",
    cls=BrokerGroup,
    help="Remote-maintenance access broker for medical devices: approved, time-limited, recorded SSH.\n\n"
         "Exit status: 0 ok, 1 refused or failed, 2 usage or configuration error.",
    no_args_is_help=True,
    rich_markup_mode=None,
    add_completion=False,
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def root(
    ctx: typer.Context,
    home: Annotated[Path | None, typer.Option(
        "--home", envvar="MEDBROKER_HOME", file_okay=False, show_default=False,
        help="Broker home directory (config, keys, database, recordings). Default: $MEDBROKER_HOME, "
             "else $XDG_DATA_HOME/medbroker, else ~/.local/share/medbroker.")] = None,
) -> None:
    """Remote-maintenance access broker for medical devices: approved, time-limited, recorded SSH."""
    st = State((home or default_home()).expanduser().absolute())
    ctx.obj = st
    ctx.call_on_close(st.close)


home_cmds.register(app)
grant_cmds.register(app)
recording_cmds.register(app)
app.add_typer(device_cmds.app, name="device")
app.add_typer(user_cmds.app, name="user")
app.add_typer(grant_cmds.grants_app, name="grants")
app.add_typer(grant_cmds.requests_app, name="requests")
app.add_typer(session_cmds.app, name="sessions")
watch_cmds.register(session_cmds.app)
search_cmds.register(session_cmds.app)
report_cmds.register(app)
app.add_typer(retention_cmds.app, name="retention")
app.add_typer(audit_cmds.app, name="audit")
app.add_typer(archive_cmds.app, name="archive")
app.add_typer(evidence_cmds.app, name="evidence")
app.add_typer(keys_cmds.app, name="keys")
app.add_typer(service_cmds.app, name="service")
app.add_typer(cluster_cmds.app, name="cluster")
app.command("backup")(service_cmds.backup)
app.command("restore")(service_cmds.restore)
app.command("ssh-config")(sshconfig_cmds.ssh_config)
user_cmds.app.command("totp")(totp_cmds.totp)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``medbroker``); exits with 0, 1 or 2."""
    app(args=argv, prog_name="medbroker")


if __name__ == "__main__":
    main(sys.argv[1:])
