"""Best-effort check that an exec command line does not name a protected path (quotes, cd, globs, sh -c).

This reads the command the way a POSIX shell would far enough to see the paths it names: quotes,
backslashes and ``$'...'`` are undone; ``;``, ``&&``, ``|``, ``(``, `` ` `` and redirections split it
into simple commands; ``cd``/``pushd`` targets become extra working directories; words with spaces or
``$(`` (``sh -c '...'``, ``su -c "..."``) are checked again as command lines. A command is refused if
any word, ``--opt=`` value, ``-C/dir`` tail or ``host:path`` tail resolves to a protected path, if an
unquoted glob's literal prefix could reach one (``/data/di*``, ``/d*/x``, ``/*``), or if it names an
ancestor of a protected tree (``tar cf - /data``) and is not a known non-recursive command (``ls``
without ``-R``, ``cd``, ``du -s``, ``df``, ``stat``...).

It cannot see what the device computes at run time: ``$VAR`` values, command substitution output,
scripts, aliases, ``base64 -d`` of a path, symlinks. The output scanner and the device-side measures
in docs/data-protection.md back it up.
"""

from __future__ import annotations

import re

from sessions.policy import Decision, ProtectedPaths, normalize_path

__all__ = ["check_command_line"]

_SEPARATORS = frozenset(";&|<>()`\n")
_BLANK = frozenset(" \t\r")
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z_0-9]*\+?=")
_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\(|\$[A-Za-z_0-9@*#?$!-]?")
_UNESCAPE = re.compile(r"\\(.)", re.S)
_ANSI = {"a": "\a", "b": "\b", "e": "\x1b", "E": "\x1b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v",
         "\\": "\\", "'": "'", '"': '"', "?": "?"}
# Commands that look at a directory without reading the files below it (ls -R, du -a excepted).
_SAFE_ON_ANCESTOR = frozenset({"cd", "pushd", "ls", "dir", "pwd", "stat", "df", "du", "file", "test", "[",
                               "realpath", "readlink", "dirname", "basename", "mountpoint", "findmnt", "echo",
                               "printf", "mkdir"})
# Commands whose last argument is a destination: copying *into* an ancestor reads nothing from it.
_DESTINATION_LAST = frozenset({"cp", "mv", "rsync", "scp", "install", "ln"})
# Wrappers that run their argument as the command, with the options that take a value.
_WRAPPERS = {"sudo": {"-u", "-g", "-C", "-D", "-h", "-p", "-r", "-t", "-U", "-T"}, "doas": {"-u", "-C"},
             "env": {"-u", "-C", "-S"}, "nice": {"-n"}, "ionice": {"-c", "-n", "-p"}, "nohup": set(),
             "time": set(), "exec": set(), "command": set(), "builtin": set(), "stdbuf": {"-i", "-o", "-e"},
             "timeout": {"-s", "-k"}, "xargs": {"-I", "-n", "-P", "-d", "-a", "-E", "-L", "-s"}}
_ANSI_NUMBERS = (re.compile(r"x([0-9A-Fa-f]{1,2})"), re.compile(r"([0-7]{1,3})"), re.compile(r"u([0-9A-Fa-f]{1,4})"),
                 re.compile(r"U([0-9A-Fa-f]{1,8})"))
_MAX_DEPTH = 3
_MAX_BASES = 24
_MAX_BRACES = 64


class _ParseError(ValueError):
    pass


def check_command_line(command: str, protected: ProtectedPaths, home: str | None) -> Decision:
    """Decide an exec command line (see the module docstring for what is and is not seen).

    :param command: the command line as sent by the vendor
    :param protected: the device's protected paths
    :param home: the device login's home directory; None means unknown (relative paths and relative
        globs are then judged from ``/``, which refuses more)
    :return: ``Decision(allowed=False, event="exec.denied")`` naming the path, or an allowed decision
    """
    try:
        return _check(command, protected, normalize_path(home) if home else None, 0) or \
            Decision(True, "", "exec.allowed", "exec")
    except _ParseError as exc:
        return Decision(False, f"medbroker could not read this command line ({exc}); check its quoting and try "
                        "again", "exec.denied", "exec")


def _check(line: str, protected: ProtectedPaths, home: str | None, depth: int) -> Decision | None:
    if depth > _MAX_DEPTH:
        raise _ParseError("commands nested more than three levels deep")
    cwds = [home or "/"]
    seen: list[str] = []  # absolute paths named so far: tar -C DIR, find DIR, git -C DIR ...
    for words in _simple_commands(_tokenize(line)):
        k = 0
        while k < len(words) and _ASSIGNMENT.match(words[k][0]):
            k += 1
        k = _skip_wrappers(words, k)
        name = words[k][0].rsplit("/", 1)[-1] if k < len(words) else ""
        args = [w[0] for w in words[k + 1:]]
        safe = _safe_on_ancestor(name, args)
        dest = _last_operand(words, k) if name in _DESTINATION_LAST else -1
        for idx, (text, pattern) in enumerate(words):
            if idx < k and "=" in pattern:  # an assignment: only its value is a path
                pattern = pattern.split("=", 1)[1]
            bases = cwds + seen[-_MAX_BASES:]
            # a login whose home lies in a protected tree makes every relative word protected
            components = frozenset() if any(map(protected.is_protected, bases)) else _components(protected)
            found = _check_word(pattern, protected, bases, home, components,
                                ancestor_ok=safe or idx < k or idx == dest)
            if found:
                return found
            if _BLANK & set(text) or _SEPARATORS & set(text) or "$(" in text:
                found = _check(text, protected, home, depth + 1)  # sh -c '...', su -c "...", ssh host '...'
                if found:
                    return found
            if text.startswith("/"):
                seen.append(normalize_path(text))
        if name in ("cd", "pushd"):
            cwds = (cwds + _cd_targets(args, cwds, home))[-_MAX_BASES:]
    return None


def _tokenize(line: str) -> list[tuple[str, str] | str]:
    """Words as ``(text, pattern)`` (pattern: glob characters that were quoted are backslash-escaped)
    and separator characters as plain strings."""
    out: list[tuple[str, str] | str] = []
    i, n = 0, len(line)
    while i < n:
        c = line[i]
        if c in _BLANK:
            i += 1
            continue
        if c in _SEPARATORS:
            out.append(c)
            i += 1
            continue
        text: list[str] = []
        pat: list[str] = []

        def literal(s: str) -> None:
            text.append(s)
            pat.append(re.sub(r"([*?\[\]{}\\])", r"\\\1", s))

        while i < n and line[i] not in _BLANK and line[i] not in _SEPARATORS:
            c = line[i]
            if c == "\\":
                if i + 1 < n and line[i + 1] != "\n":
                    literal(line[i + 1])
                i += 2
            elif c == "'":
                j = line.find("'", i + 1)
                if j < 0:
                    raise _ParseError("a single quote is not closed")
                literal(line[i + 1:j])
                i = j + 1
            elif c == "$" and line.startswith("$'", i):
                s, i = _ansi_c(line, i + 2)
                literal(s)
            elif c == '"':
                s, i = _double_quoted(line, i + 1)
                literal(s)
            else:
                text.append(c)
                pat.append(c)
                i += 1
        out.append(("".join(text), "".join(pat)))
    return out


def _double_quoted(line: str, i: int) -> tuple[str, int]:
    buf: list[str] = []
    while i < len(line):
        c = line[i]
        if c == '"':
            return "".join(buf), i + 1
        if c == "\\" and i + 1 < len(line) and line[i + 1] in '$`"\\\n':
            if line[i + 1] != "\n":
                buf.append(line[i + 1])
            i += 2
            continue
        buf.append(c)
        i += 1
    raise _ParseError("a double quote is not closed")


def _ansi_c(line: str, i: int) -> tuple[str, int]:
    """Decode bash ``$'...'`` from ``line[i:]`` (after the opening quote)."""
    buf: list[str] = []
    while i < len(line):
        c = line[i]
        if c == "'":
            return "".join(buf), i + 1
        if c != "\\" or i + 1 >= len(line):
            buf.append(c)
            i += 1
            continue
        e = line[i + 1]
        m = next((m for m in (rx.match(line, i + 1) for rx in _ANSI_NUMBERS) if m), None)
        if m:
            value = int(m.group(1), 8 if e in "01234567" else 16)
            buf.append(chr(value) if value <= 0x10FFFF else "\ufffd")
            i = m.end()
        elif e == "c" and i + 2 < len(line):
            buf.append(chr(ord(line[i + 2]) & 0x1F))
            i += 3
        else:
            buf.append(_ANSI.get(e, "\\" + e))
            i += 2
    raise _ParseError("a $'...' quote is not closed")


def _simple_commands(tokens: list[tuple[str, str] | str]) -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = [[]]
    for tok in tokens:
        if isinstance(tok, str):
            if out[-1]:
                out.append([])
        else:
            out[-1].append(tok)
    return [cmd for cmd in out if cmd]


def _skip_wrappers(words: list[tuple[str, str]], k: int) -> int:
    while k < len(words) and words[k][0].rsplit("/", 1)[-1] in _WRAPPERS:
        wrapper = words[k][0].rsplit("/", 1)[-1]
        k += 1
        while k < len(words) and (words[k][0].startswith("-") or _ASSIGNMENT.match(words[k][0])):
            k += 2 if words[k][0] in _WRAPPERS[wrapper] else 1
        if wrapper == "timeout" and k < len(words) and words[k][0][:1].isdigit():
            k += 1  # the duration
    return k


def _flags(args: list[str]) -> tuple[set[str], set[str]]:
    short = {ch for a in args if a.startswith("-") and not a.startswith("--") for ch in a[1:]}
    return short, {a for a in args if a.startswith("--")}


def _safe_on_ancestor(name: str, args: list[str]) -> bool:
    if name not in _SAFE_ON_ANCESTOR:
        return False
    short, long = _flags(args)
    if name in ("ls", "dir"):
        return "R" not in short and "--recursive" not in long
    if name == "du":
        summary = "s" in short or "--summarize" in long or "--max-depth=0" in long or "-d0" in args or (
            "-d" in args and args.index("-d") + 1 < len(args) and args[args.index("-d") + 1] == "0")
        return summary and "a" not in short and "--all" not in long
    return True


def _last_operand(words: list[tuple[str, str]], k: int) -> int:
    for idx in range(len(words) - 1, k, -1):
        if not words[idx][0].startswith("-"):
            return idx
    return -1


def _cd_targets(args: list[str], cwds: list[str], home: str | None) -> list[str]:
    operands = [a for a in args if not a.startswith("-") or a == "-"]
    if not operands:
        return [home or "/"]
    target = operands[0]
    if target == "-" or "$" in target:
        return []
    if target == "~" or target.startswith("~/"):
        return [normalize_path((home or "/") + target[1:])]
    return [normalize_path(target, cwd) for cwd in cwds]


def _check_word(pattern: str, protected: ProtectedPaths, bases: list[str], home: str | None,
                components: frozenset[str] | None, *, ancestor_ok: bool) -> Decision | None:
    for cand, weak in _candidates(pattern, bases, home, components):
        if _has_glob(cand):
            literal = _UNESCAPE.sub(r"\1", re.split(r"(?<!\\)[*?\[{]", cand, maxsplit=1)[0])
            root = _glob_reaches(literal, protected, inside_only=weak)
            if root:
                shown = _UNESCAPE.sub(r"\1", cand)
                return _deny(f"the pattern {shown} could match the protected patient-data directory {root} on "
                             f"{protected.device}; name the files you need explicitly, outside protected "
                             "directories", root)
            continue
        path = _UNESCAPE.sub(r"\1", cand)
        root = protected.protecting(path)
        if root:
            where = "a protected patient-data directory" if path == root else \
                f"inside the protected patient-data directory {root}"
            return _deny(f"the command names {path}, {where} on {protected.device}; medbroker refuses commands "
                         "that read, write or move patient data. Ask the hospital's biomedical engineer if you "
                         "need a de-identified export.", path)
        below = None if ancestor_ok or weak else protected.revealed_by(path)
        if below:
            return _deny(f"the command reads {path}, which contains the protected patient-data directory {below} "
                         f"on {protected.device}; medbroker refuses commands that could read it recursively. "
                         "Name a more specific directory.", path)
    return None


def _components(protected: ProtectedPaths) -> frozenset[str]:
    """Every path component of every protected prefix (casefolded on case-insensitive devices)."""
    fold = str.casefold if protected.case_insensitive else str
    return frozenset(fold(c) for p in protected.prefixes for c in p.split("/") if c)


def _candidates(pattern: str, bases: list[str], home: str | None,
                components: frozenset[str] | None) -> list[tuple[str, bool]]:
    """Absolute path patterns a word may stand for, each with ``weak``: it was only found by joining a
    relative word to ``/`` because the home directory is unknown (then ancestors and globs that merely
    lead towards a protected path are not held against it). Relative words are joined to each base
    directory only if they could lead into a protected prefix: bases are never protected themselves
    (naming one was refused already), so the word's first component must be one of ``components``
    unless it contains ``..`` or a glob. An empty ``components`` turns this pruning off."""
    pieces: set[str] = set()
    for word in _braces(pattern):
        pieces.update((word, *re.split(r"(?<!\\)[=:,]", word)))
    for piece in list(pieces):
        if piece.startswith("-") and "/" in piece:  # -C/data, -f/path
            pieces.add(piece[piece.index("/"):])
    out: list[tuple[str, bool]] = []
    for piece in pieces:
        if not piece or (piece.startswith("-") and "/" not in piece):
            continue
        if piece.startswith("~"):
            slash = piece.find("/")
            rest = piece[slash:] if slash >= 0 else ""
            piece = ((home or "") + rest if piece[:2] in ("~", "~/") else rest) or ""  # ~user: judge the rest
            if not piece:
                continue
            piece = piece if piece.startswith("/") else "/" + piece
        parts = _VARIABLE.split(piece)
        for later in parts[1:]:  # text after an unknown $VAR or $(...): judged as if it started at /
            if later.startswith("/"):
                out.append((normalize_path(later), False))
        head = parts[0]
        if head.startswith("/"):
            out.append((normalize_path(head), False))
        elif head and len(parts) == 1:
            steps = [c for c in head.split("/") if c not in ("", ".")]
            if components and steps and ".." not in steps and not _has_glob(head) \
                    and steps[0] not in components and steps[0].casefold() not in components:
                continue
            out.extend((normalize_path(head, base), home is None and base == "/") for base in bases)
    return out


def _braces(piece: str) -> list[str]:
    """Expand unescaped ``{a,b}`` groups; past _MAX_BRACES results, keep the unexpanded pattern."""
    m = re.search(r"(?<!\\)\{([^{}]*,[^{}]*)(?<!\\)\}", piece)
    if not m:
        return [piece]
    out: list[str] = []
    for alt in re.split(r"(?<!\\),", m.group(1)):
        out.extend(_braces(piece[:m.start()] + alt + piece[m.end():]))
        if len(out) > _MAX_BRACES:
            return [piece]
    return out


def _has_glob(pattern: str) -> bool:
    return re.search(r"(?<!\\)[*?\[{]", pattern) is not None


def _glob_reaches(literal: str, protected: ProtectedPaths, *, inside_only: bool = False) -> str | None:
    """A protected prefix that an unquoted glob whose literal start is ``literal`` could match or enter."""
    key = literal.casefold() if protected.case_insensitive else literal
    for prefix in protected.prefixes:
        k = prefix.casefold() if protected.case_insensitive else prefix
        if key.startswith(k + "/") or key == k or (not inside_only and k.startswith(key)):
            return prefix
    return None


def _deny(reason: str, path: str) -> Decision:
    return Decision(False, reason, "exec.denied", "exec", path)
