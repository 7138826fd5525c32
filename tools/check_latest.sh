#!/usr/bin/env bash
# Drift check: build a fresh virtual environment with the newest versions sid_fast's ranges allow (CPU torch pinned as
# install.sh pins it), run the import-name test and the fast lane there, and print what differs from the committed lock.
#
#   tools/check_latest.sh                 # report only
#   tools/check_latest.sh --update-lock   # and, when the tests pass, write the new versions to the lock
#   VENV=/path tools/check_latest.sh      # where to build the environment (default: a new temporary folder)
#
# The lock (requirements/lock-linux-cpu.txt) is what install.sh installs on a CPU Linux machine; regenerating it is
# this command with --update-lock, so the lock only ever holds versions the tests passed with.
set -euo pipefail
cd "$(dirname "$0")/.."
update=0
[ "${1:-}" = "--update-lock" ] && update=1
PY=${PYTHON:-python3}
LOCK=requirements/lock-linux-cpu.txt
venv=${VENV:-$(mktemp -d)/venv}
echo "check_latest: building $venv ($($PY --version))"
$PY -m venv "$venv"
pip=("$venv/bin/python" -m pip)
"${pip[@]}" install --quiet --upgrade pip
# torch and triton exactly as install.sh pins them; everything else at the newest version its range admits.
"${pip[@]}" install --quiet "torch==$(sed -n 's/^torch==\([0-9.]*\).*/\1/p' "$LOCK")" \
  "triton==$(sed -n 's/^triton==//p' "$LOCK")"
"${pip[@]}" install --quiet -e ".[test]"
new=$(mktemp)
"${pip[@]}" freeze --exclude-editable | sort -f >"$new"
echo "check_latest: versions that differ from $LOCK (- locked, + newest):"
changes=$(diff <(grep -v '^#' "$LOCK" | sort -f) "$new" | sed -n 's/^< /  - /p; s/^> /  + /p' || true)
echo "${changes:-  (none)}"
rc=0
"$venv/bin/python" -m pytest -q tests/test_import_names.py || rc=1
if [ $rc -eq 0 ]; then
  "$venv/bin/python" -m pytest -q -n 2 -m "not slow" || rc=1
fi
if [ $rc -ne 0 ]; then
  echo "check_latest: FAILED with the newest versions; the lock is unchanged." >&2
  exit 1
fi
echo "check_latest: the import test and the fast lane pass with the newest versions."
if [ $update -eq 1 ]; then
  {
    echo "# The versions sid_fast's suite last passed with on CPU Linux (x86-64, $($PY --version)); install.sh installs"
    echo "# from it. Regenerate with tools/check_latest.sh --update-lock (fresh venv, newest versions, tests, then this)."
    cat "$new"
  } >"$LOCK"
  echo "check_latest: wrote $LOCK."
fi
