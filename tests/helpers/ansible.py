"""Run real Ansible (ansible-core from PyPI: the ``ansible`` ad-hoc command) against the broker, bounded.

The vendor's view: an inventory host whose ``ansible_host``/``ansible_port`` is the broker, whose
``ansible_user`` is the routing login (``alice@ct-01``), with the vendor's private key and a pinned
known_hosts file. Everything Ansible reads from the environment is hermetic (its own empty ANSIBLE_CONFIG,
its own ANSIBLE_HOME, no ControlMaster: a ControlPersist master would outlive the test).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from helpers.clients import ProcResult, run_command

__all__ = ["AnsibleResult", "AnsibleTarget", "ansible_available", "build_module_payloads", "result_text", "run_ansible",
           "run_playbook"]

DEVICE_PYTHON = "/usr/bin/python3"
_HOST = "ct01"


def ansible_available() -> bool:
    """True when the ``ansible`` and ``ansible-playbook`` programs are installed (the test extra)."""
    return shutil.which("ansible") is not None and shutil.which("ansible-playbook") is not None


@dataclass(frozen=True)
class AnsibleTarget:
    """Where and as whom Ansible connects: the broker's address, the routing login and the vendor's key.

    ``transfer`` is the ssh connection plugin's ``ssh_transfer_method`` (``smart`` = Ansible's default:
    sftp, then scp; ``sftp``, ``scp``, ``piped``); ``pipelining`` sends modules on the stdin of
    ``/bin/sh -c 'python3 && sleep 0'`` instead of uploading a file.
    """

    host: str
    port: int
    user: str
    key: Path
    known_hosts: Path
    transfer: str = "smart"
    pipelining: bool = False

    def inventory(self) -> str:
        return f"[devices]\n{self.host_line()}\n"

    def host_line(self, name: str = _HOST) -> str:
        """This target as one inventory line for host ``name``."""
        ssh_args = (f"-F /dev/null -o UserKnownHostsFile={self.known_hosts} -o GlobalKnownHostsFile=/dev/null "
                    "-o StrictHostKeyChecking=yes -o IdentitiesOnly=yes -o IdentityAgent=none -o BatchMode=yes "
                    "-o ConnectTimeout=10")
        fields = {
            "ansible_host": self.host, "ansible_port": str(self.port), "ansible_user": self.user,
            "ansible_connection": "ssh", "ansible_ssh_private_key_file": str(self.key),
            "ansible_python_interpreter": DEVICE_PYTHON, "ansible_ssh_common_args": ssh_args,
            "ansible_ssh_transfer_method": self.transfer,
            "ansible_ssh_pipelining": "true" if self.pipelining else "false",
            "ansible_pipelining": "true" if self.pipelining else "false",
        }
        return f"{name} " + " ".join(f"{k}={shlex.quote(v)}" for k, v in fields.items())


@dataclass(frozen=True)
class AnsibleResult:
    """One Ansible run: exit status, raw output, and the host's task result (``result``)."""

    returncode: int
    stdout: bytes
    stderr: bytes
    result: dict[str, Any]

    @property
    def failed(self) -> bool:
        return bool(self.result.get("failed") or self.result.get("unreachable")) or self.returncode != 0

    @property
    def text(self) -> str:
        """Everything the vendor saw (stdout and stderr) as text."""
        return (self.stdout + self.stderr).decode("utf-8", "replace")


def _environment(scratch: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("ANSIBLE_") and k not in ("SSH_AUTH_SOCK", "DISPLAY")}
    env.update(
        ANSIBLE_CONFIG=str(scratch / "ansible.cfg"), ANSIBLE_HOME=str(scratch / "home"),
        ANSIBLE_LOCAL_TEMP=str(scratch / "tmp"),
        ANSIBLE_HOST_KEY_CHECKING="True", ANSIBLE_SSH_ARGS="-o ControlMaster=no -o ControlPath=none",
        ANSIBLE_SSH_RETRIES="0", ANSIBLE_TIMEOUT="20", ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0",
        ANSIBLE_RETRY_FILES_ENABLED="False", ANSIBLE_GATHERING="explicit", ANSIBLE_DEPRECATION_WARNINGS="False",
        ANSIBLE_SYSTEM_WARNINGS="False",
        ANSIBLE_LOCALHOST_WARNING="False", ANSIBLE_INVENTORY_UNPARSED_WARNING="False",
        # keep the module's temp dir under the login's home (the device tree), as on a device
        ANSIBLE_REMOTE_TMP="~/.ansible/tmp",
    )
    return env


