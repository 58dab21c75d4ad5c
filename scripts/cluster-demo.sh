#!/usr/bin/env bash
# The cluster on one machine: PostgreSQL + Swift (S3) + HAProxy + two broker nodes + a real sshd device.
#
#   scripts/cluster-demo.sh [--dir DIR]           install what is missing, start everything, print the commands;
#                                                  Ctrl-C stops it all
#   scripts/cluster-demo.sh --check [--dir DIR]   the same, then run the walkthrough by itself and stop
#                                                  (exit 0 only when every step passed)
#   scripts/cluster-demo.sh stop [--dir DIR]      stop a demo running in another terminal
#   --no-install                                  skip scripts/install.sh (everything is installed already)
#   --keep                                        keep DIR (home, people, logs) after stopping
#
# State (databases, bucket, home, logs) lives under DIR, default /tmp/medbroker-cluster-demo; it must be
# reachable by other users (PostgreSQL runs as nobody when started by root).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

dir=/tmp/medbroker-cluster-demo
install=1
stop=0
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    stop) stop=1 ;;
    --no-install) install=0 ;;
    --dir) dir="$2"; shift ;;
    --dir=*) dir="${1#--dir=}" ;;
    --check|--keep) args+=("$1") ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) printf 'cluster-demo: unknown argument %s (see --help)\n' "$1" >&2; exit 2 ;;
  esac
  shift
done

if [ "$stop" = 1 ]; then
  pid_file="$dir/cluster-demo.pid"
  if [ ! -s "$pid_file" ]; then
    printf 'cluster-demo: nothing running in %s (no %s)\n' "$dir" "$pid_file" >&2
    exit 1
  fi
  pid="$(cat "$pid_file")"
  kill -TERM "$pid" 2>/dev/null || { printf 'cluster-demo: pid %s is gone\n' "$pid" >&2; rm -f "$pid_file"; exit 1; }
  for _ in $(seq 1 120); do  # bounded: 60 s for every server to stop
    # the demo removes its pid file once everything is down (its own pid may linger as a zombie meanwhile)
    if [ ! -e "$pid_file" ] || ! kill -0 "$pid" 2>/dev/null; then echo "cluster-demo: stopped"; exit 0; fi
    sleep 0.5
  done
  printf 'cluster-demo: pid %s still running after 60 s; look at %s/*.log\n' "$pid" "$dir" >&2
  exit 1
fi

if [ "$install" = 1 ]; then
  bash scripts/install.sh
  py="$(bash scripts/install.sh --print-python)"
else
  py="${PYTHON:-python3}"
fi
exec "$py" scripts/cluster_demo.py --dir "$dir" "${args[@]}"
