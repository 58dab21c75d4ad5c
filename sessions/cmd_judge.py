"""Commands resolved like files: judge a command line with the device's own realpath before it runs.

The lexical check (sessions/exec_check.py) runs first. Then every path word :func:`analyze_command` found
is resolved on the device through an SFTP session, as the SFTP filter resolves its paths, so a symlink
into a protected tree (``service/latest.dcm -> ../data/dicom/...``, a linked directory) is refused like
the tree itself. Patterns are expanded against the device's directory listing, each match resolved.
With ``strict`` (a device whose login can read patient data) a command that builds paths at run time is
refused too. docs/data-protection.md, "Commands resolved like files".
"""

from __future__ import annotations

import asyncio
import fnmatch
from typing import Awaitable, Callable

import asyncssh

from sessions.cmd_paths import CommandPaths, PathWord, analyze_command
from sessions.exec_check import check_command_line
from sessions.policy import Decision, ProtectedPaths, normalize_path

__all__ = ["DevicePaths", "judge_command", "JUDGE_TIMEOUT_S", "MAX_LISTINGS", "MAX_ENTRIES"]

JUDGE_TIMEOUT_S = 10.0  # a device that does not answer in time: the command is refused (fail closed)
MAX_LISTINGS = 1024  # directories a pattern may make medbroker list on the device (exposed: more is refused)
MAX_ENTRIES = 50_000  # directory entries looked at for one pattern
MAX_WALK = 4096  # entries looked at below a directory a recursive command is given, looking for links
_WALK_DEPTH = 12
_MAX_GLOB_DEPTH = 4
_HINT = "Ask the hospital's biomedical engineer if you need a de-identified export."


class DevicePaths:
    """The device's own view of paths, on a second SFTP session of the device login (started on first use).

    Relative paths count from the login's home, where sshd also starts commands and shells.

    :param start_client: ``await start_client()`` -> an ``asyncssh.SFTPClient``
    """

    def __init__(self, start_client: Callable[[], Awaitable[asyncssh.SFTPClient]]) -> None:
        self._start = start_client
        self._client: asyncssh.SFTPClient | None = None
        self._lock = asyncio.Lock()
        self.round_trips = 0

    async def _sftp(self) -> asyncssh.SFTPClient:
        async with self._lock:
            if self._client is None:
                self._client = await self._start()
            return self._client

    async def realpath(self, path: str) -> str:
        """The canonical path (``~`` = the login's home). :raises asyncssh.SFTPError: as the device answers"""
        sftp = await self._sftp()
        self.round_trips += 1
        return normalize_path((await sftp.realpath(_wire(path))).decode("utf-8", "surrogateescape"))

    async def readlink(self, path: str) -> str:
        """A symlink's target. :raises asyncssh.SFTPError: not a link, or as the device answers"""
        sftp = await self._sftp()
        self.round_trips += 1
        return (await sftp.readlink(_wire(path))).decode("utf-8", "surrogateescape")

    async def scandir(self, path: str) -> list[tuple[str, str]]:
        """(name, kind) in a directory, kind ``dir``, ``link`` or ``other``. :raises asyncssh.SFTPError:"""
        sftp = await self._sftp()
        self.round_trips += 1
        out = []
        for entry in await sftp.readdir(_wire(path)):
            name = entry.filename.decode("utf-8", "surrogateescape") if isinstance(entry.filename, bytes) \
                else entry.filename
            if name in (".", ".."):
                continue
            kind = {asyncssh.FILEXFER_TYPE_DIRECTORY: "dir", asyncssh.FILEXFER_TYPE_SYMLINK: "link"}.get(
                entry.attrs.type, "other")
            out.append((name, kind))
        return out

    async def listdir(self, path: str) -> list[str]:
        """Names in a directory. :raises asyncssh.SFTPError: as the device answers"""
        sftp = await self._sftp()
        self.round_trips += 1
        names = await sftp.listdir(_wire(path))
        return [n.decode("utf-8", "surrogateescape") for n in names if n not in (b".", b"..")]

    def close(self) -> None:
        if self._client is not None:
            self._client.exit()
            self._client = None


def _wire(path: str) -> bytes:
    if path == "~":
        path = "."
    elif path.startswith("~/"):
        path = path[2:] or "."
    return path.encode("utf-8", "surrogateescape")


