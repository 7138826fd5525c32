#!/usr/bin/env bash
# Set-up for sid_fast on a fresh machine. Idempotent; safe to run before every command.
#  - CPU machine (no nvidia-smi): installs torch==2.13.0, the CPU build, and the matching triton 3.7.1.
#  - GPU machine: keeps the CUDA torch (>= 2.11) already installed; installs torch only if none is present.
# Then installs sid_fast (editable) with its light dependencies; the pinned torch satisfies `torch>=2.11`,
# so pip never pulls a second torch.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
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
  $PY -m pip install --quiet "torch==2.13.0" "triton==3.7.1"
fi
$PY -m pip install --quiet -e ".[test]"
# The native sampler (CMakeLists.txt) needs cmake >= 3.18 and a C++17 compiler; AOTInductor needs the compiler too.
if ! command -v cmake >/dev/null 2>&1; then
  $PY -m pip install --quiet "cmake>=3.18"
fi
if ! command -v c++ >/dev/null 2>&1 && ! command -v g++ >/dev/null 2>&1; then
  echo "install.sh: no C++ compiler (c++/g++) found: the exporter and the native sampler need one (e.g. apt-get install g++)." >&2
fi
