#!/usr/bin/env bash
# Install what medbroker's tests and demo need (OpenSSH, asciinema, the package); idempotent, non-interactive.
#
#   scripts/install.sh                 install whatever is missing, one line per step
#   scripts/install.sh --print-python  print the interpreter the project is installed into, install nothing
#
# Python: $MEDBROKER_PYTHON if set, else ./.venv if it exists, else python3 when it is >= 3.11 and pip may
# install into it (an active venv, or a python without Debian's EXTERNALLY-MANAGED marker); otherwise a
# ./.venv is created. Works as root on a fresh Debian machine and in CI (CI=true, no stdin); uses sudo only
# when not root.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
export DEBIAN_FRONTEND=noninteractive

step() { printf 'install: %s\n' "$*"; }
die() { printf 'install: error: %s\n' "$*" >&2; exit 1; }

sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || die "not root and sudo is missing; run as root or install sudo"
  sudo_cmd=(sudo)
fi

apt_updated=0
apt_install() {
  command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install these yourself: $*"
  if [ "$apt_updated" -eq 0 ]; then
    step "apt-get update"
    "${sudo_cmd[@]}" apt-get update -qq </dev/null
    apt_updated=1
  fi
  step "apt-get install $*"
  "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "$@" </dev/null >/dev/null
}

python_ok() {  # usable for the project: >= 3.11
  "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null
}

pip_allowed() {  # pip may install into it: inside a venv, or not marked externally managed (PEP 668)
  "$1" - <<'EOF' 2>/dev/null
import os, sys, sysconfig
in_venv = sys.prefix != sys.base_prefix
managed = os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))
sys.exit(0 if in_venv or not managed else 1)
EOF
}

choose_python() {  # prints the interpreter to use, or nothing if a venv must be created
  if [ -n "${MEDBROKER_PYTHON:-}" ]; then
    printf '%s\n' "$MEDBROKER_PYTHON"
  elif [ -x "$repo/.venv/bin/python" ]; then
    printf '%s\n' "$repo/.venv/bin/python"
  elif command -v python3 >/dev/null 2>&1 && python_ok python3 && pip_allowed python3; then
    python3 -c 'import sys; print(sys.executable)'
  fi
}

if [ "${1:-}" = "--print-python" ]; then
  py="$(choose_python)"
  [ -n "$py" ] || die "no usable python yet; run scripts/install.sh first"
  printf '%s\n' "$py"
  exit 0
fi
[ $# -eq 0 ] || die "unknown argument: $1 (usage: scripts/install.sh [--print-python])"

# 1. OpenSSH server and clients (the fake devices are real sshd processes).
missing=()
[ -x /usr/sbin/sshd ] || missing+=(/usr/sbin/sshd)
for tool in ssh scp sftp ssh-keygen; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  step "OpenSSH missing (${missing[*]})"
  apt_install openssh-server openssh-client
else
  step "OpenSSH present ($(ssh -V 2>&1))"
fi

# 2. asciinema (tests validate derived asciicast files with `asciinema cat`).
if command -v asciinema >/dev/null 2>&1; then
  step "asciinema present"
else
  apt_install asciinema
fi

# 2b. rsync (tests drive a real rsync client through the broker to show its stream is refused).
if command -v rsync >/dev/null 2>&1; then
  step "rsync present"
else
  apt_install rsync
fi

# 2b2. PuTTY's command-line tools (tests/test_putty.py drives puttygen, plink, pscp and psftp through the broker;
# tests/test_proxyjump.py runs plink's -proxycmd jump).
if command -v puttygen >/dev/null 2>&1 && command -v plink >/dev/null 2>&1 && command -v pscp >/dev/null 2>&1 \
    && command -v psftp >/dev/null 2>&1; then
  step "putty-tools present"
else
  apt_install putty-tools
fi

# 2b3. lftp and rclone (tests/test_automation_clients.py: `lftp mirror` and rclone's SFTP backend through the broker).
if command -v lftp >/dev/null 2>&1 && command -v rclone >/dev/null 2>&1; then
  step "lftp and rclone present"
else
  apt_install lftp rclone
fi

# 2c. OpenLDAP's slapd (tests/test_directory.py starts a real directory on loopback; never as a service).
if [ -x /usr/sbin/slapd ]; then
  step "slapd present"
else
  # The package's postinst would configure and start a system slapd: preseed it to stay unconfigured.
  if command -v debconf-set-selections >/dev/null 2>&1; then
    echo "slapd slapd/no_configuration boolean true" | "${sudo_cmd[@]}" debconf-set-selections
  fi
  apt_install slapd
fi

# 2d. HAProxy (tests/helpers/haproxy.py starts its own in the foreground on loopback; never the system service).
if command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ]; then
  step "haproxy present"
