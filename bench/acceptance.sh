#!/usr/bin/env bash
# The GPU acceptance run: everything a first GPU (ours or a user's) should settle, in one command, under 9 minutes
# on one H100, with every raw result, a markdown summary and the plots in OUTDIR.
#
#   bench/acceptance.sh OUTDIR          # on a CUDA machine
#   bench/acceptance.sh --cpu OUTDIR    # the same steps at toy sizes on a CPU (what CI runs, so the script cannot rot)
#
# Steps (each under its own time limit; a failing step is recorded and the run goes on):
#   env          GPU name, driver, torch / triton / CUDA versions, git commit            -> env.json
#   gpu_tests    the pytest tests marked gpu (kernels vs float64 at EDM shapes, compile, export)  -> gpu_tests.log
#   kernels      kernel benchmarks at the official shapes (bench.kernels)               -> kernels.jsonl/.md/.png
#   ladder_*     the training-step ladder for cifar10, then imagenet64 if time remains  -> train_step_*.jsonl/.md/.png
#   predicted    measured / predicted img/s for every rung of each ladder (bench.predict's model, committed
#                before any GPU ran it: bench/results/predicted_ladder.md)                -> predicted_vs_measured.txt
#   memory       bench.memory: cifar10 rungs on CUDA, torch.cuda.max_memory_allocated vs the prediction -> memory.jsonl/.md
#   nsys         one Nsight Systems capture of the bf16+kernels+compile step, if nsys is on PATH
#   export       CUDA export of a generator and the native sampler (cmake + ctest native_smoke) if cmake exists
# steps.jsonl holds one line per step (name, rc, seconds, log); summary.md gathers the tables.
# Runs as is with torch 2.11 / triton 3.6 and no network (nothing is downloaded).
set -uo pipefail

