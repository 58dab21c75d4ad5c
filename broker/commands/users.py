"""``medbroker user …``: people, their roles and their SSH public keys."""

from pathlib import Path
from typing import Annotated

import typer

from broker.app import App
from broker.commands.common import (BY_ADMIN_HELP, JSON_HELP, admin_actor, emit_json, open_home, print_fields,
                                    print_table, read_text_file, safe, say, when)
from broker.errors import ConflictError, UsageError
from broker.identity import (KEY_TYPES, ROLES, PublicKey, add_user, add_user_key, get_principal, parse_public_keys,
                             remove_user_key, set_user_role, validate_name)

__all__ = ["app", "user_doc", "read_key_files"]

app = typer.Typer(help="People: vendors, approvers, security staff and admins, with their SSH keys.",
                  no_args_is_help=True, rich_markup_mode=None)
key_app = typer.Typer(help="A user's SSH public keys.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(key_app, name="key")

ByOpt = Annotated[str | None, typer.Option("--by", metavar="NAME", help=BY_ADMIN_HELP)]
JsonOpt = Annotated[bool, typer.Option("--json", help=JSON_HELP)]
KEY_HELP = ("A public key file (OpenSSH .pub, or PuTTYgen's 'Save public key' file in RFC 4716 form), or the "
            "key text itself in quotes ('ssh-ed25519 AAAA... alice@laptop', as PuTTYgen's 'Public key for "
            "pasting' box shows it).")
KeyArg = Annotated[str, typer.Argument(metavar="KEY", help=KEY_HELP)]


def user_doc(app_: App, name: str) -> dict:
    """The public view of a user: role, state, key fingerprints (never the TOTP secret)."""
    p = get_principal(app_.store, name)
    row = app_.store.get_user(name) or {}
    keys = []
    for k in app_.store.user_keys(name):
        keys.append({"fingerprint": k["fingerprint"], "type": k["public_key"].split(" ", 1)[0],
                     "added_at": k["added_at"]})
    return {"name": p.name, "role": p.role, "company": p.company, "disabled": p.disabled,
            "totp_enrolled": p.totp_enrolled, "created_at": row.get("created_at"), "keys": keys}


def read_key_files(sources: list[str | Path]) -> list[PublicKey]:
    """Parse every public key named by ``sources`` before anything changes: each a file (OpenSSH ``.pub``,
    authorized_keys style, or RFC 4716 as PuTTYgen saves it) or the key text itself.

    :raises UsageError: unreadable or missing file, no key in it, a private key (never echoed), or a line
        or block that is not a public key
    """
    keys: list[PublicKey] = []
    for source in sources:
        label, text = _key_text(str(source))
        try:
            keys.extend(parse_public_keys(text))
        except UsageError as exc:
            raise UsageError(f"{label}: {exc.message}", exc.hint) from None
    return keys


_TEXT_STARTS = ("----", "PuTTY-User-Key-File", "-----BEGIN") + tuple(f"{t} " for t in KEY_TYPES)


def _key_text(source: str) -> tuple[str, str]:
    """(how to name it in errors, its text): a file when one exists by that name, else the key text itself."""
    looks_like_text = "\n" in source or source.lstrip().startswith(_TEXT_STARTS)
    if not looks_like_text and source:
        path = Path(source)
        try:
            is_file, is_dir = path.is_file(), path.is_dir()
        except (OSError, ValueError):  # a name too long for the file system, a NUL byte
            is_file = is_dir = False
        if is_file:
            return str(path), read_text_file(path, what="public key file")
        if is_dir:
            raise UsageError(f"{safe(source[:200])} is a directory", "pass the public key file, e.g. alice.pub")
        if not any(c.isspace() for c in source):
            raise UsageError(f"no such public key file: {safe(source[:200])}",
                             "pass a public key file, or the key text itself in quotes: "
                             "--key 'ssh-ed25519 AAAA... alice@laptop'")
    return "the key text", source


@app.command("add")
def add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME",
                                        help="Login name: lowercase letters, digits, '.', '_' or '-'.")],
    role: Annotated[str, typer.Option("--role", help=f"One of: {', '.join(ROLES)}.")],
    key: Annotated[list[str] | None, typer.Option(
        "--key", metavar="PUBKEY", help=KEY_HELP + " Repeat for several keys.")] = None,
    company: Annotated[str | None, typer.Option("--company", help="The vendor's company.")] = None,
    by: ByOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a user with a role and (optionally) SSH public keys."""
    validate_name(name, what="user name")
    if role not in ROLES:
        raise UsageError(f"role {role!r} is not known", f"use one of: {', '.join(ROLES)}")
    if company is not None and (not company.strip() or len(company) > 200 or safe(company) != company):
        raise UsageError("company must be 1-200 printable characters")
    keys = read_key_files(list(key or []))
    a = open_home(ctx)
    actor = admin_actor(a, by, action="add users")
    now = a.clock.now()
    with a.store.transaction():  # the user and all keys, or nothing
        add_user(a.store, name, role, company, now)
        for k in keys:
            add_user_key(a.store, name, k.line, now)
    a.audit.record("user.created", actor=actor, user=name, source="cli", role=role, company=company)
    for k in keys:
        a.audit.record("user.key.added", actor=actor, user=name, source="cli", fingerprint=k.fingerprint,
                       key_type=k.type)
    doc = user_doc(a, name)
    if as_json:
        emit_json(doc)
        return
    say(f"User {name} created ({role}{', ' + safe(company) if company else ''}) with {len(doc['keys'])} key(s).")
    if not doc["keys"]:
        say(f"Add an SSH key before they can log in: medbroker user key add {name} FILE.pub")


@app.command("list")
def list_(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List users with role, state and key count."""
    a = open_home(ctx)
    docs = [user_doc(a, row["name"]) for row in a.store.list_users()]
    if as_json:
        emit_json({"users": docs})
        return
    print_table(["name", "role", "company", "state", "keys", "totp", "created"],
                ([d["name"], d["role"], d["company"], "disabled" if d["disabled"] else "active", len(d["keys"]),
                  d["totp_enrolled"], when(d["created_at"])] for d in docs), empty="no users yet")


