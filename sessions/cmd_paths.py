"""Which paths a command line names, for resolving them on the device, and which parts it builds at run time.

sessions/exec_check.py judges a command line lexically. That cannot see symlinks (``service/latest.dcm``
pointing into ``data/dicom``), so :func:`analyze_command` lists every word that may be a path, as the
device's shell would join it (relative to the login's home, after ``cd``/``pushd``, via ``CDPATH``,
``~`` and ``$HOME``), for the relay to resolve with the device's own realpath (sessions/cmd_judge.py).

Some command lines build their paths while they run: command substitution, variables whose value the
broker cannot know (``read``, loops over command output), ``eval`` of such, ``xargs``, a shell reading
commands from a pipe, ``IFS`` changes, inline interpreter code that assembles strings. No lexical reader
can know those paths; :func:`analyze_command` names the first such construct (``CommandPaths.runtime``) and
the caller refuses it on a device whose login can read patient data (docs/data-protection.md, "Commands
resolved like files"). Scripts the command runs (``sh x.sh``, ``python3 x.py``, ``./x``) are listed in
``CommandPaths.scripts`` for whoever inspects uploaded content.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from sessions.exec_check import _ASSIGNMENT, _ParseError, _braces, _safe_on_ancestor, _tokenize
from sessions.policy import ProtectedPaths

__all__ = ["CommandPaths", "PathWord", "analyze_command"]

MAX_PATHS = 96  # path words per command line; beyond that the line is refused, never judged in part
_MAX_DEPTH = 3
_MAX_VALUES = 8  # values a for-loop variable is tried with
_HOME = "~"  # the login's home: the device's realpath resolves relative paths from there

_KEYWORDS = frozenset({"if", "then", "else", "elif", "fi", "do", "done", "while", "until", "case", "esac", "in",
                       "!", "{", "}", "function", "select", "[[", "]]", "time", "coproc"})
# Commands whose arguments are never opened as files (output, tests on the text itself, shell state).
_NO_FILES = frozenset({"echo", "printf", "true", "false", ":", "exit", "return", "sleep", "kill", "wait", "shift",
                       "unset", "set", "let", "expr", "seq", "date", "uname", "hostname", "id", "whoami", "uptime",
                       "export", "local", "declare", "typeset", "readonly", "trap", "ulimit", "umask", "jobs",
                       "type", "which", "hash", "alias", "unalias", "history", "logger", "clear", "reset", "tput"})
# Variables whose value is the broker's to know or which never name a file.
_KNOWN_VARS = frozenset({"USER", "LOGNAME", "SHELL", "TERM", "LANG", "PATH", "HOSTNAME", "RANDOM", "SECONDS", "LINENO",
                         "UID", "EUID", "PPID", "BASHPID", "COLUMNS", "LINES", "SHLVL", "OPTIND", "?", "$", "!", "#",
                         "-", "_", "0", "@", "*", "1", "2", "3", "4", "5", "6", "7", "8", "9", "REPLY_UNUSED"})
_LOGIN_SHELLS = frozenset({"su", "runuser", "login", "script", "screen", "tmux", "byobu"})
_SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "mksh", "ash", "fish", "csh", "tcsh", "rbash"})
# Interpreter -> the flags that take inline code.
_INTERPRETERS = {"python": ("-c",), "perl": ("-e", "-E"), "ruby": ("-e",), "node": ("-e", "-p", "--eval", "--print"),
                 "nodejs": ("-e", "-p", "--eval", "--print"), "php": ("-r", "-B", "-R", "-E"), "lua": ("-e",),
                 "tclsh": (), "awk": (), "gawk": (), "mawk": (), "nawk": (), "Rscript": ("-e",),
                 "pwsh": ("-c", "-Command")}
_CODE_OPERAND = frozenset({"awk", "gawk", "mawk", "nawk"})  # the first operand is the program
# Inline code that assembles strings or finds files without naming them: the broker cannot know the path.
_CODE_BUILDS = re.compile(
    r"""['"]\s*[+.]|[+.]\s*['"]|\bjoin\b|\bchr\s*\(|\bord\s*\(|decode|encode|fromhex|hexlify|b64|b32|b16|base64|"""
    r"""codecs|rot13|\\x[0-9a-fA-F]|\\[0-7]{3}|\\u[0-9a-fA-F]|%[sdbxXo]|\.format\s*\(|\bf['"]|\[::-1\]|reverse|"""
    r"""\bpack\s*\(|sprintf|getattr|__import__|\bexec\b|\beval\b|\bcompile\s*\(|environ|getenv|\$ENV|\bargv\b|"""
    r"""ARGV|stdin|STDIN|\binput\s*\(|readline|\bglob|\bwalk|listdir|scandir|readdir|opendir|\bchdir|\bsystem\b|"""
    r"""popen|subprocess|spawn|qx|`|\bfind\b|Path\s*\(|\bsplit\b|\breplace\b|\btr\b|\by/|\bsub\b|\bgsub\b|"""
    r"""\bsubstr|\bslice\b|concat|\bcat\b|toupper|tolower|\bupper\b|\blower\b|getline|ENVIRON|\$\{|\$\(|"""
    r"""\b[rbtu]?f[rbtu]?['"]|\bbytes\s*\(|bytearray|\bpaste0?\b|file\.path|#\{|"""
    r"""\[\s*-?\w*\s*:\s*-?\w*\s*(?::\s*-?\w*\s*)?\]|\[\s*-?\w+\s*\.\.|"""
    # cutting characters off a string: strip('x') (not strip(), which only drops whitespace), removesuffix,
    # Ruby chomp("x")/delete_suffix, Perl chop, PHP trim($s, "x")
    r"""strip\s*\(\s*[^)\s]|remove(?:suf|pre)fix|delete_(?:suf|pre)fix|\bchop\b|\bchomp\s*\(\s*['"]|\btrim\s*\([^)]*,""",
    re.I)
