"""Whether a shell would read more lines before running a command, and the text to judge meanwhile.

An interactive shell runs nothing until a command is complete (an open quote, a here-document, ``for ...
do`` wait for more lines); sessions/shell_guard.py judges each line together with the earlier lines of
the same command, with open quotes closed, so no Enter goes to the device unjudged.
"""

from __future__ import annotations

import re

from sessions.exec_check import _ParseError, _tokenize

__all__ = ["closed_for_judging", "incomplete", "strip_heredocs"]


_HEREDOC = re.compile(r"<<(-?)[ \t]*(['\"]?)([A-Za-z_0-9.-]+)\2")
_OPENERS = {"if": "fi", "do": "done", "case": "esac", "{": "}"}


def strip_heredocs(text: str) -> tuple[str, bool]:
    """The command text without here-document bodies (they are the command's input, not commands), and
    whether a here-document is still open (the shell waits for its terminator line)."""
    lines = text.split("\n")
    out: list[str] = []
    waiting: list[tuple[str, bool]] = []
    for line in lines:
        if waiting:
            word, tabs = waiting[0]
            if (line.lstrip("\t") if tabs else line) == word:
                waiting.pop(0)
            continue
        out.append(line)
        for m in _HEREDOC.finditer(line):
            if line[max(0, m.start() - 1):m.start()] != "<" and not line.startswith("<", m.end() - len(m.group(0)) + 2):
                waiting.append((m.group(3), m.group(1) == "-"))
    return "\n".join(out), bool(waiting)


def incomplete(text: str) -> bool:
    """Whether a shell would read more lines before running ``text``: an open quote, a trailing backslash,
    pipe or ``&&``, an open here-document, or ``if``/``do``/``case``/``{`` without its closing word."""
    body, open_heredoc = strip_heredocs(text)
    if open_heredoc:
        return True
    stripped = body.rstrip()
    if stripped.endswith(("\\", "|", "&&")) and not stripped.endswith("\\\\"):
        return True
    try:
        tokens = _tokenize(body)
    except _ParseError as exc:
        return "not closed" in str(exc)
    depth: dict[str, int] = {}
    first = True
    for tok in tokens:
        if isinstance(tok, str):
            first = tok in ";&|(\n"
            continue
        word = tok[0]
        if first and word in _OPENERS:
            depth[word] = depth.get(word, 0) + 1
        elif first and word in _OPENERS.values():
            opener = next(k for k, v in _OPENERS.items() if v == word)
            depth[opener] = depth.get(opener, 0) - 1
        first = first and word in ("then", "else", "elif", "do", "{", "!", "if", "while", "until", "time")
    return any(v > 0 for v in depth.values())


def closed_for_judging(text: str) -> str:
    """``text`` with here-document bodies left out and open quotes closed, so that a command the shell is
    still reading (or one it runs although this reader thinks it incomplete, e.g. a quote in a comment)
    is judged on everything typed so far."""
    body = strip_heredocs(text)[0]
    for _ in range(4):
        try:
            _tokenize(body)
            return body
        except _ParseError as exc:
            msg = str(exc)
            if "single quote" in msg or "$'" in msg:
                body += "'"
            elif "double quote" in msg:
                body += '"'
            else:
                return body
    return body
