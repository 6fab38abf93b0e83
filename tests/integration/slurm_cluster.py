"""A one-machine Slurm cluster for the integration tests: munge, slurmctld and slurmd in a temp directory.

Everything the daemons write (key, sockets, state, spool, logs, pid files) lives under one directory,
with free ports, so nothing in /etc is touched and several test runs cannot collide. Needs root and
the Debian packages ``slurmctld slurmd slurm-client munge`` (installed with apt-get when missing and
apt-get is usable). ``with SlurmCluster(tmp) as cluster:`` starts the daemons and stops them on exit.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "scancel"]


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def ensure_installed() -> str | None:
    """Install the Slurm packages if needed; returns why Slurm cannot be used, or None when it can."""
    if os.geteuid() != 0:
        return "the one-machine Slurm cluster needs root (slurmd runs jobs as any user)"
    if not missing_binaries():
        return None
    if shutil.which("apt-get") is None:
        return f"Slurm binaries {missing_binaries()} are missing and apt-get is not available"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    proc = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
                          env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        return f"apt-get install {' '.join(PACKAGES)} failed: {proc.stderr[-2000:]}"
    return None if not missing_binaries() else f"still missing after apt-get: {missing_binaries()}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _real_memory_mb() -> int:
    """Half of the available memory: slurmd refuses to register a node that claims more than it has."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return max(512, int(line.split()[1]) // 1024 // 2)
    return 1024


class SlurmCluster:
    """munged + slurmctld + slurmd for this machine; ``env`` holds what client commands need."""

    def __init__(self, root: Path, cpus: int | None = None) -> None:
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]
        self.cpus = cpus or os.cpu_count() or 1
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._pids: list[tuple[str, Path]] = []

    def _write_config(self) -> None:
        for sub in ("munge", "state", "spool", "log", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        r = self.root
        self.conf.write_text("\n".join([
            "ClusterName=peftdist",
            f"SlurmctldHost={self.host}",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            f"StateSaveLocation={r}/state", f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldPidFile={r}/run/slurmctld.pid", f"SlurmdPidFile={r}/run/slurmd.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log", f"SlurmdLogFile={r}/log/slurmd.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill", "ReturnToService=2",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "MpiDefault=none", "KillWait=10", "InactiveLimit=0", "MinJobAge=600",
            "SlurmctldTimeout=30", "SlurmdTimeout=30", "SchedulerParameters=sched_interval=2",
            f"NodeName={self.host} CPUs={self.cpus} RealMemory={_real_memory_mb()} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
            ""]))

    def _start(self, name: str, cmd: list[str], pid_file: Path) -> None:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}{self.logs()}")
        self._pids.append((name, pid_file))

    def start(self) -> "SlurmCluster":
        self._write_config()
        r = self.root
        self._start("munged", [_sbin("munged"), "--force", f"--socket={self.munge_socket}",
                               f"--key-file={r}/munge/munge.key", f"--pid-file={r}/run/munged.pid",
                               f"--log-file={r}/log/munged.log", f"--seed-file={r}/munge/munged.seed"],
                    r / "run" / "munged.pid")
        self._start("slurmctld", [_sbin("slurmctld"), "-f", str(self.conf)], r / "run" / "slurmctld.pid")
        self._start("slurmd", [_sbin("slurmd"), "-f", str(self.conf)], r / "run" / "slurmd.pid")
        self.wait_for_node()
        return self

    def wait_for_node(self, timeout: float = 60, states: tuple[str, ...] = ("idle", "mixed", "allocated")) -> None:
        """Until the node is in one of ``states`` (by default: up, whatever it runs)."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            proc = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False)
            state = proc.stdout.strip()
            if state in states:
                return
            time.sleep(0.5)
        raise RuntimeError(f"node never became {' or '.join(states)} (state {state!r}){self.logs()}")

    def run(self, cmd: list[str], check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stdout}{proc.stderr}")
        return proc

    def job_field(self, job_id: str, field: str) -> str:
        """One ``scontrol show job`` field (``JobState``, ``Restarts``, ``ExitCode`` ...)."""
        out = self.run(["scontrol", "show", "job", job_id], check=False).stdout
        match = re.search(rf"\b{field}=(\S+)", out)
        return match.group(1) if match else ""

    def show_job(self, job_id: str) -> str:
        """``scontrol show job`` as text, for failure messages (state, reason, exit code, restarts)."""
        return "\n--- scontrol show job\n" + self.run(["scontrol", "show", "job", job_id], check=False).stdout

    def wait_for_state(self, job_id: str, states: set[str], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.job_field(job_id, "JobState")
            if state in states:
                return state
            time.sleep(1)
        raise TimeoutError(f"job {job_id} still {state!r} after {timeout}s, expected {sorted(states)}{self.logs()}")

    def start_requeued_now(self, job_id: str) -> None:
        """Start a requeued job without Slurm's requeue delay (BeginTime), but only once the node has released
        its previous run and a second has passed: slurmd revokes the old run's credential at that time (one
        second granularity), and a relaunch created in the same second is killed as "Job credential revoked",
        the race the delay exists to prevent. The caller has seen the job PENDING again."""
        self.wait_for_node(timeout=120, states=("idle",))
        time.sleep(2)
        self.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])

    def logs(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.root / "log" / name
            if path.exists():
                parts.append(f"\n--- {name}\n{path.read_text()[-3000:]}")
        return "".join(parts)

    def stop(self) -> None:
        """Stop the daemons this cluster started (by their pid files), newest first."""
        for name, pid_file in reversed(self._pids):
            try:
                pid = int(pid_file.read_text().split()[0])
                os.kill(pid, signal.SIGTERM)
            except (OSError, ValueError, IndexError):
                continue
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
                time.sleep(0.2)
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)
        self._pids.clear()

    def __enter__(self) -> "SlurmCluster":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
