"""``medbroker keys rotate``: a new data key for recordings and for sealing stored secrets."""

from typing import Annotated, Any

import typer

from broker.app import App
from broker.commands.common import BY_ADMIN_HELP, JSON_HELP, admin_actor, emit_json, open_home, say
from broker.errors import BrokerError, StorageError
from broker.totp import reseal_totp_secrets, totp_secret

__all__ = ["app", "rotate"]

app = typer.Typer(help="Data keys: what encrypts recordings and seals device credentials and TOTP secrets.",
                  no_args_is_help=True, rich_markup_mode=None)


def _device_context(name: str) -> bytes:
    # Must match broker/devices.py (device_credential); tests/test_secrets.py reaches a device after a rotation.
    return f"device:{name}".encode()


def _check_unseal(a: App) -> None:
    """Every sealed secret decrypts now, or nothing is rotated."""
    for row in a.store.list_devices():
        a.keys.unseal(row["credential"], context=_device_context(row["name"]))
    for row in a.store.list_users():
        totp_secret(a.store, a.keys, row["name"])


def _reseal_devices(a: App) -> int:
    rows = a.store.list_devices()
    for row in rows:
        plain = a.keys.unseal(row["credential"], context=_device_context(row["name"]))
        a.store.update_device(row["name"], credential=a.keys.seal(plain, context=_device_context(row["name"])))
    return len(rows)


@app.command("rotate")
def rotate(ctx: typer.Context,
           by: Annotated[str | None, typer.Option("--by", metavar="NAME", help=BY_ADMIN_HELP)] = None,
           as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False) -> None:
    """Make a new data key current and re-seal device credentials and TOTP secrets with it.

    Older keys stay in the key file, so existing recordings still decrypt (replay and export work as
    before). Back up the key file afterwards: without it nothing encrypted can be read.
    """
    a = open_home(ctx)
    actor = admin_actor(a, by, action="rotate keys")
    old_id = a.keys.current()[0]
    try:
        _check_unseal(a)
    except BrokerError as exc:
        raise StorageError(f"nothing was rotated: {exc.message}", exc.hint) from None
    new_id = a.keys.rotate()
    try:
        with a.store.transaction():
            devices = _reseal_devices(a)
            secrets = reseal_totp_secrets(a.store, a.keys)
    except BrokerError as exc:
        # The old key is still in the file, so every secret stays readable; re-sealing can simply be retried.
        raise StorageError(f"data key {new_id} is current, but re-sealing the stored secrets failed: {exc.message}",
                           "they remain readable with the old key; run medbroker keys rotate again") from None
    a.audit.record("keys.rotated", actor=actor, source="cli", old_key=old_id, new_key=new_id,
                   devices_resealed=devices, totp_secrets_resealed=secrets)
    doc: dict[str, Any] = {"old_key": old_id, "new_key": new_id, "devices_resealed": devices,
                           "totp_secrets_resealed": secrets, "key_file": str(a.keys.path)}
    if as_json:
        emit_json(doc)
        return
    say(f"Data key {new_id} is now current (was {old_id}).")
    say(f"Re-sealed {devices} device credential(s) and {secrets} TOTP secret(s) with it.")
    say(f"New recordings are encrypted with {new_id}; existing recordings keep their key "
        f"(older keys stay in {a.keys.path} for reading).")
    say(f"Back up {a.keys.path} now: without it nothing encrypted can be read.")
