#!/usr/bin/env bash
# Nsight Systems profile of steady-state SiD iterations (capture range = cudaProfilerStart/Stop after warm-up).
#   profile/nsys.sh prof/cifar10-bf16 --config cifar10 --batch-gpu 64 --precision bf16 --channels-last --compile
# Writes OUT.nsys-rep and a CUDA kernel summary OUT-kernels.csv (nsys stats). Options go to profile/nsys_step.py.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: profile/nsys.sh OUT [nsys_step.py options]" >&2
  exit 2
fi
out=$1; shift
command -v nsys >/dev/null 2>&1 || { echo "profile/nsys.sh: nsys (Nsight Systems) is not on PATH." >&2; exit 1; }
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$(dirname "$out")"
nsys profile --capture-range=cudaProfilerApi --capture-range-end=stop --trace=cuda,nvtx,osrt,cudnn,cublas \
  --force-overwrite=true -o "$out" python3 "$here/nsys_step.py" "$@"
nsys stats --report cuda_gpu_kern_sum --format csv --output "$out-kernels" "$out.nsys-rep" || true
echo "profile/nsys.sh: $out.nsys-rep"
