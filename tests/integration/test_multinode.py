"""Multi-node semantics on one machine: global rank 1 has local rank 0, as on the second node of a job.

Two launchers: ``torchrun --nnodes 2 --node_rank 0|1`` (one process each, rendezvous on 127.0.0.1) and
the ``srun`` environment of a 2-node allocation (Slurm's variables for two hosts, one task per node).
Both share one run directory, as nodes share a file system. Checked: only global rank 0 writes the
run files, logs progress and talks to the tracker; every rank writes its own optimizer shard; a run
stopped and resumed under the Slurm environment logs exactly the losses of the uninterrupted
torchrun run.
"""
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.multiproc import TINY_JOB

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
STEPS = 6
ARGS = ["launcher/train.py", *(a for o in TINY_JOB for a in ("--set", o)), "--set", f"train.max_steps={STEPS}",
        "--set", "train.log_interval=1", "--set", "train.warmup_steps=2", "--set", "data.max_documents=40",
        "--set", "checkpoint.save_interval=2"]
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def base_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    return {**env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_pair(cmds: list[list[str]], envs: list[dict], timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """Start both "nodes" at once (they rendezvous with each other) and collect their outputs."""
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd, env in zip(cmds, envs)]
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [subprocess.CompletedProcess(p.args, p.returncode, out.replace("\r", "\n"), "")
            for p, out in zip(procs, outs)]


def free_port_in(low: int, high: int) -> int:
    for port in range(low, high):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError(f"no free port in {low}-{high}")


def check_only_rank0_reports(rank0: str, rank1: str) -> None:
    # Output goes to pipes, not a terminal: progress is a log line per logging interval, on rank 0 only.
    assert "[rank 0]" in rank0 and "INFO done:" in rank0 and re.search(r"INFO step \d+/\d+ loss", rank0)
    assert "INFO" not in "\n".join(line for line in rank1.splitlines() if line.startswith("[rank 1]"))
    assert not re.search(r"step \d+/\d+ loss", rank1)


def tracker_history(run_dir: Path) -> tuple[list[str], list[int]]:
    from mlflow.tracking import MlflowClient

    tracking = json.loads((run_dir / "tracking.json").read_text())
    client = MlflowClient(tracking["tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name(tracking["experiment"]).experiment_id])
    steps = [m.step for m in client.get_metric_history(tracking["run_id"], "train/loss")]
    return [r.info.run_id for r in runs], sorted(steps)


@pytest.fixture(scope="module")
def torchrun_two_nodes(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("torchrun") / "run"
    port = free_port_in(20000, 30000)
    cmds = [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
             "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
             *ARGS, "--set", f"checkpoint.output_dir={run_dir}"] for node in (0, 1)]
    procs = run_pair(cmds, [base_env(), base_env()])
    for proc in procs:
        assert proc.returncode == 0, proc.stdout[-8000:]
    return run_dir, procs


def test_torchrun_two_nodes_only_global_rank0_writes(torchrun_two_nodes):
    run_dir, (node0, node1) = torchrun_two_nodes
    check_only_rank0_reports(node0.stdout, node1.stdout)
    result = json.loads((run_dir / "result.json").read_text())
    assert result["step"] == STEPS and len(result["losses"]) == STEPS
    latest = run_dir / "checkpoints" / f"step-{STEPS - 2:08d}"
    manifest = json.loads((latest / "MANIFEST.json").read_text())
    assert manifest["world_size"] == 2
    # Each rank writes its own ZeRO optimizer shard, rank 1 (local rank 0 on "node 1") included.
    shards = sorted(f for f in manifest["files"] if "optim_states" in f)
    assert shards == [f"engine/state/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]
    runs, steps = tracker_history(run_dir)
    assert len(runs) == 1 and steps == list(range(1, STEPS + 1))  # one run, each step logged once


def test_srun_two_node_env_stops_and_resumes_like_torchrun(torchrun_two_nodes, tmp_path):
    run_dir = tmp_path / "run"
    port = free_port_in(10000, 20000)
    # env.py: master = first host of the node list, port = 10000 + job id % 10000.
    nodes = f"localhost,{socket.gethostname().split('.')[0]}"
    # What srun sets in each task of a step (the batch shell has no SLURM_STEP_* variables).
    slurm = {"SLURM_JOB_ID": str(port - 10000 + 50000), "SLURM_NTASKS": "2", "SLURM_NNODES": "2",
             "SLURM_JOB_NODELIST": nodes, "SLURM_TASKS_PER_NODE": "1(x2)", "SLURM_STEP_ID": "0",
             "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": nodes}
    envs = [{**base_env(), **slurm, "SLURM_PROCID": str(node), "SLURM_NODEID": str(node), "SLURM_LOCALID": "0"}
            for node in (0, 1)]
    cmd = [sys.executable, *ARGS, "--set", f"checkpoint.output_dir={run_dir}", "--set", "checkpoint.resume=true"]

    first = run_pair([cmd + ["--set", "checkpoint.exit_interval=3"]] * 2, envs)
    assert [p.returncode for p in first] == [75, 75], first[0].stdout[-6000:] + first[1].stdout[-3000:]
    stopped = json.loads((run_dir / "result.json").read_text())
    assert stopped["preempted"] and stopped["step"] == 3

    second = run_pair([cmd] * 2, envs)
    assert [p.returncode for p in second] == [0, 0], second[0].stdout[-6000:] + second[1].stdout[-3000:]
    check_only_rank0_reports(second[0].stdout, second[1].stdout)
    assert "resumed from step 3" in second[0].stdout
    resumed = json.loads((run_dir / "result.json").read_text())
    assert resumed["first_step"] == 4 and resumed["step"] == STEPS

    reference = json.loads((torchrun_two_nodes[0] / "result.json").read_text())["losses"]
    assert stopped["losses"] + resumed["losses"] == pytest.approx(reference, rel=1e-5, abs=1e-6)
    runs, steps = tracker_history(run_dir)
    assert len(runs) == 1 and steps == list(range(1, STEPS + 1))  # the resumed job continued the same run
