"""Durable files for checkpoints and run directories: fsync, an atomic directory replace, checksums, and the
lock that lets one job at a time use a run directory."""
from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import IO

from peft_dist.config.schema import ConfigError

log = logging.getLogger("peft_dist")
LOCK = ".peft-dist.lock"
_held: list[IO[str]] = []  # lock files held open (and so locked) for the life of this process


def fsync_tree(directory: Path) -> None:
    """Flush every file under ``directory`` and the directories themselves to disk."""
    for path in sorted(directory.rglob("*"), reverse=True) + [directory]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2) == 0  # AT_FDCWD, RENAME_EXCHANGE
    except (AttributeError, OSError):
        return False


def write_atomically(directory: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_dir)``, flush it to disk, and put it in place of ``directory``: a reader sees the
    old complete directory or the new one, never neither (the two are exchanged in one rename)."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    fsync_tree(tmp)
    if directory.exists() and _exchange(tmp, directory):
        shutil.rmtree(tmp)  # the old directory, now under the temporary name
    elif directory.exists():  # no exchange on this system: a brief window between two renames
        old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
        directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old)
    else:
        tmp.rename(directory)
    fsync_dir(directory.parent)


def lock_run_dir(run_dir: Path) -> None:
    """Take ``run_dir``'s exclusive lock for the life of this process (rank 0 of a job), creating the
    directory; a second job gets a ``ConfigError`` naming the holder. ``flock`` is released by the kernel
    when its holder dies, so a lock left by a killed job is simply taken over (with a warning). On NFS,
    ``flock`` works between machines only where the server supports it (NFSv4 does)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / LOCK, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "a process that has not written its name yet"
        handle.close()
        raise ConfigError(f"checkpoint.output_dir: {run_dir} is in use by another job ({holder}); wait for it "
                          "to end, or choose another directory") from None
    handle.seek(0)
    previous = handle.read().strip()
    if previous:
        log.warning("%s: the last job here (%s) ended without releasing its lock; taking it over", run_dir,
                    previous)
    handle.seek(0)
    handle.truncate()
    handle.write(f"host {socket.gethostname()}, pid {os.getpid()}, Slurm job {os.environ.get('SLURM_JOB_ID', '-')}")
    handle.flush()
    _held.append(handle)


def unlock_run_dirs() -> None:
    """Release this process's run-directory locks, clearing the holder's name (a clean end)."""
    while _held:
        handle = _held.pop()
        handle.truncate(0)
        handle.close()
