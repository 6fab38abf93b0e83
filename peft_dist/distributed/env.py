"""Rank, world size and rendezvous from whichever launcher started us; rank-prefixed logging.

One code path for every launcher: ``deepspeed`` and ``torchrun`` set ``RANK``/``WORLD_SIZE``/
``LOCAL_RANK``/``MASTER_*``; under ``srun`` they are derived from Slurm's variables (the batch
shell itself, without srun, is one process); a plain
``python launcher/train.py`` is world size 1 with a free local port.
"""
from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import psutil

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list: ``gpu[003-005,9],cpu1`` -> ``gpu003``."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not match:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, ranges = match.groups()
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def slurm_port(job_id: str) -> int:
    """A rendezvous port every task of a job derives alike (10000-19999, from the job id)."""
    return 10000 + int(job_id) % 10000


def resolve_env(environ: dict[str, str] | None = None) -> DistEnv:
    """Read the launcher's variables; Slurm's are used only when no torch-style ones are set."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)))
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:  # an srun task; the batch shell has no step id
        return DistEnv(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)),
                       int(env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"]),
                       env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_STEP_NODELIST")
                                                                  or env["SLURM_JOB_NODELIST"]),
                       int(env.get("MASTER_PORT") or slurm_port(env.get("SLURM_JOB_ID", "0"))))
    return DistEnv(0, 0, 1, "127.0.0.1", int(env.get("MASTER_PORT") or free_port()))


def export_env(dist: DistEnv) -> None:
    """Write the torch-style variables that ``torch.distributed``'s env:// rendezvous reads."""
    os.environ.update({"RANK": str(dist.rank), "LOCAL_RANK": str(dist.local_rank),
                       "WORLD_SIZE": str(dist.world_size), "MASTER_ADDR": dist.master_addr,
                       "MASTER_PORT": str(dist.master_port)})


def init_distributed(dist: DistEnv, timeout_minutes: int = 10) -> None:
    """Start the process group through DeepSpeed's accelerator-aware initializer (gloo on CPU)."""
    import datetime

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    export_env(dist)
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        release_cpu_allreduce_segment(dist)
    if accelerator.device_name() != "cpu":
        accelerator.set_device(dist.local_rank % accelerator.device_count())  # --gpus-per-task shows one
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name(),
                               auto_mpi_discovery=False, timeout=datetime.timedelta(minutes=timeout_minutes))
    if accelerator.communication_backend_name() == "gloo":
        import deepspeed.comm.comm

        deepspeed.comm.comm.cdb.all_gather_function = all_gather_in_place


@dataclass
class Broadcasts:
    """The works of ``all_gather_in_place``, waited on as one ``torch.distributed`` work."""
    works: list

    def wait(self) -> bool:
        for work in self.works:
            work.wait()
        return True


def all_gather_in_place(output_tensor: torch.Tensor, input_tensor: torch.Tensor, group=None,
                        async_op: bool = False) -> Broadcasts | None:
    """``torch.distributed.all_gather_into_tensor`` as one broadcast per rank, each received straight into
    its slice of ``output_tensor``: on gloo, what DeepSpeed gathers ZeRO-3 parameters with (``init_distributed``).

    Gloo's all-gather receives into a buffer of its own and then copies it out, so while it runs a rank
    holds the gathered tensor twice: on 2 ranks of a Llama-7B with an int8 head, 122 MiB of rank 1's peak
    once DeepSpeed prefetches (docs/BENCHMARKS.md). Gloo's broadcast receives in place. NCCL writes into the
    output and is left alone.
    """
    import torch.distributed

    if not output_tensor.is_contiguous():
        raise ValueError("all_gather_in_place gathers into a contiguous output tensor")
    rank, world = torch.distributed.get_rank(group), torch.distributed.get_world_size(group)
    sent = input_tensor.reshape(-1)
    slices = output_tensor.view(-1).split(sent.numel())
    if len(slices) != world or slices[-1].numel() != sent.numel():
        raise ValueError(f"all_gather_in_place: an output of {output_tensor.numel()} elements does not hold "
                         f"{world} inputs of {sent.numel()}")
    if slices[rank].data_ptr() != sent.data_ptr():  # DeepSpeed passes its own slice of the output
        slices[rank].copy_(sent)
    group = group or torch.distributed.group.WORLD
    broadcasts = Broadcasts([torch.distributed.broadcast(sent if source == rank else slices[source],
                                                         src=torch.distributed.get_global_rank(group, source),
                                                         group=group, async_op=True) for source in range(world)])
    if async_op:
        return broadcasts
    broadcasts.wait()
    return None


