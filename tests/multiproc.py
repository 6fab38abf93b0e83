"""A launcher for real multi-process runs of tests and bench/ scripts (CPU, gloo):
``from tests.multiproc import run_distributed``."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Overrides for the random tiny job (the embedded default before it adapted the shipped pretrained base): what the
# multi-process tests train, a model built in a moment whose loss falls from ln(512) within a few steps (LoRA on
# lm_head too: the random base's head is otherwise too weak to learn).
TINY_JOB = ("model.name_or_path=builtin:tiny-llama", "data.path=builtin:python-stdlib", "train.lr=1e-2",
            "adapters.0.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head]")


def run_distributed(args: list[str], nprocs: int, env: dict | None = None, timeout: int = 600,
                    launcher: str = "torchrun", returncode: int | None = 0) -> subprocess.CompletedProcess:
    """Run ``python ARGS`` as ``nprocs`` real processes (torchrun or the deepspeed launcher, CPU/gloo).

    Raises with the combined output unless the job exits with ``returncode`` (None: any), so a
    failing test shows every rank's log.
    """
    from peft_dist.distributed.env import free_port

    port = str(free_port())
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nprocs),
               "--master_addr", "127.0.0.1", "--master_port", port, *args]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nprocs),
               "--master_port", port, *args]
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(env or {})}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(key, None)
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if returncode is not None and proc.returncode != returncode:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-8000:]}"
                             f"\n--- stderr\n{proc.stderr[-12000:]}")
    return proc