@app.command("show")
def show(ctx: typer.Context, name: Annotated[str, typer.Argument(metavar="NAME", help="User name.")],
         as_json: JsonOpt = False) -> None:
    """Show one user and their key fingerprints."""
    doc = user_doc(open_home(ctx), name)
    if as_json:
        emit_json(doc)
        return
    print_fields([("name", doc["name"]), ("role", doc["role"]), ("company", doc["company"]),
                  ("state", "disabled" if doc["disabled"] else "active"), ("totp", doc["totp_enrolled"]),
                  ("created", when(doc["created_at"]))])
    if not doc["keys"]:
        say("keys:    none")
    for k in doc["keys"]:
        say(f"key:     {k['type']} {k['fingerprint']} (added {when(k['added_at'])})")


def _set_disabled(ctx: typer.Context, name: str, disabled: bool, by: str | None, reason: str | None,
                  as_json: bool) -> None:
    a = open_home(ctx)
    p = get_principal(a.store, name)
    verb = "disable" if disabled else "enable"
    actor = admin_actor(a, by, action=f"{verb} users")
    if reason is not None and (len(reason) > 500 or safe(reason) != reason):
        raise UsageError("the reason must be at most 500 printable characters")
    if p.disabled == disabled:
        raise ConflictError(f"user {name} is already {verb}d", "nothing changed")
    a.store.set_user_disabled(name, disabled)
    a.audit.record(f"user.{verb}d", actor=actor, user=name, source="cli", reason=reason)
    live = a.store.list_sessions(status="live", user=name)
    doc = user_doc(a, name) | {"live_sessions": [s["id"] for s in live]}
    if as_json:
        emit_json(doc)
        return
    say(f"User {name} {verb}d.")
    if disabled and live:
        say(f"{len(live)} live session(s) end within a second; the vendor is told why: " +
            ", ".join(s["id"] for s in live))


def _reason_ok(reason: str | None) -> None:
    if reason is not None and (len(reason) > 500 or safe(reason) != reason):
        raise UsageError("the reason must be at most 500 printable characters")