# A quoted literal that is nothing but a path (no escapes, interpolation, formats or spaces): its letters are
# not code, so the run-time words above are not looked for inside it ('/tmp/mbdev-1-bqxf/notes' holds "qx").
_PATH_CHARS = re.compile(r"[A-Za-z0-9_./~+-]*/[A-Za-z0-9_./~+-]*")
# Interpreters whose double-quoted strings interpolate variables ("/var/lib/$a$b" in Perl), and how.
_INTERPOLATION = {"perl": r"[$@][\w:{]", "php": r"\$[\w{]|\{\$", "ruby": r"#[{$@]", "pwsh": r"\$[\w{(:]",
                  "tclsh": r"\$[\w{:]|\["}
_DYNAMIC_VAR = re.compile(r"\$(?:\{([^}]*)\}|([A-Za-z_][A-Za-z_0-9]*|[0-9?$!#@*_-]))")


@dataclass(frozen=True)
class PathWord:
    """A word the device may open as a path: ``path`` as the device's realpath should get it (``~`` is the
    login's home, resolved as a relative path), ``word`` as the vendor wrote it, ``ancestor_ok``: the command
    only looks at a directory itself (``ls`` without ``-R``, ``cd``, a copy destination), so a directory that
    contains a protected tree is fine."""

    path: str
    word: str
    ancestor_ok: bool = False
    glob: str = ""
    recursive: bool = False
    """The command walks a directory it is given (``find``, ``grep -r``, ``tar c``, ``cp -r``): links inside it
    into a protected tree are followed by some of them (``find -L``, ``grep -R``, ``tar h``, ``cat {}``)."""
    """For a pattern: the part after ``path`` (``*.log``, ``*/x``), matched against the device's directory."""


@dataclass(frozen=True)
class CommandPaths:
    """What :func:`analyze_command` found: path words, the first run-time construct, scripts it runs."""

    paths: tuple[PathWord, ...] = ()
    runtime: str | None = None
    scripts: tuple[str, ...] = ()
    reads_input: bool = False
    """The whole line is a shell run on the vendor's own input (``bash``, ``sh -i``, ``su -``, ``sudo -i``):
    fine where each input line is judged in turn (sessions/shell_guard.py), refused elsewhere on strict."""
    cwds: tuple[str, ...] = ("~",)
    """Where the shell may be after the line (``cd``): an interactive shell's next line starts there."""