async def resolve(device: DevicePaths, path: str, depth: int = 0) -> str:
    """The device's canonical form of ``path``. When the device's realpath fails (a missing or unreadable
    component, e.g. a link into a directory the login cannot enter), the parent is resolved the same way
    and the last component is followed with readlink if it is a symlink, else appended as it is."""
    try:
        return await device.realpath(path)
    except asyncssh.SFTPError:
        pass
    stripped = path.rstrip("/")
    parent, _, base = stripped.rpartition("/")
    if depth > 32 or not stripped or stripped in ("~", ".") or base == "":
        return normalize_path(stripped.lstrip("~") or "/")
    if not parent:
        parent = "/" if stripped.startswith("/") else "."
    canonical = await resolve(device, parent, depth + 1)
    if base in (".", ".."):
        return normalize_path(base, canonical)
    joined = normalize_path(base, canonical)
    try:
        target = await device.readlink(joined)
    except asyncssh.SFTPError:
        return joined
    return await resolve(device, target if target.startswith("/") else canonical.rstrip("/") + "/" + target,
                         depth + 4)


async def judge_command(command: str, protected: ProtectedPaths, device: DevicePaths, *, strict: bool,
                        lexical: bool = True,
                        judge_scripts: Callable[[list[str]], Awaitable[str | None]] | None = None,
                        shell: dict | None = None) -> Decision:
    """Decide a command line: lexical check, then each path word resolved on the device.

    :param command: the exec command, or a command line read off an interactive shell's screen
    :param protected: the device's protected paths
    :param device: the device's realpath/listdir
    :param strict: refuse commands that build paths at run time (the device's login can read patient data)
    :param lexical: run sessions/exec_check.py's check first (off when the caller already did)
    :param judge_scripts: ``await judge_scripts(canonical_paths) -> refusal or None`` for the scripts the
        command runs (``sh x.sh``, ``python3 x.py``, ``./x``, ``. x``): the seam for inspecting uploaded
        content; without it scripts are judged as paths only
    :param shell: an interactive shell's state across lines (``{"cwds": (...)}``): the line starts where
        earlier allowed lines may have left the shell (``cd``), and an allowed line updates it
    :return: a :class:`Decision` (``exec.denied`` when refused)
    :raises asyncssh.Error, OSError: the device could not answer (callers refuse: fail closed)
    """
    if lexical:
        decision = check_command_line(command, protected, None)
        if not decision.allowed:
            return decision
    found: CommandPaths = analyze_command(command, protected, *([shell["cwds"]] if shell and shell.get("cwds") else []))
    if found.runtime and found.runtime.startswith("medbroker could not follow") and not found.paths:
        return _deny(f"{found.runtime}; medbroker resolves every path a command names before it runs. Split it "
                     "into shorter commands.", "")
    if strict and found.runtime:
        return _deny(f"{found.runtime}. On {protected.device}, whose maintenance login can read patient data, "
                     "medbroker refuses commands whose paths are only known when they run; write the paths out.",
                     "")
    results = await asyncio.gather(*(_judge_word(w, protected, device, strict) for w in found.paths))
    hit = next((r for r in results if r is not None), None)
    if hit:
        return hit
    if judge_scripts is not None and found.scripts:
        scripts = [await resolve(device, s if s.startswith(("/", "~")) else "~/" + s) for s in found.scripts]
        reason = await judge_scripts(scripts)
        if reason:
            return _deny(reason, scripts[0])
    if shell is not None:
        shell["cwds"] = found.cwds
    return Decision(True, "", "exec.allowed", "exec")


async def _judge_word(word: PathWord, protected: ProtectedPaths, device: DevicePaths, strict: bool) -> Decision | None:
    hit = await _judge_one(word, protected, device, strict)
    if hit is None and word.recursive and strict and not word.glob:
        hit = await _judge_tree(word, await resolve(device, word.path), protected, device)
    return hit


async def _judge_tree(word: PathWord, top: str, protected: ProtectedPaths, device: DevicePaths) -> Decision | None:
    """A directory a recursive command walks: every symlink below it is resolved (bounded), since ``find -L``,
    ``grep -R``, ``tar h`` or ``find ... -exec cat {}`` read what the links point to."""
    todo, seen = [top], 0
    depth = 0
    while todo and depth < _WALK_DEPTH:
        listings = await asyncio.gather(*(_scan(device, d) for d in todo), return_exceptions=True)
        nxt: list[str] = []
        for directory, listing in zip(todo, listings):
            if isinstance(listing, BaseException):
                continue
            for name, kind in listing:
                seen += 1
                if seen > MAX_WALK:
                    return _deny(f"{word.word} holds more than {MAX_WALK} entries; medbroker cannot check them all for "
                                 f"links into patient data on {protected.device}. Name a smaller directory.", top)
                path = normalize_path(name, directory)
                if kind == "dir":
                    nxt.append(path)
                elif kind == "link":
                    target = await resolve(device, path)
                    root = protected.protecting(target) or protected.revealed_by(target)
                    if root:
                        return _deny(f"{word.word} holds {path}, a link to {target}, and the command walks "
                                     f"{word.word}; the protected patient-data directory {root} on "
                                     f"{protected.device} could be read through it. {_HINT}", path)
        todo, depth = nxt, depth + 1
    return None


