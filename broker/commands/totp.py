"""``medbroker user totp NAME``: enrol (or reset, or remove) a user's TOTP second factor."""

import io
import os
from pathlib import Path
from typing import Annotated

import typer

from broker.commands.common import BY_ADMIN_HELP, JSON_HELP, admin_actor, emit_json, open_home, say
from broker.errors import UsageError
from broker.identity import get_principal, validate_name
from broker.totp import DIGITS, PERIOD_S, enrol_totp, remove_totp

__all__ = ["totp", "qr_text"]


def qr_text(data: str) -> str:
    """``data`` as a QR code drawn with block characters, for a terminal (dark modules on a light frame)."""
    import qrcode

    qr = qrcode.QRCode(border=2, error_correction=qrcode.constants.ERROR_CORRECT_M)
    qr.add_data(data)
    qr.make(fit=True)
    out = io.StringIO()
    qr.print_ascii(out=out, invert=True)
    return out.getvalue()


def _create_private(path: Path):
    """Open a new file with mode 0600 for writing; never overwrite (a secret file is not silently replaced).

    :raises UsageError: it exists or cannot be created
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UsageError(f"{path} already exists", "choose a new file name; it will hold a secret") from None
    except OSError as exc:
        raise UsageError(f"cannot create {path}: {exc.strerror}", "check the directory and its permissions") from None
    return os.fdopen(fd, "w", encoding="utf-8")


def totp(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="The user to enrol.")],
    reset: Annotated[bool, typer.Option("--reset", help="Replace an existing enrolment (the old codes stop working).")] = False,
    remove: Annotated[bool, typer.Option("--remove", help="Remove the enrolment: the user logs in with the key alone.")] = False,
    uri_file: Annotated[Path | None, typer.Option(
        "--uri-file", metavar="FILE", dir_okay=False,
        help="Also write the otpauth:// URI to FILE (created 0600, never overwritten); required with --json.")] = None,
    qr: Annotated[bool, typer.Option("--qr/--no-qr", help="Draw the QR code on the terminal.")] = True,
    by: Annotated[str | None, typer.Option("--by", metavar="NAME", help=BY_ADMIN_HELP)] = None,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP + " It never contains the secret.")] = False,
) -> None:
    """Enrol TOTP for a user: prints an otpauth URI and a QR code for an authenticator app.

    From then on the user needs their SSH key AND a code: ssh asks "Verification code:" after the key.
    The secret is stored sealed with the data key and shown only here, once.
    """
    validate_name(name, what="user name")
    if reset and remove:
        raise UsageError("--reset and --remove exclude each other", "use one of them")
    if as_json and uri_file is None and not remove:
        raise UsageError("--json output never contains the TOTP secret, so it needs --uri-file FILE",
                         f"e.g. medbroker user totp {name} --json --uri-file {name}.otpauth")
    a = open_home(ctx)
    get_principal(a.store, name)
    actor = admin_actor(a, by, action="manage TOTP enrolments")
    if remove:
        remove_totp(a.store, name)
        a.audit.record("auth.totp.removed", actor=actor, user=name, source="cli")
        if as_json:
            emit_json({"user": name, "totp_enrolled": False})
        else:
            say(f"TOTP removed for {name}; they log in with their SSH key alone now.")
        return
    issuer = f"medbroker {a.config.listen.public_host}"
    out = _create_private(uri_file) if uri_file is not None else None  # fails before anything changes
    try:
        enrolment = enrol_totp(a.store, a.keys, name, issuer=issuer, replace=reset)
    except BaseException:
        if out is not None and uri_file is not None:  # out exists only with uri_file
            out.close()
            uri_file.unlink()
        raise
    uri = enrolment.uri.reveal()
    if out is not None:
        with out:
            out.write(uri + "\n")
    a.audit.record("auth.totp.enrolled", actor=actor, user=name, source="cli", replaced=enrolment.replaced,
                   issuer=issuer)
    if as_json:
        emit_json({"user": name, "totp_enrolled": True, "replaced": enrolment.replaced, "issuer": issuer,
                   "digits": DIGITS, "period_s": PERIOD_S, "uri_file": str(uri_file)})
        return
    say(f"TOTP {'re-enrolled' if enrolment.replaced else 'enrolled'} for {name}. "
        "Scan the QR code with an authenticator app (it is shown only now):")
    if qr:
        typer.echo(qr_text(uri))
    say("Or enter this URI by hand:")
    typer.echo(uri)
    if uri_file is not None:
        say(f"(also written to {uri_file}, mode 0600; delete it once the user has it)")
    say(f"From now on {name} logs in with their SSH key and then a code: ssh asks \"Verification code:\".")
