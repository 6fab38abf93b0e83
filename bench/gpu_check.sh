#!/usr/bin/env bash
# The GPU check: tests/gpu, the default job on the device, a one-device benchmark and (on a GPU) the quantized
# layers against bitsandbytes' kernels, with one summary.
#
#   bash bench/gpu_check.sh                      # a GPU machine with the package registry: installs into
#                                                # .venv-gpu from requirements.lock, CUDA torch from PyPI
#   bash bench/gpu_check.sh --python python3     # a GPU machine whose python already has the packages
#   bash bench/gpu_check.sh --cpu                # the same steps on the CPU, with this checkout's .venv
#
# Budget on an H100/H200: under 10 minutes; each step has a time limit (tests 270 s, default job 90 s,
# layers 120 s, load 60 s, benchmark 260 s) so that a hung step still leaves a summary. The summary is the
# last block of output; docs/BENCHMARKS.md records it.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=gpu
python=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) mode=cpu; python=${python:-.venv/bin/python} ;;
    --python) python="$2"; shift ;;
    *) echo "usage: bench/gpu_check.sh [--cpu] [--python PYTHON]" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$python" ]; then  # install: the lock's versions, torch as the CUDA build of the same release
  python3 -m venv .venv-gpu && .venv-gpu/bin/pip install -q "torch==$(sed -n 's/^torch==\([0-9.]*\).*/\1/p' requirements.lock)" \
    && grep -v '^torch==' requirements.lock | .venv-gpu/bin/pip install -q -r /dev/stdin \
    && .venv-gpu/bin/pip install -q --no-deps -e . || { echo "install failed" >&2; exit 1; }
  python=.venv-gpu/bin/python
fi
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions_gpu_check}"
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
summary="$work/summary"
step() {  # step NAME TIMEOUT CMD...: run, time, and add one line to the summary
  local name="$1" limit="$2"; shift 2
  local began=$SECONDS
  echo "== $name"
  timeout "$limit" "$@" 2>&1 | tee "$work/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "$name: $([ "$rc" -eq 0 ] && echo ok || echo "FAILED (exit $rc)") in $((SECONDS - began)) s" >> "$summary"
}

if [ "$mode" = gpu ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$summary" 2>&1
  bench_args=(--size 1b --peak-tflops 989)
else
  export PEFT_DIST_GPU_TESTS=cpu DS_ACCELERATOR=cpu
  echo "cpu: $(grep -o 'avx512[a-z_0-9]*\|amx[a-z_0-9]*\|avx2' /proc/cpuinfo | sort -u | tr '\n' ' ')" >> "$summary"
  bench_args=(--size small --steps 4 --batch 2 --seq 128)
fi
"$python" -c "import torch, deepspeed, transformers; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__)" >> "$summary" 2>/dev/null

step tests_gpu 270 "$python" -m pytest -q -p no:cacheprovider tests/gpu
step default_job 90 "$python" launcher/train.py --set tracking.backend=none --set "checkpoint.output_dir=$work/default"
grep -h "done:" "$work/default_job.log" | tail -1 | sed 's/^.*done: /default job: /' >> "$summary"
if [ "$mode" = gpu ]; then  # the int8 / NF4 layers against bitsandbytes' kernels; loading, quantizing on the GPU
  step layers 120 "$python" bench/nf4.py --device cuda
  grep -h "^ratio" "$work/layers.log" >> "$summary"
  step load 60 "$python" bench/load.py --accelerator cuda --ranks 1 --bits 4
  grep -h "^| N |\|^| 1 |" "$work/load.log" >> "$summary"  # the rate for plan/estimate.py's GPU_QUANTIZE_GWS
fi
step bench 260 "$python" bench/gpu_bench.py "${bench_args[@]}"
grep -h "^ratio\|^| peft" "$work/bench.log" >> "$summary"

echo; echo "==== gpu_check summary ($mode, $(date -u +%Y-%m-%d))"; cat "$summary"
! grep -q FAILED "$summary"