class _Walk:
    def __init__(self, protected: ProtectedPaths) -> None:
        self.protected = protected
        self.paths: dict[tuple[str, bool, str], PathWord] = {}
        self.recursive = False  # the command being read walks the directories it is given
        self.runtime: str | None = None
        self.input_shells = 0  # shells reading the vendor's input, as the whole line
        self.commands = 0
        self.scripts: list[str] = []
        leaves = {p.rsplit("/", 1)[-1] for p in protected.prefixes}
        self.leaves = tuple(sorted(x.casefold() for x in leaves if len(x) >= 3))

    def flag(self, what: str) -> None:
        if self.runtime is None:
            self.runtime = what

    def add(self, path: str, word: str, ancestor_ok: bool, glob: str = "", recursive: bool = False) -> None:
        if len(path) > 4096 or "\n" in path:
            return
        if len(self.paths) >= MAX_PATHS:
            raise _ParseError(f"more than {MAX_PATHS} paths in one command line")
        key = (path, ancestor_ok, glob)
        old = self.paths.get(key)
        self.paths[key] = PathWord(path, word, ancestor_ok, glob, recursive or (old is not None and old.recursive))


def analyze_command(command: str, protected: ProtectedPaths, cwds: tuple[str, ...] = (_HOME,)) -> CommandPaths:
    """List the path words of ``command`` and its first run-time construct (see the module docstring).

    :param command: the command line as the vendor sent it (exec) or typed it (shell)
    :param protected: the device's protected paths (inline code naming one of their last components counts
        as building a path)
    :param cwds: where the line starts: the login's home (``~``) for exec; for an interactive shell, where
        earlier lines may have left it (every candidate is tried)
    :return: a :class:`CommandPaths`; a line the reader cannot follow (unclosed quotes, too deep, too many
        paths) comes back with ``runtime`` saying why
    """
    walk = _Walk(protected)
    where = list(cwds) or [_HOME]
    try:
        _substitutions(command, walk)
        _line(command, walk, {}, where, 0)
    except (_ParseError, RecursionError) as exc:
        return CommandPaths(runtime=f"medbroker could not follow this command line ({exc})", cwds=tuple(cwds))
    reads_input = walk.input_shells == 1 and walk.commands == 1 and walk.runtime is None
    return CommandPaths(tuple(walk.paths.values()), walk.runtime, tuple(dict.fromkeys(walk.scripts)), reads_input,
                        tuple(dict.fromkeys(where[-_MAX_VALUES:])))


# ---------------------------------------------------------------------------------------------- raw scan
_PURE_SUBST = frozenset({"date", "hostname", "uname", "whoami", "id", "pwd", "nproc", "tty", "arch", "uptime"})


def _substitutions(line: str, walk: _Walk) -> None:
    """Command and process substitution, found in the raw text (the tokenizer splits at its parentheses).
    Its output becomes words the broker never sees; only a few fixed commands are let through."""
    i, n, quote = 0, len(line), ""
    while i < n:
        c = line[i]
        if quote == "'":
            if c == "'":
                quote = ""
        elif c == "\\":
            i += 1
        elif c == "'" and quote != '"':
            if i > 0 and line[i - 1] == "$":  # $'...' allows \' inside
                j = i + 1
                while j < n and line[j] != "'":
                    j += 2 if line[j] == "\\" else 1
                i = j
            else:
                quote = "'"
        elif c == '"':
            quote = "" if quote == '"' else '"'
        elif c == "`":
            j = line.find("`", i + 1)
            _judge_substitution(line[i + 1:j if j > 0 else n], walk)
            i = n if j < 0 else j
        elif c in "$<>" and line.startswith("(", i + 1) and not line.startswith("((", i + 1):
            depth, j = 1, i + 2
            while j < n and depth:
                depth += {"(": 1, ")": -1}.get(line[j], 0)
                j += 1
            _judge_substitution(line[i + 2:j - 1], walk)
        i += 1