def cpu_allreduce_segment(dist: DistEnv) -> Path:
    """The shared-memory file DeepSpeed's CPU all-reduce creates for this rank (named in its shm.cpp)."""
    return Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{dist.master_addr}_{dist.master_port}_"
                f"{dist.rank}")


def release_cpu_allreduce_segment(dist: DistEnv) -> None:
    """Remove this rank's segment now, and at exit every rank's of this job.

    DeepSpeed never unlinks them (66 MiB per rank and job pile up in /dev/shm), and a later job on the
    same address and port would map a dead job's state. Removing this rank's before the rendezvous is
    safe: peers only open it after the rendezvous, which this rank joins afterwards. Removing every
    rank's at exit is safe (peers have them mapped; only the names go) and also clears the segment of a
    rank that was killed and ran no exit handler.
    """
    cpu_allreduce_segment(dist).unlink(missing_ok=True)
    for rank in range(dist.world_size):
        atexit.register(cpu_allreduce_segment(dataclasses.replace(dist, rank=rank)).unlink, missing_ok=True)


# Command-line words of the processes that start ranks: deepspeed's runner and per-node launcher, torchrun.
LAUNCHER_WORDS = ("deepspeed", "torch.distributed.run", "torchrun", "deepspeed.launcher")


def launcher_ancestors() -> list[psutil.Process]:
    """The launcher processes above this one (deepspeed's runner and per-node launcher, torchrun), nearest
    first; empty for a plain ``python`` or an srun task (slurmstepd stops its tasks itself)."""
    found = []
    for process in psutil.Process().parents():
        try:
            if any(word in " ".join(process.cmdline()) for word in LAUNCHER_WORDS):
                found.append(process)
        except psutil.Error:
            continue
    return found


def watch_launchers(interval_s: float = 2.0) -> None:
    """When any launcher above this rank dies, send this rank SIGTERM (the trainer then stops as at a
    preemption: checkpoint, exit 75). DeepSpeed's runner does not pass signals to its per-node launcher,
    which outlives it, so a killed ``deepspeed`` would otherwise leave its ranks training."""
    watched = launcher_ancestors()

    def watch() -> None:
        while all(process.is_running() for process in watched):
            time.sleep(interval_s)
        os.kill(os.getpid(), signal.SIGTERM)

    if watched:
        threading.Thread(target=watch, name="peft-dist-launcher-watch", daemon=True).start()


def exit_process(code: int) -> NoReturn:
    """End the process with ``code`` after exit handlers and flushing, but without interpreter finalization.

    A gloo worker thread can hold the last reference to a finished collective (a barrier keeps the
    works before it) and drop it a moment after the caller returned. If that happens while Python
    finalizes, the thread cannot take the GIL to free the tensors and the process aborts ("terminate
    called without an active exception", SIGABRT) after a run that succeeded; see
    pytorch/pytorch#179291. Seen here at 4 ranks on 2 cores in about 1 exit in 15.
    """
    atexit._run_exitfuncs()  # also flushes logging
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def setup_logging(rank: int) -> logging.Logger:
    """``[rank N]``-prefixed logs; ranks other than 0 only report warnings and errors."""
    logger = logging.getLogger("peft_dist")
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[rank {rank}] %(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False
    for noisy in ("DeepSpeed", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return logger