else
  # The package's postinst would start the service: a policy-rc.d that answers 101 ("not allowed") stops it,
  # unless the machine already has one (containers usually do).
  policy=/usr/sbin/policy-rc.d
  added_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${sudo_cmd[@]}" tee "$policy" >/dev/null
    "${sudo_cmd[@]}" chmod 755 "$policy"
    added_policy=1
  fi
  status=0
  apt_install haproxy || status=$?
  [ "$added_policy" -eq 0 ] || "${sudo_cmd[@]}" rm -f "$policy"
  [ "$status" -eq 0 ] || die "installing haproxy failed"
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    "${sudo_cmd[@]}" systemctl disable --now haproxy >/dev/null 2>&1 || true
  fi
fi

# 2e. OpenStack Swift with its s3api middleware (tests/helpers/swift.py: an S3-compatible server on loopback for
#     [archive]; the tests build their own rings and configs in a temp dir and never use /etc/swift or services).
if [ -x /usr/bin/swift-proxy-server ] && [ -x /usr/bin/swift-object-server ] && [ -x /usr/bin/swift-ring-builder ] \
    && [ -x /usr/bin/swift-account-server ] && [ -x /usr/bin/swift-container-server ]; then
  step "swift present"
else
  apt_install swift swift-proxy swift-account swift-container swift-object
fi

# 2e. PostgreSQL 15 and its contrib modules (pg_trgm) for the PostgreSQL store's tests ([store] url; tests start
# their own throwaway cluster as an unprivileged user). The package's cluster is not used: stop and disable it.
if [ -x /usr/lib/postgresql/15/bin/initdb ] && [ -f /usr/share/postgresql/15/extension/pg_trgm.control ]; then
  step "postgresql-15 present"
else
  apt_install postgresql-15 postgresql-contrib
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    "${sudo_cmd[@]}" systemctl disable --now postgresql >/dev/null 2>&1 || true
  fi
fi

# 3. Python >= 3.11 that pip may install into.
py="$(choose_python)"
if [ -z "$py" ]; then
  if ! command -v python3 >/dev/null 2>&1 || ! python_ok python3; then
    apt_install python3 python3-venv
    python_ok python3 || die "python3 is older than 3.11; set MEDBROKER_PYTHON to a newer interpreter"
  fi
  if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    apt_install python3-venv
  fi
  step "creating .venv (python3 is externally managed)"
  python3 -m venv "$repo/.venv"
  py="$repo/.venv/bin/python"
fi
step "python $("$py" -c 'import sys; print(sys.version.split()[0], sys.executable)')"

# 3b. A C compiler and Python's headers for the one compiled part (sessions/_fastscan.c, the deep scanner's byte
#     scans; setup.py). It is optional: without them medbroker installs and scans in pure Python, slower.
if command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1; then
  step "C compiler present"
elif command -v apt-get >/dev/null 2>&1; then
  apt_install gcc libc6-dev
else
  step "no C compiler and no apt-get: the deep scanner's byte scans will run in pure Python (slower)"
