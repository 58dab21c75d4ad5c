"""The layering table (STYLE.md §1) holds: imports point down, checked with ``ast``; nothing runs at import time."""

from __future__ import annotations

import ast
import functools
import importlib
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Iterable

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("medcore", "broker", "sessions")


@dataclass(frozen=True)
class Row:
    """One row of the layering table: which modules, what they may import."""

    layer: int
    modules: tuple[str, ...]  # repo-relative paths, fnmatch patterns allowed
    may_import: tuple[str, ...]  # names of other rows (a row always may import itself)
    third_party: tuple[str, ...] | None  # allowed top-level packages; None = anything
    why: str


# STYLE.md §1, extended (see the brief of this test): keys at layer 1, app at 3, the web console and
# commands at 5, codecs and stream helpers beside recording at layer 2, layer 0 in medcore/ (broker/errors.py
# and broker/clock.py re-export it). Within a row modules may import each other; the import graph must still
# have no circle, counting every import (checked below). Entries may name modules that do not exist yet
# (sessions/scp.py); a new module that matches no entry fails the test.
TABLE: dict[str, Row] = {
    "core": Row(0, ("medcore/*.py", "broker/errors.py", "broker/config.py", "broker/clock.py", "broker/__init__.py",
                    "sessions/__init__.py", "broker/commands/__init__.py"),
                (), (), "stdlib only (tomllib, dataclasses)"),
    "store": Row(1, ("broker/store/*.py",), ("core",), ("sqlite_utils", "psycopg"), "the only SQL"),
    "keys": Row(1, ("broker/keys.py",), ("core",), ("cryptography",), "key material, sealing, signatures"),
    "domain": Row(2, ("broker/identity.py", "broker/grants.py", "broker/devices.py", "broker/audit.py",
                      "broker/lockout.py", "broker/forwards.py", "broker/cluster.py", "broker/startups.py", "broker/totp.py", "broker/access_links.py", "sessions/policy.py",
                      "sessions/content.py", "sessions/decoders.py", "sessions/entropy.py", "sessions/textforms.py", "sessions/dumps.py",
                      "sessions/exec_check.py",
                      "sessions/cmd_paths.py", "sessions/cmd_lines.py", "sessions/upload_check.py", "sessions/tilde.py"),
                  ("core", "store", "keys", "engine"), (), "pure decisions; never asyncssh or typer"),
    "engine": Row(1, ("sessions/anchors.py", "sessions/fastscan.py"), ("core",), ("hyperscan",),
                  "which of a set of byte patterns occur: Hyperscan when installed, else every one (callers check); "
                  "the deep scanner's byte scans, compiled when built (sessions/_fastscan.c)"),
    "codec": Row(2, ("sessions/sftp_codec.py", "sessions/scp_grammar.py", "sessions/streams.py", "sessions/tlsrecords.py",
                     "broker/proxy_header.py"),
                 ("core", "engine"), (), "SFTP wire format, scp command and records, transfer-protocol stream shapes: stdlib + layer 0"),
    "recording": Row(2, ("sessions/recformat.py", "sessions/recording.py", "sessions/recwriter.py", "sessions/replay.py", "sessions/cmd_index.py",
                         "sessions/textindex.py", "sessions/retention.py", "sessions/htmlexport.py",
                         "sessions/termguard.py", "sessions/shell_lines.py", "sessions/storage.py"),
                     ("core",), ("cryptography", "pyte"), "record format, reader, replay, command index"),
    "export": Row(2, ("broker/siem.py",), ("core",), (), "audit export sinks (JSON lines, syslog)"),
    "objects": Row(2, ("sessions/objectstore.py", "sessions/archived.py"), ("core", "recording"),
                   ("boto3", "botocore"), "S3-compatible object storage, and recordings read from it when archived"),
    "relay": Row(3, ("sessions/relay.py", "sessions/sftp.py", "sessions/scp.py", "sessions/kept_uploads.py",
                    "sessions/sftp_device.py",
                    "sessions/cmd_judge.py", "sessions/shell_guard.py", "sessions/forward.py", "sessions/chanreq.py",
                    "sessions/tailhold.py", "sessions/holds.py", "sessions/tasks.py", "sessions/sessionlog.py"),
                 ("core", "domain", "codec", "recording"), ("asyncssh",), "moves bytes; asks layer 2, never SQL"),
    "app": Row(3, ("broker/app.py",), ("core", "store", "keys", "domain", "codec", "recording", "export", "objects"),
               ("cryptography",),
               "one broker home: config, store, audit, keys"),
    "directory": Row(3, ("broker/directory.py",), ("core", "store", "keys", "domain", "app"), ("ldap3",),
                     "directory accounts (LDAP): lookups, sign-in, mirroring into the store"),
    "ops": Row(3, ("broker/session_ops.py",), ("core", "store", "keys", "domain", "recording", "app"), (),
               "what the CLI and the web both do with a session (look up, end, verify, list live); no asyncssh, "
               "typer or starlette"),
    "journal": Row(3, ("broker/journal.py",), ("core", "store", "recording"), (),
                   "the recording journal: the writer's sink, rebuild, following a journal (issue 13)"),
    "archive": Row(3, ("broker/archive.py",), ("core", "store", "keys", "domain", "recording", "objects", "app",
                                               "journal"), (),
                   "archiving sealed recordings to object storage (one pass, resumable); no asyncssh or typer"),
    "report": Row(3, ("broker/report.py",), ("core", "store", "keys", "domain", "recording", "export"),
                  ("cryptography",), "signed maintenance reports from the store"),
    "evidence": Row(3, ("broker/bundle.py", "broker/evidence.py", "broker/evidence_verify.py"),
                    ("core", "store", "keys", "domain", "recording", "app", "report"), ("cryptography",),
                    "evidence bundles: export chosen sessions as one signed file, verify one with no broker home"),
    "server": Row(4, ("broker/server.py", "broker/listener.py", "broker/live.py", "broker/indexer.py", "broker/selfservice.py",
                      "broker/mfa.py", "broker/keepalive.py", "broker/packetlog.py", "broker/recvsplit.py", "broker/ignorepackets.py",
                      "broker/containment.py", "broker/jump.py", "broker/jumpkeys.py",
                      "broker/sshconfig.py",
                      "broker/session_context.py", "broker/channels.py", "broker/live_forwards.py",
                      "broker/nodes.py", "broker/balancer.py"),
                  ("core", "store", "keys", "domain", "codec", "recording", "export", "relay", "app", "directory",
                   "journal", "archive"),
                  ("asyncssh", "uvloop"),
                  "the asyncssh adapter"),
    "people": Row(5, ("broker/cli.py", "broker/commands/*.py", "broker/demo.py", "broker/serve.py",
                      "broker/workers.py", "broker/web.py", "broker/web_*.py", "broker/health.py", "broker/service.py"),
                  ("core", "store", "keys", "domain", "codec", "recording", "export", "relay", "app", "report",
                   "server", "directory", "ops", "journal", "objects", "archive", "evidence", "engine"), None,
                  "argv, printing, exit codes, HTTP"),
}
NEVER_IN_LAYER_2 = ("asyncssh", "typer")