def _judge_substitution(inner: str, walk: _Walk) -> None:
    try:
        words = [t[0] for t in _tokenize(inner) if not isinstance(t, str)]
        separators = [t for t in _tokenize(inner) if isinstance(t, str)]
    except _ParseError:
        words, separators = [], ["?"]
    if words and words[0] == "echo" and not separators and "$" not in inner and "\\" not in inner \
            and not any(w.startswith("-") for w in words[1:]):
        # `echo literal` (Ansible's temporary directories): its output is its words, judged as paths here
        for word in words[1:]:
            word = _tilde(word)
            walk.add(word if word.startswith(("/", _HOME)) else _join(_HOME, word), word, False)
        return
    if not words or words[0] not in _PURE_SUBST or separators or "$" in inner:
        walk.flag(f"command substitution $({inner.strip()[:60]}): its output becomes part of the command, and "
                  "medbroker cannot see which files that names")


# ---------------------------------------------------------------------------------------------- commands
def _split(tokens: list) -> list[tuple[str, list[tuple[str, str]], list[tuple[str, str]]]]:
    """Simple commands as (separator before it, words, redirection targets)."""
    out: list[tuple[str, list, list]] = []
    before, redirect = ";", False
    words: list[tuple[str, str]] = []
    redirs: list[tuple[str, str]] = []
    for tok in tokens:
        if isinstance(tok, str):
            if tok in "<>":
                redirect = True
                continue
            if words or redirs:
                out.append((before, words, redirs))
            before, words, redirs, redirect = tok, [], [], False
        elif redirect:
            redirs.append(tok)
            redirect = False
        else:
            words.append(tok)
    if words or redirs:
        out.append((before, words, redirs))
    return out


