#!/usr/bin/env bash
# Set-up for sid_fast on a fresh machine. Idempotent; safe to run before every command.
#  - CPU machine (no nvidia-smi): installs torch==2.13.0, the CPU build, and the matching triton 3.7.1.
#  - GPU machine: keeps the CUDA torch (>= 2.11) already installed; installs torch only if none is present.
# Then installs sid_fast (editable) with its test dependencies at the exact versions of the committed lock
# (requirements/lock-linux-cpu.txt: what the suite last passed with; its torch and triton lines are left out where a
# CUDA torch is kept), and the installed torch is held fixed so that no dependency can replace it.
# SID_FAST_UNLOCKED=1 ./install.sh installs from pyproject.toml's ranges instead (e.g. on a Python the lock has no
# wheels for); tools/check_latest.sh tries the newest versions those ranges allow and regenerates the lock.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
LOCK=requirements/lock-linux-cpu.txt
torch_of() { sed -n "s/^$1==//p" "$LOCK"; }
have_torch=$($PY - <<'PYEOF' 2>/dev/null || echo none
import torch
v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
print("ok" if v >= (2, 11) else "old")
PYEOF
)
if [ "$have_torch" != "ok" ]; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "install.sh: a GPU machine without torch >= 2.11: install the CUDA build of torch first (see README.md)." >&2
    exit 1
  fi
  $PY -m pip install --quiet "torch==$(torch_of torch | sed 's/+cpu$//')" "triton==$(torch_of triton)"
fi
# The constraints: the torch (and triton) now installed, exactly; everything else as locked.
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
$PY - >"$constraints" <<'PYEOF'
import importlib.metadata as md
for name in ("torch", "triton"):
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        pass
PYEOF
if [ "${SID_FAST_UNLOCKED:-0}" != "1" ]; then
  grep -vE '^(#|torch==|triton==|nvidia-)' "$LOCK" >>"$constraints"
fi
$PY -m pip install --quiet -c "$constraints" -e ".[test]"
# The native sampler (CMakeLists.txt) needs cmake >= 3.18 and a C++17 compiler; AOTInductor needs the compiler too.
if ! command -v cmake >/dev/null 2>&1; then
  $PY -m pip install --quiet -c "$constraints" "cmake>=3.18"
fi
if ! command -v c++ >/dev/null 2>&1 && ! command -v g++ >/dev/null 2>&1; then
  echo "install.sh: no C++ compiler (c++/g++) found: the exporter and the native sampler need one (e.g. apt-get install g++)." >&2
fi
