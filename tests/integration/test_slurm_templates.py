"""The sbatch templates as shell programs: syntax, the shared env file, the requeue exit code. Requeueing
on the signal before the limit is tested on a real Slurm (tests/integration/test_slurm.py)."""
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SLURM = REPO / "slurm"
TEMPLATES = sorted(SLURM.glob("*.sbatch")) + sorted((SLURM / "presets").glob("*.sbatch"))


@pytest.mark.parametrize("path", sorted(SLURM.glob("*.sh")) + TEMPLATES, ids=lambda p: p.name)
def test_shell_syntax(path):
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def source_env(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NCCL_", "GLOO_", "TORCH_NCCL", "OMP_"))}
    out = subprocess.run(["bash", "-uc", f"source {SLURM / 'env.sh'} && env -0"], env={**env, **extra},
                         capture_output=True, text=True, check=True).stdout
    return dict(item.split("=", 1) for item in out.split("\0") if "=" in item)


def test_env_file_sets_defaults_and_keeps_site_values():
    env = source_env({"SLURM_CPUS_PER_TASK": "6"})
    assert env["NCCL_IB_TIMEOUT"] == "22" and env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert env["OMP_NUM_THREADS"] == "6"  # one task's share of the cores
    assert "NCCL_IB_HCA" not in env and "GLOO_SOCKET_IFNAME" not in env  # empty means: let NCCL decide
    site = source_env({"NCCL_IB_HCA": "mlx5_0", "NCCL_SOCKET_IFNAME": "ib0", "OMP_NUM_THREADS": "2"})
    assert (site["NCCL_IB_HCA"], site["NCCL_SOCKET_IFNAME"], site["OMP_NUM_THREADS"]) == ("mlx5_0", "ib0", "2")


def test_requeue_exit_code_is_the_trainers():
    from peft_dist.train.trainer import PREEMPTED_EXIT_CODE

    assert f"PREEMPTED_EXIT_CODE={PREEMPTED_EXIT_CODE}  #" in (SLURM / "launch.sh").read_text()
    assert f'"$rc" -eq {PREEMPTED_EXIT_CODE} ]' in (SLURM / "deepspeed.sbatch").read_text()