def run_ansible(target: AnsibleTarget, module: str, args: str | Mapping[str, Any] = "", *, timeout: float = 120.0,
                extra: Sequence[str] = ()) -> AnsibleResult:
    """``ansible ct01 -m MODULE -a ARGS -t DIR`` against ``target``; bounded by ``timeout``.

    ansible-core ships no JSON stdout callback; the ``tree`` callback (``-t``) writes the host's result as
    JSON into a directory, which is what ``result`` holds.

    :param args: ``key=value`` text, or a mapping (passed as JSON, so paths with spaces survive)
    :return: the run; ``result`` is the module's JSON reply as Ansible reports it (``{}`` when none)
    """
    if not isinstance(args, str):
        args = json.dumps(dict(args))
    scratch = Path(tempfile.mkdtemp(prefix="mbansible-"))
    try:
        inventory = scratch / "inventory.ini"
        inventory.write_text(target.inventory())
        (scratch / "ansible.cfg").write_text("[defaults]\n")  # nothing from /etc/ansible or ~/.ansible.cfg
        argv = [shutil.which("ansible") or "ansible", "-i", str(inventory), _HOST, "-m", module,
                *(["-a", args] if args else []), "-t", str(scratch / "tree"), *extra]
        rc, out, err = run_command(argv, timeout=timeout, env=_environment(scratch))
        tree = scratch / "tree" / _HOST
        try:
            result = json.loads(tree.read_text()) if tree.exists() else {}
        except ValueError:
            result = {"unparsed": tree.read_text(errors="replace")}
        return AnsibleResult(rc, out, err, result)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run_playbook(targets: Mapping[str, AnsibleTarget], tasks: Sequence[Mapping[str, Any]], *,
                 timeout: float = 180.0) -> ProcResult:
    """``ansible-playbook`` with one play of ``tasks`` on every host of ``targets`` (name -> target), in
    parallel (one fork per host); bounded by ``timeout``. Task results are in the output (``-v``)."""
    scratch = Path(tempfile.mkdtemp(prefix="mbansible-"))
    try:
        inventory = scratch / "inventory.ini"
        inventory.write_text("[devices]\n" + "".join(t.host_line(n) + "\n" for n, t in targets.items()))
        (scratch / "ansible.cfg").write_text("[defaults]\n")
        play = [{"hosts": "devices", "gather_facts": False, "tasks": list(tasks)}]
        (scratch / "play.yml").write_text(json.dumps(play))
        env = _environment(scratch)
        env["ANSIBLE_FORKS"] = str(max(1, len(targets)))
        return run_command([shutil.which("ansible-playbook") or "ansible-playbook", "-i", str(inventory),
                            str(scratch / "play.yml")], timeout=timeout, env=env)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def result_text(result: AnsibleResult) -> str:
    """The vendor's whole view of a run: output plus the parsed result, for 'never appears' assertions."""
    return result.text + json.dumps(result.result)



def build_module_payloads(scratch: Path, tasks: Sequence[tuple[str, Mapping[str, Any]]], *,
                          timeout: float = 180.0) -> dict[str, bytes]:
    """The exact ``AnsiballZ_<module>.py`` files Ansible would upload for ``tasks``, built by running them
    once on this machine (``connection: local``, ANSIBLE_KEEP_REMOTE_FILES); one task per module name.

    :return: module name -> the wrapper's bytes
    """
    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / "ansible.cfg").write_text("[defaults]\n")
    play = [{"hosts": "localhost", "gather_facts": False, "connection": "local",
             "vars": {"ansible_python_interpreter": DEVICE_PYTHON},
             "tasks": [{"name": m, m: dict(a), "ignore_errors": True} for m, a in tasks]}]
    (scratch / "play.yml").write_text(json.dumps(play))
    env = _environment(scratch)
    env.update(ANSIBLE_KEEP_REMOTE_FILES="1", ANSIBLE_REMOTE_TMP=str(scratch / "kept"))
    run_command([shutil.which("ansible-playbook") or "ansible-playbook", "-i", "localhost,",
                 str(scratch / "play.yml")], timeout=timeout, env=env)
    return {p.name[len("AnsiballZ_"):-3]: p.read_bytes() for p in (scratch / "kept").rglob("AnsiballZ_*.py")}
