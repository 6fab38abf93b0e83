#!/usr/bin/env bash
# The body of every peft-dist sbatch template: one training process per GPU (per task) with srun,
# one log file per job with rank-labelled lines, and requeue after a preemption checkpoint.
#
#   exec bash "$PEFT_DIST_ROOT/slurm/launch.sh" [launcher/train.py arguments...]
#
# Each task derives rank, local rank, world size and the rendezvous (first host of the node list, a
# port from the job id) from Slurm's variables (peft_dist/distributed/env.py). Every run resumes from
# the newest complete checkpoint in checkpoint.output_dir, so a requeued or resubmitted job continues
# where the last one stopped, and a first run starts fresh.
#
# Preemption: the template asks for SIGUSR1 some minutes before the time limit (--signal=USR1@...,
# delivered to the tasks; `scancel --signal=USR1 JOB` does the same by hand). Every rank finishes its
# step, a checkpoint is written atomically and the trainer exits with PREEMPTED_EXIT_CODE (75); this
# script then requeues the job (same job id, same log file), unless PEFT_DIST_REQUEUE=0.
set -uo pipefail

ROOT="${PEFT_DIST_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
PYTHON="${PYTHON:-python3}"
PREEMPTED_EXIT_CODE=75  # peft_dist.train.trainer.PREEMPTED_EXIT_CODE
# shellcheck source=env.sh
source "$ROOT/slurm/env.sh"
# Torch-style variables from an enclosing launcher or a stale submitting shell would win over Slurm's in
# env.py (the rendezvous is the allocation's first host): drop them.
unset RANK LOCAL_RANK WORLD_SIZE MASTER_ADDR MASTER_PORT

echo "[launch] job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}:" \
     "${SLURM_NTASKS} tasks, $(date -u +%FT%TZ)"

# SIGTERM reaches this shell from `scancel`, at a preemption and at the time limit: keep waiting for srun
# (which forwards it to the tasks) instead of dying, and remember it: only the template's own USR1 (to
# the tasks, not this shell) is a stop that this script requeues. A cancelled job stays cancelled; Slurm
# requeues a preempted --requeue job itself.
terminated=0
trap 'terminated=1; echo "[launch] SIGTERM: waiting for the tasks to checkpoint"' TERM

# --label prefixes every line with the task id; --wait bounds how long the other tasks may run once
# one has exited (a crashed rank must not leave the rest hanging in a collective).
srun --label --wait=120 "$PYTHON" "$ROOT/launcher/train.py" --set checkpoint.resume=true "$@" &
srun_pid=$!
rc=0
wait "$srun_pid" || rc=$?
while kill -0 "$srun_pid" 2>/dev/null; do  # wait was interrupted by the trap
    rc=0
    wait "$srun_pid" || rc=$?
done

if [ "$rc" -eq "$PREEMPTED_EXIT_CODE" ]; then
    echo "[launch] checkpoint written after a stop signal, $(date -u +%FT%TZ)"
    if [ "$terminated" = 1 ]; then
        echo "[launch] stopped by SIGTERM (scancel, preemption or the time limit): not requeued by this script"
    elif [ "${PEFT_DIST_REQUEUE:-1}" = 1 ]; then
        echo "[launch] requeueing job ${SLURM_JOB_ID}"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    exit 0
fi
echo "[launch] tasks finished with exit code $rc, $(date -u +%FT%TZ)"
exit "$rc"