# Import circles allowed by name, as (importer, imported): the edge is left out before looking for circles.
# Each entry says who removes it; an entry whose import is gone, or that closes no circle, fails the test.
ALLOWED_CIRCLE_EDGES: dict[tuple[str, str], str] = {}


def all_modules(root: Path = REPO, packages: tuple[str, ...] = PACKAGES) -> list[str]:
    return sorted(str(p.relative_to(root)) for pkg in packages for p in (root / pkg).rglob("*.py"))


def row_of(path: str) -> str | None:
    # Exact names win over patterns, so broker/access_links.py is "domain" although broker/web_*.py is "people".
    for name, row in TABLE.items():
        if path in row.modules:
            return name
    for name, row in TABLE.items():
        if any(fnmatch(path, pattern) for pattern in row.modules):
            return name
    return None


def module_path(dotted: str, root: Path = REPO) -> str | None:
    base = root / Path(*dotted.split("."))
    if base.with_suffix(".py").is_file():
        return str(base.with_suffix(".py").relative_to(root))
    if (base / "__init__.py").is_file():
        return str((base / "__init__.py").relative_to(root))
    return None


@dataclass(frozen=True)
class Imp:
    target: str  # dotted name
    line: int
    when: str  # "import": runs when the module is imported; "call": inside a function; "typing": under TYPE_CHECKING


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