fi
headers_ok='import os, sys, sysconfig; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'
if "$py" -c "$headers_ok"; then
  step "Python headers present"
elif command -v apt-get >/dev/null 2>&1; then
  apt_install python3-dev
else
  step "no Python headers and no apt-get: the deep scanner's byte scans will run in pure Python (slower)"
fi

# 4. The package with its test extras, editable. pip answers quickly when everything is satisfied, but
#    an editable build still costs seconds, so skip it while pyproject.toml, setup.py and the C source are
#    unchanged and it imports (an editable install builds the extension in place: a changed C file needs it).
stamp_dir="${XDG_CACHE_HOME:-$HOME/.cache}/medbroker"
stamp="$stamp_dir/install-$(printf '%s' "$repo:$py" | sha256sum | cut -c1-16).stamp"
want="$(cat pyproject.toml setup.py sessions/_fastscan.c | sha256sum | cut -d' ' -f1)"
installed_ok() {
  # -I and cd /: look at what is installed, not at the source tree's medbroker.egg-info.
  [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && (cd / && "$py" -I - "$repo") <<'EOF' 2>/dev/null
import importlib.metadata as md, json, sys
dist = md.distribution("medbroker")
url = json.loads(dist.read_text("direct_url.json") or "{}").get("url", "")
assert url.rstrip("/") == "file://" + sys.argv[1].rstrip("/"), url
import asyncssh, cryptography, typer, sqlite_utils, pyotp, qrcode, pyte, pytest, hypothesis, paramiko, mypy, boto3  # noqa
EOF
}
extension_ok() {
  # An editable install builds sessions/_fastscan.c into the work tree: a fresh clone at the same path (same stamp)
  # has no build of it yet. Without a compiler there is nothing to build.
  if command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1; then
    compgen -G "$repo/sessions/_fastscan*.so" >/dev/null
  fi
}
pip_flags=(-q --disable-pip-version-check)
[ "$(id -u)" -ne 0 ] || pip_flags+=(--root-user-action=ignore)
if installed_ok && extension_ok; then
  step "medbroker[test] already installed (pyproject.toml unchanged)"
else
  step "pip install -e .[test]"
  "$py" -m pip install "${pip_flags[@]}" -e "$repo[test]" </dev/null
  mkdir -p "$stamp_dir" && printf '%s\n' "$want" >"$stamp"
fi
# 5. Optional, medbroker[fast]: Hyperscan makes the stream judge's search of binary data ~5x cheaper
#    (sessions/anchors.py). Verdicts are the same without it, so a machine that cannot get it (no wheel for this
#    platform, no index) goes on; one attempt per pyproject.toml, briefly.
fast_stamp="$stamp.fast"
if "$py" -c 'import hyperscan' 2>/dev/null; then
  step "hyperscan present (medbroker[fast])"
elif [ "$(uname -m)" = x86_64 ] && [ "$(cat "$fast_stamp" 2>/dev/null)" != "$want" ]; then
  if "$py" -m pip install "${pip_flags[@]}" --timeout 15 --retries 1 -e "$repo[fast]" </dev/null >/dev/null 2>&1; then
    step "hyperscan installed (medbroker[fast])"
  else
    step "hyperscan not available here: binary streams are searched in pure Python (same verdicts, slower)"
    mkdir -p "$stamp_dir" && printf '%s\n' "$want" >"$fast_stamp"
  fi
fi
# ---- web console tests (owner: web console; keep this block self-contained) -------------------------
# Headless Chromium from Debian for tests/test_web_*.py (Playwright drives /usr/bin/chromium; it never
# downloads a browser of its own, and `playwright install` is not used).
web_browser() {
  if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    step "chromium present ($(/usr/bin/chromium --version 2>/dev/null | head -n1))"
  else
    apt_install chromium chromium-driver
  fi
}
web_browser
# ---- end of web console block -------------------------------------------------------------------------
step "done"
