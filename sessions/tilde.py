"""``~alice@ct-01`` (the vendor's broker login as a tilde prefix) means the device login's home.

Automation that expands ``~<ansible_user>`` (Ansible: ``mkdir -p "` echo ~alice@ct-01/.ansible/tmp `"``,
``echo ~alice@ct-01``) sends the routing login, which is no account on the device: the device's shell
leaves it unexpanded and creates a literal ``~alice@ct-01`` directory in the login's home, and OpenSSH 9's
scp (which speaks SFTP) sends the path still wrapped in the quotes Ansible added for a remote shell
(``'~alice@ct-01/.ansible/tmp/…'``). The broker knows which device login it used, so it rewrites the
prefix before anything judges or runs the command or path:

* exec command lines: ``~LOGIN`` that begins a shell word becomes ``~``; a word that is a quoted
  ``'~LOGIN/rest'`` (or ``"…"``, or quoted again inside ``sh -c '…'`` as ``'"'"'~LOGIN'"'"'``, which is how
  Ansible sends ``echo '~alice@ct-01'``) becomes ``~/'rest'``, so the device's shell expands it to the home;
* SFTP paths: ``~LOGIN`` / ``~LOGIN/rest`` and the quoted ``'~LOGIN/rest'`` become ``.`` / ``rest``
  (the SFTP server's relative paths start in the login's home).

Pure: no I/O. The caller records the rewrite and hands the rewritten text to the guards (so
``~alice@ct-01/../..`` is judged as ``~/../..``, resolved on the device like any other path).
"""

from __future__ import annotations

__all__ = ["LoginTilde"]

# Characters after which a shell word begins (unquoted), and after which a tilde prefix ends.
_WORD_START = frozenset(" \t\n;&|()<>`")
_PREFIX_END = frozenset(" \t\n;&|()<>`/")
# Quote sequences that open (and close) a word: plain quotes, and a quote inside a single-quoted ``sh -c '…'``
# argument as shlex.quote / Ansible nest it ('"'"' ) or as people write it ('\'').
_QUOTES = ("'\"'\"'", "'\\''", "'", '"')


class LoginTilde:
    """Rewrites ``~USER@DEVICE`` for one login (``login`` is ``USER@DEVICE`` as the vendor typed it)."""

    def __init__(self, login: str) -> None:
        if not login or "@" not in login:
            raise ValueError(f"not a USER@DEVICE login: {login!r}")
        self.login = login
        self.prefix = "~" + login

    def rewrite_command(self, command: str) -> str | None:
        """The command with every word-initial ``~USER@DEVICE`` pointing at the home, or None if unchanged."""
        prefix, n = self.prefix, len(self.prefix)
        if prefix not in command:
            return None
        out: list[str] = []
        i, size, changed = 0, len(command), False
        while i < size:
            at_word = i == 0 or command[i - 1] in _WORD_START
            c = command[i]
            if at_word and command.startswith(prefix, i):
                after = command[i + n] if i + n < size else ""
                if after == "" or after in _PREFIX_END:
                    out.append("~")
                    i += n
                    changed = True
                    continue
            quote = next((q for q in _QUOTES if command.startswith(q + prefix, i)), None) if at_word else None
            if quote is not None:
                j = i + len(quote) + n
                if command.startswith("/", j):  # '~alice@ct-01/rest' -> ~/'rest'
                    out.append("~/" + quote)
                    i, changed = j + 1, True
                    continue
                if command.startswith(quote, j):  # '~alice@ct-01' -> ~
                    out.append("~")
                    i, changed = j + len(quote), True
                    continue
            out.append(c)
            i += 1
        return "".join(out) if changed else None

    def rewrite_sftp_path(self, path: bytes) -> bytes | None:
        """An SFTP path with the prefix (bare, or inside one pair of quotes) made home-relative, or None."""
        prefix = self.prefix.encode("utf-8", "surrogateescape")
        body = path
        if len(path) >= 2 and path[:1] in (b"'", b'"') and path[-1:] == path[:1] and path[1:].startswith(prefix):
            body = path[1:-1]
        if body == prefix or body == prefix + b"/":
            return b"."
        if body.startswith(prefix + b"/"):
            rest = body[len(prefix) + 1:].lstrip(b"/")
            return rest or b"."
        return None