@functools.lru_cache(maxsize=None)
def imports_of(path: str, root: Path = REPO) -> tuple[Imp, ...]:
    """Every import in the file, resolved to dotted names: at module level, inside functions and under
    ``if TYPE_CHECKING:`` alike (each marked with when it runs)."""
    tree = ast.parse((root / path).read_text(encoding="utf-8"), filename=path)
    package = path.rsplit("/", 1)[0].replace("/", ".")
    found: list[Imp] = []

    def visit(node: ast.AST, when: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.body:
                    visit_one(sub, "typing")
                for sub in child.orelse:
                    visit_one(sub, when)
                continue
            visit_one(child, when)

    def visit_one(child: ast.AST, when: str) -> None:
        if isinstance(child, ast.Import):
            found.extend(Imp(a.name, child.lineno, when) for a in child.names)
        elif isinstance(child, ast.ImportFrom):
            if child.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - child.level + 1])
                module = f"{base}.{child.module}" if child.module else base
            else:
                module = child.module or ""
            if module == "__future__":
                return
            for alias in child.names:
                sub = f"{module}.{alias.name}"
                # `from broker import access_links` imports a module, not a name.
                found.append(Imp(sub if module_path(sub, root) else module, child.lineno, when))
        inner = "call" if when == "import" and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                   ast.Lambda)) else when
        visit(child, inner)

    visit(tree, "import")
    return tuple(found)


def project_target(imp: Imp, root: Path = REPO, packages: tuple[str, ...] = PACKAGES) -> str | None:
    return module_path(imp.target, root) if imp.target.split(".")[0] in packages else None


def third_party(imp: Imp) -> str | None:
    top = imp.target.split(".")[0]
    if top in PACKAGES or top in sys.stdlib_module_names:
        return None
    return top


def import_graph(root: Path = REPO, packages: tuple[str, ...] = PACKAGES) -> dict[str, dict[str, list[Imp]]]:
    """module -> {imported module: the imports that name it}, counting every import (see :func:`imports_of`)."""
    graph: dict[str, dict[str, list[Imp]]] = {}
    for module in all_modules(root, packages):
        edges: dict[str, list[Imp]] = {}
        for imp in imports_of(module, root):
            target = project_target(imp, root, packages)
            if target is not None and target != module:
                edges.setdefault(target, []).append(imp)
        graph[module] = edges
    return graph


