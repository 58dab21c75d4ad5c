#!/usr/bin/env bash
# Newcomer's sandbox: install what is missing, then run `medbroker demo` (broker + local sshd device + users).
#
#   scripts/demo.sh [medbroker demo args...]
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

bash scripts/install.sh
py="$(bash scripts/install.sh --print-python)"
medbroker="$(dirname "$py")/medbroker"
if [ ! -x "$medbroker" ]; then
  medbroker="$(command -v medbroker || true)"
fi
if [ -z "$medbroker" ]; then
  printf 'demo: error: the medbroker command was not installed next to %s; rerun scripts/install.sh\n' "$py" >&2
  exit 1
fi
exec "$medbroker" demo "$@"
