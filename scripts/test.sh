#!/usr/bin/env bash
# Run the test suite the way CI does: install what is missing, type-check, then pytest with the given arguments.
#
#   scripts/test.sh [pytest args...]     e.g. scripts/test.sh -k sftp -x
#
# First mypy over medcore, broker and sessions ([tool.mypy] in pyproject.toml; cache in .mypy_cache): any
# type error fails the run before pytest starts, with the line "test: mypy: N errors" (a warm run takes
# well under a second, so it always runs; for one test alone, call pytest directly).
#
# Sets MEDBROKER_REQUIRE_OPENSSH=1 (missing OpenSSH fails instead of skipping) and HYPOTHESIS_PROFILE
# (ci when $CI is set, else dev; an explicit HYPOTHESIS_PROFILE wins). Exits with pytest's status;
# "no tests collected" (5) is reported as the failure it is.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

bash scripts/install.sh
py="$(bash scripts/install.sh --print-python)"

export MEDBROKER_REQUIRE_OPENSSH=1
export MEDBROKER_REQUIRE_BROWSER=1  # web console: a missing chromium fails instead of skipping
case "${CI:-}" in
  "" | 0 | false | no) default_profile=dev ;;
  *) default_profile=ci ;;
esac
export HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-$default_profile}"
printf 'test: pytest with HYPOTHESIS_PROFILE=%s MEDBROKER_REQUIRE_OPENSSH=1\n' "$HYPOTHESIS_PROFILE"

mypy_out="$(mktemp)"
trap 'rm -f "$mypy_out"' EXIT
mypy_status=0
"$py" -m mypy >"$mypy_out" 2>&1 || mypy_status=$?
if [ "$mypy_status" -ne 0 ]; then
  cat "$mypy_out"
  errors="$(grep -c ': error: ' "$mypy_out" || true)"
  printf 'test: mypy: %s errors (exit %s); fix them before the tests run\n' "$errors" "$mypy_status" >&2
  exit 1
fi
printf 'test: mypy: 0 errors (%s)\n' "$(tail -n1 "$mypy_out")"

# Several pytest processes (pytest-xdist): most of a test's time is spent waiting on sshd, clients and servers,
# so three workers on two cores finish sooner than one (CI: 14 -> 7 minutes). MEDBROKER_TEST_WORKERS=0 runs in
# this process (what -x/--pdb debugging wants); an explicit -n/--numprocesses or -p no:xdist in the arguments
# wins. pytest-benchmark, if a machine has it, is kept out: it warns under xdist, and warnings are errors here.
workers="${MEDBROKER_TEST_WORKERS:-3}"
parallel=()
case " $* " in
  *" -n"* | *" --numprocesses"* | *"no:xdist"*) ;;
  *) if [ "$workers" != 0 ]; then parallel=(-n "$workers" --dist worksteal -p no:benchmark); fi ;;
esac
printf 'test: %s\n' "${parallel[*]:-one process}"

status=0
"$py" -m pytest "${parallel[@]}" "$@" || status=$?
if [ "$status" -eq 5 ]; then
  printf 'test: error: pytest collected no tests (exit 5); check the arguments and tests/\n' >&2
fi
exit "$status"