async def _scan(device: DevicePaths, path: str) -> list[tuple[str, str]]:
    scandir = getattr(device, "scandir", None)
    return await scandir(path) if scandir is not None else []


async def _judge_one(word: PathWord, protected: ProtectedPaths, device: DevicePaths, strict: bool) -> Decision | None:
    canonical = await resolve(device, word.path)
    if word.glob:  # the directory a pattern starts in is not read itself: only protected if inside a tree
        root = protected.protecting(canonical)
        hit = _verdict(word, canonical, protected) if root else None
    else:
        hit = _verdict(word, canonical, protected)
    if hit or not word.glob:
        return hit
    budget = [MAX_LISTINGS, MAX_ENTRIES]
    matches = await _expand(device, canonical, [c for c in word.glob.split("/") if c], budget)
    if matches is None:
        if strict:
            return _deny(f"the pattern {word.word} reaches more than {MAX_ENTRIES} entries in {MAX_LISTINGS} "
                         f"directories on {protected.device}; medbroker cannot check them all. Name the files you "
                         "need.", canonical)
        return None
    links = [path for path, kind in matches if kind == "link"]
    for path, _ in matches:  # entries of a directory that is not protected: only their own names matter
        hit = _verdict(word, path, protected)
        if hit:
            return hit
    for path, target in zip(links, await asyncio.gather(*(resolve(device, p) for p in links))):
        hit = _verdict(word, target, protected)
        if hit:
            return hit
    if word.recursive and strict:  # grep -R x service/*: each matched directory is walked too
        for path, kind in matches:
            if kind == "dir":
                hit = await _judge_tree(word, path, protected, device)
                if hit:
                    return hit
    return None


async def _expand(device: DevicePaths, directory: str, parts: list[str],
                  budget: list[int]) -> list[tuple[str, str]] | None:
    """(path, kind) of the entries under ``directory`` that match the pattern components, descending through
    directories and links (links resolved on the device); None when the budget of listings/entries runs out."""
    level = [(directory, "dir")]
    for depth, part in enumerate(parts):
        if depth >= _MAX_GLOB_DEPTH or "**" in part:
            return None
        last = depth == len(parts) - 1
        dirs = [p for p, kind in level if kind in ("dir", "link")]
        budget[0] -= len(dirs)
        if budget[0] < 0:
            return None
        listings = await asyncio.gather(*(_scan(device, d) for d in dirs), return_exceptions=True)
        nxt: list[tuple[str, str]] = []
        for d, listing in zip(dirs, listings):
            if isinstance(listing, BaseException):
                continue
            budget[1] -= len(listing)
            if budget[1] < 0:
                return None
            nxt.extend((normalize_path(name, d), kind) for name, kind in listing if fnmatch.fnmatchcase(name, part))
        if not last:  # descend: a link that is a directory counts from where it points
            links = [p for p, kind in nxt if kind == "link"]
            targets = dict(zip(links, await asyncio.gather(*(resolve(device, p) for p in links))))
            nxt = [(targets.get(p, p), "dir" if kind == "link" else kind) for p, kind in nxt]
        level = nxt
    return level


def _verdict(word: PathWord, canonical: str, protected: ProtectedPaths) -> Decision | None:
    root = protected.protecting(canonical)
    if root:
        via = "" if normalize_path(word.path.lstrip("~") or "/") == canonical else f" (it resolves to {canonical})"
        return _deny(f"the command names {word.word}{via}, {'a' if canonical == root else 'inside the'} protected "
                     f"patient-data directory {root} on {protected.device}; medbroker refuses commands that read, "
                     f"write or move patient data. {_HINT}", canonical)
    below = None if word.ancestor_ok else protected.revealed_by(canonical)
    if below:
        return _deny(f"the command reads {word.word} ({canonical} on the device), which contains the protected "
                     f"patient-data directory {below} on {protected.device}; medbroker refuses commands that could "
                     "read it recursively. Name a more specific directory.", canonical)
    return None


def _deny(reason: str, path: str) -> Decision:
    return Decision(False, reason, "exec.denied", "exec", path)

