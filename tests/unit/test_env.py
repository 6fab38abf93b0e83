"""Rank and rendezvous resolution for each launcher."""
import subprocess
import sys

from peft_dist.distributed.env import first_slurm_host, resolve_env, slurm_port


def test_torch_style_variables_win():
    env = resolve_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "MASTER_ADDR": "n0",
                       "MASTER_PORT": "1234", "SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2"})
    assert (env.rank, env.local_rank, env.world_size, env.master_addr, env.master_port) == (3, 1, 8, "n0", 1234)


def test_srun_task_uses_slurm_variables():
    env = resolve_env({"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "16", "SLURM_STEP_ID": "0",
                       "SLURM_STEP_NUM_TASKS": "8", "SLURM_JOB_NODELIST": "gpu[003-005,9]",
                       "SLURM_STEP_NODELIST": "gpu[004-005]", "SLURM_JOB_ID": "123456"})
    assert (env.rank, env.local_rank, env.world_size) == (5, 1, 8)
    assert env.master_addr == "gpu004" and env.master_port == slurm_port("123456") == 13456


def test_batch_shell_without_srun_is_a_single_process():
    env = resolve_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_NODELIST": "gpu[1-2]"})
    assert (env.rank, env.world_size, env.master_addr) == (0, 1, "127.0.0.1")


def test_first_slurm_host():
    assert first_slurm_host("gpu[003-005,9],cpu1") == "gpu003"
    assert first_slurm_host("node7") == "node7"


def test_stale_cpu_allreduce_segment_is_removed_before_the_rendezvous():
    from peft_dist.distributed.env import DistEnv, cpu_allreduce_segment, release_cpu_allreduce_segment

    dist = DistEnv(rank=1, local_rank=1, world_size=2, master_addr="127.0.0.1", master_port=1)
    segment = cpu_allreduce_segment(dist)
    segment.write_bytes(b"state of a dead job")
    release_cpu_allreduce_segment(dist)
    assert not segment.exists()


def test_every_ranks_segment_is_removed_at_exit_also_a_killed_ranks(tmp_path):
    """Rank 0 of a 2-rank job exits normally; rank 1 was killed (its segment is still there): both go."""
    from peft_dist.distributed.env import DistEnv, cpu_allreduce_segment

    dist = DistEnv(rank=0, local_rank=0, world_size=2, master_addr="127.0.0.1", master_port=2)
    killed = cpu_allreduce_segment(DistEnv(1, 1, 2, "127.0.0.1", 2))
    killed.write_bytes(b"left by a killed rank")
    script = ("from peft_dist.distributed.env import DistEnv, cpu_allreduce_segment, release_cpu_allreduce_segment\n"
              "dist = DistEnv(0, 0, 2, '127.0.0.1', 2)\n"
              "release_cpu_allreduce_segment(dist)\n"
              "cpu_allreduce_segment(dist).write_bytes(b'created by DeepSpeed after the rendezvous')\n")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    assert not cpu_allreduce_segment(dist).exists() and not killed.exists()


def test_exit_process_runs_exit_handlers_flushes_and_keeps_the_code(tmp_path):
    marker = tmp_path / "handler-ran"
    script = ("import atexit, pathlib, sys\n"
              "from peft_dist.distributed.env import exit_process\n"
              f"atexit.register(pathlib.Path({str(marker)!r}).write_text, 'yes')\n"
              "print('unflushed', end='')\n"
              "print('to stderr', end='', file=sys.stderr)\n"
              "exit_process(75)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (75, "unflushed", "to stderr")
    assert marker.read_text() == "yes"