cpu=0
if [ "${1:-}" = "--cpu" ]; then cpu=1; shift; fi
if [ $# -ne 1 ]; then
  echo "usage: bench/acceptance.sh [--cpu] OUTDIR" >&2
  exit 2
fi
out=$(mkdir -p "$1" && cd "$1" && pwd) || { echo "bench/acceptance.sh: cannot create OUTDIR '$1'." >&2; exit 2; }
cd "$(dirname "$0")/.." || exit 2
py=${PYTHON:-python3}
budget=${SID_FAST_ACCEPTANCE_BUDGET:-540}  # seconds for the whole run
export PYTHONUNBUFFERED=1
if [ $cpu = 0 ] && ! $py -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "bench/acceptance.sh: no CUDA device is visible to $py; use --cpu for the CPU mode." >&2
  exit 2
fi
if [ $cpu = 1 ]; then export TRITON_INTERPRET=1; fi
: > "$out/steps.jsonl"
failed=0

# step NAME LIMIT_S CMD...: run CMD with a time limit, log to OUTDIR/NAME.log, record the result.
step() {
  local name=$1 limit=$2; shift 2
  local left=$((budget - SECONDS))
  if [ "$left" -le 10 ]; then
    echo "{\"step\": \"$name\", \"rc\": null, \"skipped\": \"budget spent\"}" >> "$out/steps.jsonl"
    echo "[$name] skipped: the ${budget}s budget is spent"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$SECONDS
  echo "[$name] (limit ${limit}s) $*"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  local dt=$((SECONDS - t0))
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $dt, \"limit_s\": $limit, \"log\": \"$name.log\"}" >> "$out/steps.jsonl"
  if [ $rc -ne 0 ]; then failed=1; echo "[$name] failed (rc $rc, ${dt}s): see $out/$name.log"; tail -5 "$out/$name.log"; else echo "[$name] ok (${dt}s)"; fi
}
skip() {
  echo "{\"step\": \"$1\", \"rc\": null, \"skipped\": \"$2\"}" >> "$out/steps.jsonl"
  echo "[$1] skipped: $2"
}

step env 60 $py -c "
import json, platform, subprocess, torch, triton
from bench.common import environment
e = environment()
e.update(python=platform.python_version(), cuda_available=torch.cuda.is_available(), cpu_mode=bool($cpu))
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    e.update(gpu=p.name, capability=f'{p.major}.{p.minor}', memory_gb=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count)
    try:
        e['driver'] = subprocess.run(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'], capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as x:
        e['driver'] = f'unknown ({type(x).__name__})'
json.dump(e, open('$out/env.json', 'w'), indent=1)
print(json.dumps(e))
"

if [ $cpu = 1 ]; then
  step gpu_tests 120 $py -m pytest -q -m gpu tests/kernels -p no:cacheprovider
  step kernels 240 $py -m bench.kernels --shapes tiny --out "$out/kernels.jsonl"
  step ladder_digits 240 $py -m bench.train_step --config digits --batch-gpu 4 --steps 1 --warmup 1 \
    --rungs reference --out "$out/train_step_digits.jsonl"
  step memory 120 $py -m bench.memory --configs cifar10 --rungs reference --out "$out/memory.jsonl"
else
  step gpu_tests 150 $py -m pytest -q -m gpu tests -p no:cacheprovider
  step kernels 110 $py -m bench.kernels --out "$out/kernels.jsonl"
  step ladder_cifar10 170 $py -m bench.train_step --config cifar10 --batch-gpu 64 --steps 8 --warmup 2 \
    --out "$out/train_step_cifar10.jsonl"
  step memory 90 $py -m bench.memory --device cuda --configs cifar10 --rungs reference,bf16,+kernels,+ckpt_nets \
    --batches 8,16 --out "$out/memory.jsonl"
  # SiD-LSG at SD 1.5's official shapes (random weights; 512 px, kappa 2): the meta device's byte counts against
  # torch.cuda.max_memory_allocated, for the fast path's bf16 and recomputing rungs.
  if [ $((budget - SECONDS)) -gt 300 ]; then
    step memory_sd15 150 $py -m bench.memory --device cuda --configs sd15 --rungs bf16,+ckpt_selective \
      --batches 2,4 --out "$out/memory_sd15.jsonl"
  else
    skip memory_sd15 "under 300 s of the budget left"
  fi
  if [ $((budget - SECONDS)) -gt 150 ]; then
    step ladder_imagenet64 120 $py -m bench.train_step --config imagenet64 --batch-gpu 32 --steps 5 --warmup 2 \
      --rungs reference,bf16,+channels_last,+kernels,+checkpointing --out "$out/train_step_imagenet64.jsonl"
  else
    skip ladder_imagenet64 "under 150 s of the budget left"
  fi
fi

# The first GPU run tests a prediction: measured / predicted per rung (CPU mode: the digits reference, so the
# comparison cannot rot).
for f in "$out"/train_step_*.jsonl; do
  [ -s "$f" ] || continue
  $py -m bench.predict --compare "$f" >> "$out/predicted_vs_measured.txt" 2>&1 || echo "bench.predict failed for $f" >> "$out/predicted_vs_measured.txt"
done
[ -s "$out/predicted_vs_measured.txt" ] && cat "$out/predicted_vs_measured.txt"

if [ $cpu = 0 ] && command -v nsys > /dev/null 2>&1; then
  step nsys 90 profile/nsys.sh "$out/nsys-cifar10" --config cifar10 --batch-gpu 64 --precision bf16 \
    --channels-last --kernels all --warmup 3 --steps 3
else
  skip nsys "$([ $cpu = 1 ] && echo 'CPU mode' || echo 'nsys is not on PATH')"
fi

if [ $cpu = 0 ] && command -v cmake > /dev/null 2>&1; then
  step export 120 bash -c "cmake -S . -B '$out/build' -DSID_FAST_PYTHON=$(command -v $py) > /dev/null && \
    cmake --build '$out/build' -j > /dev/null && ctest --test-dir '$out/build' --output-on-failure && \
    PATH='$out/build':\$PATH $py -m pytest -q -m gpu tests/test_export.py -p no:cacheprovider"
else
  skip export "$([ $cpu = 1 ] && echo 'CPU mode' || echo 'cmake is not on PATH')"
fi

# Render every result file that exists; the summary lists the steps and embeds the tables.
for f in "$out"/kernels.jsonl "$out"/train_step_*.jsonl; do
  [ -s "$f" ] || continue
  b=${f%.jsonl}
  $py -m bench.report "$f" --md "$b.md" --png "$b.png" >> "$out/report.log" 2>&1 || echo "report failed for $f" >> "$out/report.log"
done
if [ -s "$out/memory.jsonl" ]; then
  $py -m bench.report "$out/memory.jsonl" --md "$out/memory.md" >> "$out/report.log" 2>&1 || echo "report failed for memory.jsonl" >> "$out/report.log"
fi
$py - "$out" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
env = json.loads((out / "env.json").read_text()) if (out / "env.json").exists() else {}
lines = [f"# sid_fast acceptance run", "",
         f"{env.get('gpu', env.get('device', '?'))}, torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, "
         f"CUDA {env.get('cuda', '-')}, commit {str(env.get('git_commit', '?'))[:10]}, {env.get('timestamp', '')}", "",
         "| step | result | seconds |", "|---|---|---|"]
for s in (json.loads(l) for l in (out / "steps.jsonl").read_text().splitlines() if l.strip()):
    res = f"skipped ({s['skipped']})" if s.get("skipped") else ("ok" if s["rc"] == 0 else f"failed (rc {s['rc']}, {s['log']})")
    lines.append(f"| {s['step']} | {res} | {s.get('seconds', '')} |")
for md in sorted(out.glob("*.md")):
    if md.name != "summary.md":
        lines += ["", md.read_text()]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print(f"-> {out / 'summary.md'}")
EOF
echo "bench/acceptance.sh: $out (${SECONDS}s)"
exit $failed
