#!/usr/bin/env bash
# Write a DeepSpeed hostfile ("host slots=N", one line per node) for the current allocation.
#   slurm/hostfile.sh [OUTPUT] [SLOTS]   (defaults: stdout, $SLURM_GPUS_ON_NODE or 8)
set -euo pipefail
out="${1:-/dev/stdout}"
slots="${2:-${SLURM_GPUS_ON_NODE:-8}}"
: "${SLURM_JOB_NODELIST:?run inside a Slurm allocation (sbatch/salloc), or set SLURM_JOB_NODELIST}"
scontrol show hostnames "$SLURM_JOB_NODELIST" | awk -v slots="$slots" '{print $1 " slots=" slots}' > "$out"