def _not_directory(a: App, name: str, what: str) -> None:
    """Users mirrored from the directory get their role and keys from it (broker/directory.py)."""
    if (a.store.get_user(name) or {}).get("source") == "directory":
        raise ConflictError(f"{name} comes from the directory, which sets their {what}",
                            "change it in the directory; medbroker follows at the next sync")


@app.command("disable")
def disable(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="User name.")],
    reason: Annotated[str | None, typer.Option("--reason", help="Why (audited).")] = None,
    by: ByOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Disable a user: no more logins, requests, approvals or channels; their live sessions end within a second."""
    _set_disabled(ctx, name, True, by, reason, as_json)


@app.command("enable")
def enable(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="User name.")],
    reason: Annotated[str | None, typer.Option("--reason", help="Why (audited).")] = None,
    by: ByOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Enable a disabled user again."""
    _set_disabled(ctx, name, False, by, reason, as_json)


# KEY may be the key text itself, and RFC 4716 or PEM text starts with '-': click would take it for an
# unknown option and echo it in its error (a pasted private key on the terminal). Pass such words through.
@key_app.command("add", context_settings={"ignore_unknown_options": True})
def key_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="User name.")],
    key: KeyArg,
    by: ByOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Register the public key(s) in KEY (a file or the key text) for a user."""
    keys = read_key_files([key])
    a = open_home(ctx)
    get_principal(a.store, name)
    actor = admin_actor(a, by, action="add user keys")
    for k in keys:
        if a.store.find_key(name, k.fingerprint):
            raise ConflictError(f"key {k.fingerprint} is already registered for {name}", "nothing changed")
    now = a.clock.now()
    with a.store.transaction():
        for k in keys:
            add_user_key(a.store, name, k.line, now)
    for k in keys:
        a.audit.record("user.key.added", actor=actor, user=name, source="cli", fingerprint=k.fingerprint,
                       key_type=k.type)
    if as_json:
        emit_json(user_doc(a, name))
        return
    for k in keys:
        say(f"Key {k.type} {k.fingerprint} added for {name}.")


@app.command("role")
def role_(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="User name.")],
    role: Annotated[str, typer.Argument(metavar="ROLE", help=f"The new role, one of: {', '.join(ROLES)}.")],
    reason: Annotated[str | None, typer.Option("--reason", help="Why (audited).")] = None,
    by: ByOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Change a user's role; their live sessions end within a second (they log in again with the new role)."""
    _reason_ok(reason)
    a = open_home(ctx)
    actor = admin_actor(a, by, action="change roles")
    _not_directory(a, name, "role")
    old = set_user_role(a.store, name, role)
    a.audit.record("user.role.changed", actor=actor, user=name, source="cli", old_role=old, role=role,
                   reason=reason)
    live = a.store.list_sessions(status="live", user=name)
    if as_json:
        emit_json(user_doc(a, name) | {"old_role": old, "ended_sessions": [s["id"] for s in live]})
        return
    say(f"User {name} is now {role} (was {old}).")
    if live:
        say(f"{len(live)} live session(s) end within a second: " + ", ".join(s["id"] for s in live))


@key_app.command("remove")
def key_remove(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="User name.")],
    fingerprint: Annotated[str, typer.Argument(metavar="FINGERPRINT",
                                               help="The key's SHA256:... fingerprint (medbroker user show NAME).")],
    reason: Annotated[str | None, typer.Option("--reason", help="Why (audited).")] = None,
    by: ByOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove a user's key; sessions that logged in with it end within a second."""
    _reason_ok(reason)
    a = open_home(ctx)
    actor = admin_actor(a, by, action="remove user keys")
    _not_directory(a, name, "SSH keys")
    live = [s for s in a.store.list_sessions(status="live", user=name) if s.get("auth_key") == fingerprint]
    remove_user_key(a.store, name, fingerprint)
    a.audit.record("user.key.removed", actor=actor, user=name, source="cli", fingerprint=fingerprint, reason=reason)
    if as_json:
        emit_json(user_doc(a, name) | {"ended_sessions": [s["id"] for s in live]})
        return
    say(f"Key {fingerprint} removed from {name}.")
    if live:
        say(f"{len(live)} live session(s) that logged in with it end within a second: " +
            ", ".join(s["id"] for s in live))
