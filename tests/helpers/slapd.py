"""A real OpenLDAP ``slapd`` (Debian's package) on 127.0.0.1, one per test session, for [directory] tests.

The directory: ``dc=hospital,dc=test`` with ``ou=people`` (inetOrgPerson + the OpenSSH LPK ``sshPublicKey``
attribute, whose schema is written here because Debian does not ship it) and ``ou=groups``
(``groupOfNames``: MedBroker-Admins, -Security, -Approvers, -Vendors). Tests add people with unique names
through :meth:`Slapd.add_person` and change group membership, so they never depend on each other.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from helpers.net import free_port

__all__ = ["Slapd", "BASE", "GROUPS", "slapd_binary"]

BASE = "dc=hospital,dc=test"
ROOT_DN = f"cn=admin,{BASE}"
ROOT_PW = "root-secret-for-tests"
GROUPS = {role: f"cn=MedBroker-{title},ou=groups,{BASE}" for role, title in
          (("admin", "Admins"), ("security", "Security"), ("approver", "Approvers"), ("vendor", "Vendors"))}
SERVICE_DN = f"cn=medbroker,ou=services,{BASE}"
SERVICE_PW = "service-secret-for-tests"

_LPK_SCHEMA = """attributetype ( 1.3.6.1.4.1.24552.500.1.1.1.13 NAME 'sshPublicKey'
  DESC 'OpenSSH public key' EQUALITY octetStringMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.40 )
objectclass ( 1.3.6.1.4.1.24552.500.1.1.2.0 NAME 'ldapPublicKey' SUP top AUXILIARY
  DESC 'OpenSSH LPK objectclass' MAY ( sshPublicKey $ uid ) )
"""


def slapd_binary() -> str | None:
    return shutil.which("slapd") or ("/usr/sbin/slapd" if os.access("/usr/sbin/slapd", os.X_OK) else None)


class Slapd:
    """A throwaway slapd; ``url``, ``add_person``, ``set_groups``, ``remove``, ``stop``."""

    def __init__(self) -> None:
        binary = slapd_binary()
        if binary is None:
            raise RuntimeError("slapd is not installed; run scripts/install.sh")
        self.dir = Path(tempfile.mkdtemp(prefix="medbroker-slapd-"))
        (self.dir / "db").mkdir()
        (self.dir / "lpk.schema").write_text(_LPK_SCHEMA)
        (self.dir / "slapd.conf").write_text("\n".join([
            *(f"include /etc/ldap/schema/{s}.schema" for s in ("core", "cosine", "inetorgperson", "nis")),
            f"include {self.dir / 'lpk.schema'}",
            "modulepath /usr/lib/ldap", "moduleload back_mdb",
            f"pidfile {self.dir / 'slapd.pid'}",
            "database mdb", f'suffix "{BASE}"', f'rootdn "{ROOT_DN}"', f"rootpw {ROOT_PW}",
            f"directory {self.dir / 'db'}", "maxsize 33554432",
            # people bind as themselves; the service account reads; nobody else reads anything
            f'access to attrs=userPassword by self auth by anonymous auth by * none',
            f'access to * by dn.exact="{SERVICE_DN}" read by self read by * none',
        ]) + "\n")
        self.port = free_port()
        self.url = f"ldap://127.0.0.1:{self.port}"
        self.log = open(self.dir / "slapd.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([binary, "-f", str(self.dir / "slapd.conf"), "-h", f"{self.url}/", "-d", "0"],
                                     stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            self._wait_up()
            self._seed()
        except BaseException:
            self.stop()
            raise

    def _admin(self):
        import ldap3

        conn = ldap3.Connection(ldap3.Server(self.url, get_info=ldap3.NONE, connect_timeout=5), user=ROOT_DN,
                                password=ROOT_PW, raise_exceptions=True, receive_timeout=10)
        try:
            conn.bind()
        except BaseException:  # ldap3 keeps the socket of a failed connect open (slapd not listening yet)
            if conn.socket is not None:
                conn.socket.close()
            raise
        return conn

    def _wait_up(self) -> None:
        deadline = time.monotonic() + 20
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"slapd exited: {(self.dir / 'slapd.log').read_text(errors='replace')[-2000:]}")
            try:
                self._admin().unbind()
                return
            except Exception as exc:  # noqa: BLE001 - not listening yet
                last = exc
                time.sleep(0.1)
        raise RuntimeError(f"slapd did not answer within 20 s (last: {last!r})")

    def _seed(self) -> None:
        conn = self._admin()
        try:
            conn.add(BASE, ["dcObject", "organization"], {"dc": "hospital", "o": "Test Hospital"})
            for ou in ("people", "groups", "services"):
                conn.add(f"ou={ou},{BASE}", ["organizationalUnit"], {"ou": ou})
            conn.add(SERVICE_DN, ["simpleSecurityObject", "organizationalRole"],
                     {"cn": "medbroker", "userPassword": SERVICE_PW})
            for dn in GROUPS.values():  # groupOfNames needs a member: the service account holds the place
                conn.add(dn, ["groupOfNames"], {"cn": dn.split(",")[0][3:], "member": [SERVICE_DN]})
        finally:
            conn.unbind()

    def dn(self, name: str) -> str:
        return f"uid={name},ou=people,{BASE}"

    def add_person(self, name: str, password: str, *, roles: tuple[str, ...] = (), keys: tuple[str, ...] = (),
                   company: str | None = None) -> str:
        conn = self._admin()
        try:
            attrs = {"uid": name, "cn": name, "sn": name, "userPassword": password}
            classes = ["inetOrgPerson"]
            if keys:
                classes.append("ldapPublicKey")
                attrs["sshPublicKey"] = list(keys)
            if company:
                attrs["o"] = company
            conn.add(self.dn(name), classes, attrs)
        finally:
            conn.unbind()
        self.set_groups(name, roles)
        return self.dn(name)

    def set_groups(self, name: str, roles: tuple[str, ...]) -> None:
        import ldap3

        conn = self._admin()
        try:
            for role, group in GROUPS.items():
                op = ldap3.MODIFY_ADD if role in roles else ldap3.MODIFY_DELETE
                try:
                    conn.modify(group, {"member": [(op, [self.dn(name)])]})
                except ldap3.core.exceptions.LDAPException:
                    pass  # adding a present member or deleting an absent one
        finally:
            conn.unbind()

    def remove(self, name: str) -> None:
        self.set_groups(name, ())
        conn = self._admin()
        try:
            conn.delete(self.dn(name))
        finally:
            conn.unbind()

    def config(self, secret_file: Path, **extra: str) -> str:
        """A [directory] section for broker.toml that points here (the service password goes to secret_file)."""
        secret_file.write_text(SERVICE_PW + "\n")
        lines = {"url": f'"{self.url}"', "bind_dn": f'"{SERVICE_DN}"', "bind_password_file": f'"{secret_file}"',
                 "user_base": f'"ou=people,{BASE}"', "admin_group": f'"{GROUPS["admin"]}"',
                 "security_group": f'"{GROUPS["security"]}"', "approver_group": f'"{GROUPS["approver"]}"',
                 "vendor_group": f'"{GROUPS["vendor"]}"', "ssh_key_attribute": '"sshPublicKey"'} | extra
        return "[directory]\n" + "".join(f"{k} = {v}\n" for k, v in lines.items())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