def _line(line: str, walk: _Walk, variables: dict[str, tuple[str, ...] | None], cwds: list[str], depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise _ParseError("commands nested more than three levels deep")
    for before, words, redirs in _split(_tokenize(line)):
        _command(before, words, redirs, walk, variables, cwds, depth)


def _expand(text: str, variables: dict[str, tuple[str, ...] | None], cwd: str) -> tuple[list[str], str | None]:
    """The values a word can take with the variables known so far, or the name of one the broker cannot know."""
    values = [text]
    for m in list(_DYNAMIC_VAR.finditer(text))[:16]:
        name = m.group(1) if m.group(1) is not None else m.group(2)
        if name in ("HOME",):
            options: tuple[str, ...] | None = (_HOME,)
        elif name == "PWD":
            options = (cwd,)
        elif name in variables:
            options = variables[name]
        elif name in _KNOWN_VARS:
            options = ("",)
        else:
            options = None
        if options is None:
            return [], m.group(0)
        values = [v.replace(m.group(0), o, 1) for v in values for o in options][:_MAX_VALUES]
    return values, None


def _command(before: str, words: list[tuple[str, str]], redirs: list[tuple[str, str]], walk: _Walk,
             variables: dict[str, tuple[str, ...] | None], cwds: list[str], depth: int) -> None:
    k = 0
    while k < len(words) and words[k][0] in _KEYWORDS:
        k += 1
    if k < len(words) and words[k][0] in ("for", "select") and k + 1 < len(words):
        name = words[k + 1][0]
        items = [w[0] for w in words[k + 3:]] if k + 2 < len(words) and words[k + 2][0] == "in" else []
        values: list[str] = []
        for item in items:
            expanded, unknown = _expand(item, variables, cwds[-1])
            if unknown:
                values = []
                break
            values.extend(expanded)
            _path_word(item, expanded, walk, cwds, True)
        variables[name] = tuple(values[:_MAX_VALUES]) if values and items else None
        return
    # assignments before the command name
    while k < len(words) and _ASSIGNMENT.match(words[k][0]):
        _assign(words[k][0], walk, variables, cwds)
        k += 1
    from sessions.exec_check import _skip_wrappers  # local: keeps the import list above short

    start = k
    k = _skip_wrappers(words, k)
    wrappers = [w[0].rsplit("/", 1)[-1] for w in words[start:k]]
    login = {"-i", "-s", "--login", "--shell"} & {w[0] for w in words[start:k]}
    if k >= len(words) and login and {"sudo", "doas"} & set(wrappers) or (
            k < len(words) and words[k][0].rsplit("/", 1)[-1] in _LOGIN_SHELLS
            and not any(w[0] in ("-c", "--command") or w[0].startswith("--command=") for w in words[k + 1:])):
        if depth == 0:
            walk.commands += 1
        if depth == 0 and before == ";" and not redirs and walk.commands == 1:
            walk.input_shells += 1
        else:
            walk.flag("a login shell reading commands from its input: medbroker cannot check commands it does "
                      "not see; run them directly or in an interactive session")
        return
    for w in words[start:k]:
        if w[0].rsplit("/", 1)[-1] in ("xargs", "parallel"):
            walk.flag(f"{w[0]} takes its arguments from its input, which medbroker cannot see before it runs; "
                      "name the files on the command line or use find ... -exec")
    for target in redirs:
        expanded, unknown = _expand(target[0], variables, cwds[-1])
        if unknown:
            walk.flag(f"the redirection {target[0]} uses {unknown}, whose value medbroker cannot know")
        _path_word(target[0], expanded, walk, cwds, False)
    if k >= len(words):
        return
    raw_name = words[k][0]
    name = raw_name.rsplit("/", 1)[-1]
    args = [w[0] for w in words[k + 1:]]
    base = re.sub(r"[0-9.]+$", "", name)
    if name in ("export", "local", "declare", "typeset", "readonly"):
        for a in args:
            if _ASSIGNMENT.match(a):
                _assign(a, walk, variables, cwds)
            elif not a.startswith("-"):
                variables.setdefault(a, variables.get(a))
        return
    if name in ("read", "mapfile", "readarray", "getopts"):
        for a in args:
            if re.fullmatch(r"[A-Za-z_][A-Za-z_0-9]*", a):
                variables[a] = None
        return
    if name == "printf" and "-v" in args:
        i = args.index("-v")
        if i + 1 < len(args):
            variables[args[i + 1]] = None
    if name in ("xargs", "parallel"):
        walk.flag(f"{name} takes its arguments from its input, which medbroker cannot see before it runs; "
                  "name the files on the command line or use find ... -exec")
    if depth == 0:
        walk.commands += 1
    if name in ("eval", "source", ".") or (
            base in _SHELLS and not any(a.startswith("-c") or not a.startswith("-") for a in args)):
        if name == "eval":
            joined = " ".join(args)
            expanded, unknown = _expand(joined, variables, cwds[-1])
            if unknown:
                walk.flag(f"eval of {unknown}, whose value medbroker cannot know")
            for text in expanded:
                _line(text, walk, dict(variables), list(cwds), depth + 1)
        elif name in ("source", "."):
            if args:
                walk.scripts.append(args[0])
        elif depth == 0 and before == ";" and not redirs and walk.commands == 1:
            walk.input_shells += 1  # the vendor's own input: judged line by line where that is possible
        else:
            walk.flag(f"{name} reading commands from its input: medbroker cannot check commands it does not see; "
                      "run them directly or in an interactive session")
    if (base in _INTERPRETERS and base not in _CODE_OPERAND and _code_flags(base)
            and not any(a in _code_flags(base) or not a.startswith("-") for a in args)):
        if before == "|" or redirs:  # a program piped or redirected in: built or read where medbroker cannot see
            walk.flag(f"{name} reading its program from its input: medbroker cannot see which files it opens")
        # else the program is the vendor's own input on this channel, which the input guard reads before the
        # device does (sessions/upload_check.py, SessionPolicy.make_input_guard): Ansible's pipelining
    dest = _dest_index(name, args)
    safe = _safe_on_ancestor(name, args)
    walk.recursive = _walks(name, args)
    if "/" in raw_name:
        expanded, unknown = _expand(raw_name, variables, cwds[-1])
        _path_word(raw_name, expanded, walk, cwds, False)
        if unknown:
            walk.flag(f"the command {raw_name} uses {unknown}, whose value medbroker cannot know")
        walk.scripts.append(raw_name)
    elif "$" in raw_name:
        expanded, unknown = _expand(raw_name, variables, cwds[-1])
        if unknown:
            walk.flag(f"the command name {raw_name} uses {unknown}, whose value medbroker cannot know")
        for text in expanded:
            if text != raw_name:
                _line(text + " " + " ".join(a for a in args), walk, dict(variables), list(cwds), depth + 1)
        if expanded and not unknown:  # judged as the command it expands to
            return
    code_flags = _code_flags(base)
    expect_code = base in _CODE_OPERAND
    bases = list(cwds)
    skip_next = False
    for i, a in enumerate(args):
        if skip_next:
            skip_next = False
            _inline_code(name, a, walk)
            continue
        if code_flags and (a in code_flags or any(a.startswith(f) and len(a) > len(f) and f.startswith("-")
                                                  and len(f) == 2 for f in code_flags)):
            if a in code_flags:
                skip_next = True
            else:
                _inline_code(name, a[2:], walk)
            continue
        if expect_code and not a.startswith("-"):
            expect_code = False
            _inline_code(name, a, walk)
            continue
        expanded, unknown = _expand(a, variables, cwds[-1])
        if unknown and name not in _NO_FILES:
            walk.flag(f"the argument {a} of {name} uses {unknown}, whose value medbroker cannot know")
        if name in _NO_FILES or (name == "rsync" and "--server" in args and a == "."):
            continue  # (rsync's server is given "." as a placeholder for the transfer's own arguments)
        walking = walk.recursive
        if i and args[i - 1] in _OPTION_VALUE or a.startswith("-"):  # tar -C DIR, -f FILE: not what is walked
            walk.recursive = False
        _path_word(a, expanded, walk, bases, safe or i == dest)
        walk.recursive = walking
        moved = a[len("--directory="):] if a.startswith("--directory=") else \
            a if i and args[i - 1] in ("-C", "--directory") else None
        if moved and len(expanded) == 1 and not unknown:  # tar/make/git -C DIR: later words count from DIR too
            moved_to = _tilde(expanded[0].split("=", 1)[1] if a.startswith("--directory=") else expanded[0])
            bases = bases + [moved_to if moved_to.startswith(("/", _HOME)) else _join(cwds[-1], moved_to)]
        if (base in _SHELLS or base in _INTERPRETERS) and not a.startswith("-") and i == _first_operand(args):
            if not (base in _SHELLS and any(x.startswith("-c") for x in args[:i])):
                walk.scripts.append(a)
        for text in expanded:
            if re.search(r"[ \t;&|<>()`\n]", text) and len(text) < 8192:  # sh -c '...', su -c "...", ssh host '...'
                _substitutions(text, walk)
                _line(text, walk, dict(variables), list(cwds), depth + 1)
    if name == "IFS" or any(w[0].startswith("IFS=") for w in words):
        walk.flag("IFS is changed, which changes how the device splits words into paths")
    if name in ("cd", "pushd"):
        _cd(args, walk, variables, cwds)


_OPTION_VALUE = frozenset({"-C", "--directory", "-f", "--file", "-o", "--output", "-T", "--files-from", "-X",
                           "--exclude-from", "-e", "--regexp", "--exclude", "--include", "-name", "-iname", "-path"})
def _walks(name: str, args: list[str]) -> bool:
    """Whether the command walks the directories it is given *and* reads through symlinks found there: only
    then can a link inside an ordinary directory lead it into a protected tree (``find -L``, ``find -exec``,
    ``grep -R``, ``tar h``, ``cp -L``, ``rsync -L``, ``zip`` without ``-y``, ``7z``, ``rg -L``...)."""
    short = {ch for a in args if a.startswith("-") and not a.startswith("--") for ch in a[1:]}
    long = {a.split("=", 1)[0] for a in args if a.startswith("--")}
    if name == "find":
        return bool({"-L", "-follow", "-exec", "-execdir", "-ok", "-okdir"} & set(args))
    if name in ("grep", "egrep", "fgrep", "zgrep"):
        return "R" in short or "--dereference-recursive" in long
    if name in ("tar", "bsdtar", "star"):
        first = args[0] if args else ""
        return "h" in short or (not first.startswith("-") and "h" in first) or "--dereference" in long
    if name in ("cp", "rsync", "cpio", "pax", "du", "ls", "chmod", "chown", "chgrp"):
        return ("L" in short and (name not in ("cp", "ls", "chmod", "chown", "chgrp")
                                  or bool(short & {"r", "R", "a"}))) \
            or bool(long & {"--dereference", "--copy-links", "--copy-unsafe-links", "--copy-dirlinks"})
    if name == "zip":
        return "y" not in short and "--symlinks" not in long
    if name in ("7z", "7za", "7zr", "rg", "ag", "tree"):
        return name.startswith("7") or "L" in short or "l" in short or "f" in short or "--follow" in long
    return False


def _code_flags(base: str) -> tuple[str, ...]:
    for interp, flags in _INTERPRETERS.items():
        if base == interp or base.startswith(interp):
            return flags
    return ()


def _first_operand(args: list[str]) -> int:
    for i, a in enumerate(args):
        if not a.startswith("-"):
            return i
    return -1


def _dest_index(name: str, args: list[str]) -> int:
    if name not in ("cp", "mv", "rsync", "scp", "install", "ln"):
        return -1
    for i in range(len(args) - 1, -1, -1):
        if not args[i].startswith("-"):
            return i
    return -1


def _assign(word: str, walk: _Walk, variables: dict[str, tuple[str, ...] | None], cwds: list[str]) -> None:
    name, _, value = word.partition("=")
    name = name.rstrip("+")
    if name == "IFS":
        walk.flag("IFS is changed, which changes how the device splits words into paths")
    expanded, unknown = _expand(value, variables, cwds[-1])
    variables[name] = None if unknown else tuple(expanded)
    _path_word(value, expanded, walk, cwds, True)
    if name == "CDPATH":
        variables["CDPATH"] = None if unknown else tuple(expanded)


def _cd(args: list[str], walk: _Walk, variables: dict[str, tuple[str, ...] | None], cwds: list[str]) -> None:
    operands = [a for a in args if not a.startswith("-") or a == "-"]
    if not operands:
        cwds.append(_HOME)
        return
    target = operands[0]
    expanded, unknown = _expand(target, variables, cwds[-1])
    if unknown or target == "-":
        walk.flag(f"cd {target}: medbroker cannot know the directory, so later relative paths cannot be resolved")
        return
    new: list[str] = []
    for text in expanded:
        text = _tilde(text)
        if text.startswith("/"):
            new.append(text)
            continue
        bases = list(cwds[-1:])
        if not text.startswith(("./", "../")) and text not in (".", ".."):
            cdpath = variables.get("CDPATH")
            if "CDPATH" in variables and cdpath is None:
                walk.flag("CDPATH is set to a value medbroker cannot know")
            for entry in (cdpath or ()):
                for e in entry.split(":"):
                    bases.append(e or ".")
        new.extend(_join(b, text) for b in bases)
    for cand in new:
        walk.add(cand, target, True)
    if len(new) > 1:  # CDPATH: any of these may be the directory; later words are joined to each
        cwds.extend(new[:_MAX_VALUES])
    elif new:
        cwds.append(new[0])


def _tilde(text: str) -> str:
    if text == "~":
        return _HOME
    if text.startswith("~/"):
        return _HOME + text[1:]
    return text


def _join(base: str, word: str) -> str:
    if word.startswith("/"):
        return word
    if base in (_HOME, "", "."):
        return _HOME + "/" + word
    return base.rstrip("/") + "/" + word


def _path_word(word: str, expanded: list[str], walk: _Walk, cwds: list[str], ancestor_ok: bool) -> None:
    """Add each value of a word (and its ``=``/``:``/``,`` pieces, ``-C/dir`` tails) as a path to resolve."""
    for text in expanded:
        for piece in _pieces(text):
            piece = _tilde(piece)
            if piece.startswith("~") and piece != _HOME and not piece.startswith(_HOME + "/") \
                    and "@" not in piece.split("/", 1)[0]:  # ~a@b is no user name: the shell keeps it literal
                walk.flag(f"{word} names another user's home directory")
                continue
            glob = ""
            m = re.search(r"(?<!\\)[*?\[]", piece)
            if m:  # a pattern: the directory it starts in, and the rest, matched on the device
                cut = piece.rfind("/", 0, m.start())
                head, glob = (piece[:cut] or "/", piece[cut + 1:]) if cut >= 0 else (".", piece)
                piece = head
            piece = re.sub(r"\\(.)", r"\1", piece)
            if not piece:
                continue
            bases = ["/"] if piece.startswith(("/", _HOME)) else cwds[-_MAX_VALUES:]
            for base in dict.fromkeys(bases):
                walk.add(_join(base, piece) if base != "/" else piece, word, ancestor_ok, glob,
                         walk.recursive and not ancestor_ok)


def _pieces(text: str) -> list[str]:
    out: list[str] = []
    for word in _braces(text):
        if word.startswith("-"):
            if "=" in word:
                out.append(word.split("=", 1)[1])
            elif "/" in word:
                out.append(word[word.index("/"):])
            continue
        if re.fullmatch(r"[+-]?[0-9]+[A-Za-z]{0,3}|\$", word) or not word:
            continue
        out.append(word)
        if "=" in word:
            out.append(word.split("=", 1)[1])
        if ":" in word and not word.startswith("/"):
            out.append(word.split(":", 1)[1])  # host:path, if=:... and the like
    return [p for p in out if p]


def _inline_code(interpreter: str, code: str, walk: _Walk) -> None:
    """Inline interpreter code: its quoted strings are path words; assembled strings are run-time paths."""
    folded = code.casefold()
    hit = next((leaf for leaf in walk.leaves  # as a name of its own: "hl7", not the "hl7" inside "hl7k5fwe"
                if re.search(rf"(?<![a-z0-9]){re.escape(leaf)}(?![a-z0-9])", folded)), None)
    if hit:
        walk.flag(f"inline {interpreter} code mentions {hit!r}, part of a protected patient-data directory's name")
    m = _CODE_BUILDS.search(_mask_path_literals(code, interpreter))
    if m:
        walk.flag(f"inline {interpreter} code assembles strings or finds files at run time ({m.group(0).strip()!r}); "
                  "medbroker cannot see which paths it opens")
    built = _interpolated(interpreter, code)
    if built:
        walk.flag(f"inline {interpreter} code builds a string from variables at run time ({built!r}); "
                  "medbroker cannot see which paths it opens")
    for s in re.findall(r"'([^'\n]{1,512})'|\"([^\"\n]{1,512})\"", code)[:32]:
        text = s[0] or s[1]
        if "/" in text or "." in text:
            walk.add(_join(_HOME, text) if not text.startswith("/") else text, text, False)


def _literals(code: str, interpreter: str) -> Iterator[tuple[int, int, str]]:
    """``(start, end, quote)`` of each quoted literal's contents, read left to right (backslash escapes the
    quote, except in PowerShell's single quotes). An unterminated quote ends the reading: the rest stays code."""
    i, n = 0, len(code)
    while i < n:
        q = code[i]
        if q not in "'\"":
            i += 1
            continue
        j = i + 1
        escapes = not (q == "'" and interpreter.startswith("pwsh"))
        while j < n and code[j] != q:
            j += 2 if escapes and code[j] == "\\" else 1
        if j >= n:
            return
        yield i + 1, j, q
        i = j + 1


def _mask_path_literals(code: str, interpreter: str) -> str:
    """``code`` with the contents of each literal that is only a path blanked, so the words of
    :data:`_CODE_BUILDS` are looked for in the code, not in the paths it names (the quotes stay, so a
    concatenation next to them is still seen)."""
    out, last = [], 0
    for start, end, _ in _literals(code, interpreter):
        if _PATH_CHARS.fullmatch(code, start, end):
            out.append(code[last:start] + "_" * (end - start))
            last = end
    return "".join(out) + code[last:]


def _interpolated(interpreter: str, code: str) -> str | None:
    """A double-quoted literal that interpolates a variable next to a path character or another variable
    (``"/var/lib/$a$b"``, ``"$dir/x"``): the path is assembled when the code runs. None if there is none."""
    rule = next((r for name, r in _INTERPOLATION.items() if interpreter.startswith(name)), None)
    if rule is None:
        return None
    for start, end, q in _literals(code, interpreter):
        text = code[start:end]
        if q != '"' and not interpreter.startswith("tclsh"):
            continue
        for m in re.finditer(rule, text):
            before = text[m.start() - 1] if m.start() else ""
            rest = re.sub(r"^[$@#]?\{?[\w:]*\}?", "", text[m.start():])
            if m.group(0) in ("{$", "[") or before.isalnum() or (before and before in "/._-~$@}") \
                    or rest[:1] in tuple("/.-~$@#"):
                return text
    return None