def find_circles(graph: dict[str, dict[str, list[Imp]]],
                 allowed: Iterable[tuple[str, str]] = ()) -> list[list[str]]:
    """The import circles: groups of modules that reach each other (strongly connected components of two or
    more), each sorted; ``allowed`` (importer, imported) edges are left out first."""
    skip = set(allowed)
    succ = {m: sorted(t for t in edges if (m, t) not in skip) for m, edges in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def connect(node: str) -> None:  # Tarjan
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in succ.get(node, []):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    for node in sorted(succ):
        if node not in index:
            connect(node)
    return sorted(circles)


def describe_circle(graph: dict[str, dict[str, list[Imp]]], circle: list[str]) -> str:
    """Each import that ties the circle, ``module:line imports name (in a function)``."""
    kinds = {"import": "at import time", "call": "in a function", "typing": "under TYPE_CHECKING"}
    ties = sorted({(m, i.line, t, i.when) for m in circle for t, imps in graph[m].items() if t in circle for i in imps})
    return f"circle of {len(circle)} modules: " + "; ".join(f"{m}:{line} imports {t} ({kinds[when]})"
                                                           for m, line, t, when in ties)


MODULES = all_modules()


# ---------------------------------------------------------------- the table


def test_every_module_is_in_the_table() -> None:
    unknown = [m for m in MODULES if row_of(m) is None]
    assert not unknown, (
        f"modules missing from the layering table: {', '.join(unknown)}. Add each to TABLE in "
        "tests/test_layering.py (and to STYLE.md §1 if it starts a new kind of module) so the table stays complete."
    )


def test_rows_only_import_lower_or_equal_layers() -> None:
    for name, row in TABLE.items():
        for other in row.may_import:
            assert TABLE[other].layer <= row.layer, f"{name} may import {other}, which is above it"


@pytest.mark.parametrize("module", MODULES)
def test_imports_point_down(module: str) -> None:
    name = row_of(module)
    if name is None:
        pytest.fail(f"{module} is not in the layering table; add it to TABLE in tests/test_layering.py")
    row = TABLE[name]
    allowed = set(row.may_import) | {name}
    problems = []
    for imp in imports_of(module):
        target = project_target(imp)
        if target is not None:
            target_row = row_of(target)
            if target_row not in allowed:
                problems.append(f"{module}:{imp.line} imports {imp.target} (row {target_row!r}, layer "
                                f"{TABLE[target_row].layer if target_row else '?'}); row {name!r} (layer {row.layer}) "
                                f"may import only {sorted(allowed)}")
            continue
        pkg = third_party(imp)
        if pkg is not None and row.third_party is not None and pkg not in row.third_party:
            problems.append(f"{module}:{imp.line} imports {pkg}; row {name!r} (layer {row.layer}) may use only "
                            f"{list(row.third_party) or 'the standard library'} ({row.why})")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("module", [m for m in MODULES if row_of(m) and TABLE[row_of(m)].layer <= 2])
def test_lower_layers_never_import_asyncssh_or_typer(module: str) -> None:
    bad = [f"{module}:{i.line} imports {i.target}" for i in imports_of(module) if third_party(i) in NEVER_IN_LAYER_2]
    assert not bad, "\n".join(bad)


def test_no_import_circles() -> None:
    """No two modules import each other, directly or round a longer loop, by any import: at module level,
    inside a function or under TYPE_CHECKING (a lazy import hides a circle from Python, not from a reader)."""
    graph = import_graph()
    circles = find_circles(graph, ALLOWED_CIRCLE_EDGES)
    assert not circles, (
        "import circles (break each by moving what both sides need into a lower module, or pass it in as a "
        "value; ALLOWED_CIRCLE_EDGES is for a circle someone is already removing):\n"
        + "\n".join(describe_circle(graph, c) for c in circles))


def test_allowed_circle_edges_still_exist_and_close_a_circle() -> None:
    """An allow-list entry whose import is gone, or that no longer closes a circle, is stale: delete it."""
    graph = import_graph()
    stale = [f"{a} -> {b} ({why})" for (a, b), why in ALLOWED_CIRCLE_EDGES.items()
             if b not in graph.get(a, {}) or not any(a in c and b in c for c in find_circles(graph))]
    assert not stale, "stale entries in ALLOWED_CIRCLE_EDGES, delete them: " + "; ".join(stale)


def test_packages_import_one_way() -> None:
    """medcore <- sessions <- broker: layer 0 lives in medcore/, so sessions/ using errors and clocks draws no
    arrow back up into broker/."""
    graph = import_graph()
    packages = {m.split("/")[0]: {} for m in graph}  # type: dict[str, dict[str, list[Imp]]]
    for module, edges in graph.items():
        for target, imps in edges.items():
            if target.split("/")[0] != module.split("/")[0]:
                packages[module.split("/")[0]].setdefault(target.split("/")[0], []).extend(imps)
    circles = find_circles(packages)
    assert not circles, "\n".join(
        f"package circle {' <-> '.join(c)}: " + "; ".join(
            f"{p}/… imports {i.target}:{i.line}" for p in c for t, imps in packages[p].items() if t in c for i in imps)
        for c in circles)
    assert set(packages["medcore"]) == set() and set(packages["sessions"]) <= {"medcore"}


@pytest.mark.parametrize("name", ["errors", "clock"])
def test_broker_reexports_layer_0_whole(name: str) -> None:
    """``from broker.errors import X`` (and broker.clock) keeps working for every name medcore defines: the same
    objects, so ``except broker.errors.BrokerError`` catches what sessions/ raises."""
    core, broker = importlib.import_module(f"medcore.{name}"), importlib.import_module(f"broker.{name}")
    assert sorted(broker.__all__) == sorted(core.__all__)
    assert all(getattr(broker, n) is getattr(core, n) for n in core.__all__)


# ---------------------------------------------------------------- the checker itself


def test_checker_sees_imports_in_every_form(tmp_path: Path) -> None:
    """Guard against a checker that silently finds nothing."""
    assert "broker/store/__init__.py" in {project_target(i) for i in imports_of("broker/audit.py")}
    assert row_of("broker/store/__init__.py") == row_of("broker/store/base.py") == "store"
    assert "cryptography" in {third_party(i) for i in imports_of("broker/keys.py")}
    grants_targets = {project_target(i) for i in imports_of("broker/grants.py")}
    assert {"broker/audit.py", "broker/identity.py", "broker/errors.py"} <= grants_targets
    lazy = [i for i in imports_of("broker/web_views.py") if project_target(i) == "broker/directory.py"]
    assert lazy and lazy[0].when == "call"
    typing_only = [i for i in imports_of("broker/session_context.py") if project_target(i) == "broker/app.py"]
    assert "typing" in {i.when for i in typing_only}
    assert "broker/server.py" not in {project_target(i) for i in imports_of("broker/live.py")}  # item 1: one way
    assert row_of("broker/access_links.py") == "domain" and row_of("broker/web_views.py") == "people"
    assert row_of("broker/commands/grants.py") == "people" and row_of("broker/nothing.py") is None


def test_circle_check_reports_a_circle_made_on_purpose(tmp_path: Path) -> None:
    """The circle check itself works: circles closed at import time, inside a function and under TYPE_CHECKING
    are each reported, and an allow-listed edge removes only its own circle."""
    pkg = tmp_path / "circ"
    pkg.mkdir()
    files = {
        "__init__.py": "",
        "a.py": "from circ.b import thing\n",
        "b.py": "def thing():\n    from circ import a\n    return a\n",
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from circ.d import D\n",
        "d.py": "from circ import e\nclass D: ...\n",
        "e.py": "import circ.c\n",
        "leaf.py": "import os\n",
        "top.py": "from circ import a, leaf\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = import_graph(tmp_path, ("circ",))
    assert graph["circ/b.py"] == {"circ/a.py": [Imp("circ.a", 2, "call")]}
    circles = find_circles(graph)
    assert circles == [["circ/a.py", "circ/b.py"], ["circ/c.py", "circ/d.py", "circ/e.py"]]
    assert "circ/c.py:3 imports circ/d.py (under TYPE_CHECKING)" in describe_circle(graph, circles[1])
    assert find_circles(graph, [("circ/b.py", "circ/a.py")]) == [["circ/c.py", "circ/d.py", "circ/e.py"]]
    assert find_circles(graph, [("circ/b.py", "circ/a.py"), ("circ/e.py", "circ/c.py")]) == []


# ---------------------------------------------------------------- nothing runs at import time

_PROBE = textwrap.dedent("""
    import importlib, json, logging, os, signal, sys, threading
    names, deps = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    for dep in deps:  # third-party packages first: their own import-time threads (numpy's) are not ours
        try:
            importlib.import_module(dep)
        except Exception:
            pass
    sigs = [s for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGPIPE)]
    def state():
        return {
            "threads": sorted(t.name for t in threading.enumerate()),
            "os_threads": len(os.listdir("/proc/self/task")),
            "signals": [str(signal.getsignal(s)) for s in sigs],
            "root_handlers": len(logging.getLogger().handlers),
            "root_level": logging.getLogger().level,
            "argv": list(sys.argv),
            "cwd_files": sorted(os.listdir(".")),
            "home_files": sorted(os.listdir(os.environ["HOME"])),
            "umask": os.umask(os.umask(0o022)),
        }
    before = state()
    failed = {}
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # reported, not hidden
            failed[name] = f"{type(exc).__name__}: {exc}"
    after = state()
    print("@@" + json.dumps({"before": before, "after": after, "failed": failed}))
""")


def test_importing_every_module_has_no_side_effects(tmp_path: Path) -> None:
    cwd, home = tmp_path / "cwd", tmp_path / "home"
    cwd.mkdir()
    home.mkdir()
    names = [m[:-3].replace("/", ".").removesuffix(".__init__") for m in MODULES]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDBROKER_")}
    env.update(HOME=str(home), PYTHONPATH=str(REPO), MEDBROKER_HOME=str(tmp_path / "no-such-home"),
               PYTHONDONTWRITEBYTECODE="1")
    deps = sorted({p for m in MODULES for i in imports_of(m) if (p := third_party(i))})
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(names), json.dumps(deps)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out, _, report = proc.stdout.rpartition("@@")
    assert out == "", f"importing printed to stdout: {out!r}"
    assert proc.stderr == "", f"importing wrote to stderr: {proc.stderr!r}"
    data = json.loads(report)
    assert data["failed"] == {}, "modules that do not import: " + json.dumps(data["failed"], indent=1)
    before, after = data["before"], data["after"]
    for key in before:
        assert after[key] == before[key], f"importing every module changed {key}: {before[key]!r} -> {after[key]!r}"
    assert not (tmp_path / "no-such-home").exists()
    assert list(cwd.iterdir()) == [] and list(home.iterdir()) == []


def test_the_import_probe_notices_side_effects(tmp_path: Path) -> None:
    """The probe itself works: a module that starts a thread and writes a file at import is caught."""
    pkg = tmp_path / "sidefx"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import threading, time, signal\n"
                                     "threading.Thread(target=time.sleep, args=(0.5,), daemon=True).start()\n"
                                     "open('made-at-import', 'w').close()\n"
                                     "signal.signal(signal.SIGTERM, lambda *a: None)\n")
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(["sidefx"]), "[]"], cwd=tmp_path,
                          env={**os.environ, "HOME": str(tmp_path), "PYTHONPATH": str(tmp_path)},
                          capture_output=True, text=True, timeout=60)
    data = json.loads(proc.stdout.rpartition("@@")[2])
    changed = {k for k in data["before"] if data["before"][k] != data["after"][k]}
    assert {"threads", "os_threads", "signals", "cwd_files"} <= changed
