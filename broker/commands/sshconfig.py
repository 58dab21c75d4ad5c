"""``medbroker ssh-config``: Host blocks and known_hosts lines (or a PuTTY session file) for vendors."""

from typing import Annotated

import typer

from broker.commands.common import JSON_HELP, emit_json, open_home
from broker.config import parse_listen
from broker.errors import UsageError
from broker.identity import get_principal, validate_name
from broker.sshconfig import build_ssh_config, render_openssh, render_putty

__all__ = ["ssh_config"]


def ssh_config(
    ctx: typer.Context,
    user: Annotated[str | None, typer.Option("--user", metavar="NAME",
                                             help="Fill in this vendor's name (default: the placeholder USER).")] = None,
    putty: Annotated[bool, typer.Option("--putty", help="A PuTTY registry file (saved sessions, host key pinned) "
                                                        "with plink/pscp/psftp command lines, instead of OpenSSH "
                                                        "Host blocks.")] = False,
    host: Annotated[str | None, typer.Option("--host", metavar="HOST",
                                             help="How vendors reach the broker (default: [listen] public_host).")] = None,
    port: Annotated[int | None, typer.Option("--port", min=1, max=65535,
                                             help="The broker's SSH port as vendors see it (default: the port of "
                                                  "[listen] address).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Print ~/.ssh/config Host blocks for every device (direct USER@DEVICE@broker and a ProxyJump variant
    DEVICE-jump) and the known_hosts lines that pin the broker and each device's jump key."""
    app = open_home(ctx)
    name = "USER"
    if user is not None:
        name = get_principal(app.store, validate_name(user, what="user name")).name
    if host is not None and (not host or any(c.isspace() or ord(c) < 0x20 for c in host)):
        raise UsageError(f"--host {host!r} is not a host name")
    config = build_ssh_config(app, name, port=port or parse_listen(app.config.listen.address)[1], host=host)
    if as_json:
        emit_json(config.as_dict())
    elif putty:
        typer.echo(render_putty(config), nl=False)
    else:
        typer.echo(render_openssh(config), nl=False)
