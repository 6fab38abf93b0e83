"""Reliability under real 2-rank ZeRO-3 runs: exact resume, atomic checkpoints, faults, non-finite loss.

Faults are injected with PEFT_DIST_FAULT (see peft_dist/train/faults.py): a real SIGKILL or SIGUSR1
of one rank's process at a chosen step, or a NaN loss.
"""
import json
import time
from pathlib import Path

import pytest

from tests.multiproc import REPO, TINY_JOB, run_distributed

pytestmark = pytest.mark.slow

COMMON = [*TINY_JOB, "tracking.backend=none", "train.warmup_steps=2", "train.max_steps=8",
          "deepspeed.overrides.zero_optimization.stage3_param_persistence_threshold=0",
          "adapters.0.dropout=0.1"]  # dropout: resume must also restore the random stream


def launch(out, *overrides, env=None, returncode=0, timeout=300, config=None, common=COMMON):
    args = [str(REPO / "launcher" / "train.py"), "--set", f"checkpoint.output_dir={out}"]
    args += ["--config", str(REPO / "configs" / config)] if config else []
    for o in (*common, *overrides):
        args += ["--set", o]
    # The deepspeed launcher exits with the failing rank's code (75 = checkpointed, requeue me);
    # torchrun reports any non-zero worker exit as its own exit 1.
    return run_distributed(args, 2, env=env, returncode=returncode, timeout=timeout, launcher="deepspeed")


def result(out):
    return json.loads((out / "result.json").read_text())


def test_stop_and_resume_gives_the_uninterrupted_losses(tmp_path):
    full = tmp_path / "full"
    launch(full)
    parts = tmp_path / "parts"
    launch(parts, "checkpoint.exit_interval=3", returncode=75)  # stops after step 3 with a checkpoint
    assert (parts / "checkpoints" / "step-00000003" / "MANIFEST.json").is_file()
    # (A checkpoint of another adapter config is refused: tests/unit/test_input_errors.py.)
    launch(parts, "checkpoint.resume=true")
    resumed, reference = result(parts), result(full)
    assert resumed["first_step"] == 4
    assert resumed["losses"] == pytest.approx(reference["losses"][3:], rel=1e-6, abs=1e-6)
    assert resumed["eval_loss"] == pytest.approx(reference["eval_loss"], rel=1e-6)


def test_adalora_resume_continues_the_budget_schedule_exactly(tmp_path):
    """Stop between two mask steps; the resumed run must keep the masks, scores and importance EMAs."""
    common = [*COMMON[:-1], "train.max_steps=10", "adapters.0.tinit=2", "adapters.0.tfinal=2",
              "adapters.0.delta_t=2"]
    full, parts = tmp_path / "full", tmp_path / "parts"
    launch(full, config="tiny-adalora.yaml", common=common)
    launch(parts, "checkpoint.exit_interval=5", config="tiny-adalora.yaml", common=common, returncode=75)
    launch(parts, "checkpoint.resume=true", config="tiny-adalora.yaml", common=common)
    resumed, reference = result(parts), result(full)
    assert resumed["first_step"] == 6
    assert resumed["losses"] == pytest.approx(reference["losses"][5:], rel=1e-6, abs=1e-6)


def test_rank_killed_while_checkpointing_leaves_the_previous_checkpoint(tmp_path):
    out = tmp_path / "run"
    began = time.monotonic()
    launch(out, "checkpoint.save_interval=2", "checkpoint.keep_last=5",
           env={"PEFT_DIST_FAULT": "kill-in-checkpoint:1:4"}, returncode=None)
    assert time.monotonic() - began < 240  # the job ends, it does not hang
    checkpoints = out / "checkpoints"
    assert (checkpoints / "step-00000002" / "MANIFEST.json").is_file()
    assert not (checkpoints / "step-00000004").exists()  # the interrupted one never became visible
    assert (checkpoints / ".step-00000004.tmp").exists()
    launch(out, "checkpoint.resume=true", "checkpoint.save_interval=2", "checkpoint.keep_last=2")
    assert result(out)["first_step"] == 3  # resumed from step 2, the newest complete checkpoint
    kept = sorted(p.name for p in checkpoints.glob("step-*"))
    assert kept == ["step-00000004", "step-00000006"]  # retention: the last 2


def test_dead_rank_ends_the_job_with_an_error(tmp_path):
    began = time.monotonic()
    proc = launch(tmp_path / "run", env={"PEFT_DIST_FAULT": "kill:1:3"}, returncode=None)
    assert proc.returncode != 0
    assert time.monotonic() - began < 180


def test_signal_on_one_rank_checkpoints_all_and_exits_for_requeue(tmp_path):
    out = tmp_path / "run"
    launch(out, env={"PEFT_DIST_FAULT": "signal:1:3"}, returncode=75)
    manifest = json.loads((out / "checkpoints" / "step-00000003" / "MANIFEST.json").read_text())
    assert manifest["world_size"] == 2 and manifest["step"] == 3
    assert any(name.startswith("engine/state/zero_pp_rank_1") for name in manifest["files"])


def test_nonfinite_loss_is_skipped_then_aborts_after_the_limit(tmp_path):
    out = tmp_path / "skip"
    launch(out, env={"PEFT_DIST_FAULT": "nan:0:3"})
    skipped = result(out)
    assert skipped["skipped_steps"] == 1 and skipped["losses"][2] != skipped["losses"][2]  # NaN logged
    assert skipped["losses"][-1] < skipped["losses"][0]
    proc = launch(tmp_path / "abort", "train.max_nonfinite_steps=2",
                  env={"PEFT_DIST_FAULT": "nan:1:3,nan:1:4"}, returncode=3)
    assert "2 steps in a row had a non-finite loss" in proc.stderr


def test_a_skipped_step_leaves_the_optimizer_state_exactly_as_before(tmp_path):
    """A true skip: Adam's moments and step counts (and the adapters) after a non-finite step equal those
    before it, bit for bit, on every rank (with lr 0 alone the moments would decay and the step advance)."""
    run_distributed(["-m", "tests.distributed.skip_worker", str(tmp_path)], 2, timeout=300)
    for rank in (0, 1):
        verdict = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert verdict == {"skipped": True, "optimizer_state_unchanged": True, "adapters_unchanged": True,
                           "entries": verdict["entries"]} and verdict["entries"] > 0, verdict


LAUNCHERS = {"deepspeed": ["-m", "deepspeed.launcher.runner", "--num_gpus", "2"],
             "torchrun": ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]}


@pytest.mark.parametrize("launcher,sig", [("deepspeed", "SIGKILL"), ("deepspeed", "SIGTERM"), ("torchrun", "SIGKILL"),
                                          ("torchrun", "SIGTERM")])
def test_the_launchers_death_stops_every_rank_with_a_checkpoint(tmp_path, launcher, sig):
    """DeepSpeed's runner does not pass signals on and its per-node launcher outlives it; a SIGKILLed
    torchrun agent leaves its workers orphaned. The ranks must notice themselves: within 30 s every process
    of the job is gone, each rank having finished its step and written a checkpoint, and nothing is left
    in /dev/shm."""
    import os
    import signal
    import subprocess
    import sys

    import psutil

    from peft_dist.distributed.env import DistEnv, cpu_allreduce_segment, free_port

    out, port = tmp_path / "run", free_port()
    args = [sys.executable, *LAUNCHERS[launcher], "--master_port", str(port), str(REPO / "launcher" / "train.py"),
            "--set", f"checkpoint.output_dir={out}",
            *(a for o in (*COMMON, "train.max_steps=400", "train.log_interval=1") for a in ("--set", o))]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    runner = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in runner.stdout:  # training has begun once rank 0 logs a step
        if " step 2/400 " in line:
            break
    job = psutil.Process(runner.pid).children(recursive=True)
    ranks = [p for p in job if "train.py" in " ".join(p.cmdline())
             and ("--local_rank" in " ".join(p.cmdline()) or "LOCAL_RANK" in p.environ())]
    assert len(ranks) == 2, [p.cmdline() for p in job]
    runner.send_signal(getattr(signal, sig))
    runner.wait()
    _, alive = psutil.wait_procs(job, timeout=30)  # not our children: their exit codes are not ours to read
    assert not alive, f"{[p.cmdline() for p in alive]} kept running after the {launcher} launcher got {sig}"
    written = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    time.sleep(3)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == written  # nothing writes on
    saved = result(out)
    assert saved["preempted"] and 2 <= saved["step"] < 400
    assert (out / "checkpoints" / f"step-{saved['step']:08d}" / "MANIFEST.json").is_file()
    assert not any(cpu_allreduce_segment(DistEnv(r, r, 2, "127.0.0.1", port)).exists() for r in range(2))


def test_a_signal_during_setup_exits_for_requeue_and_the_next_run_starts_fresh(tmp_path):
    out = tmp_path / "run"
    proc = launch(out, "train.max_steps=3", env={"PEFT_DIST_FAULT": "signal:1:0"}, returncode=75)
    assert "signal during setup" in proc.stderr and not (out / "checkpoints").exists()
    assert result(out)["preempted"] and result(out)["step"] == 0
    launch(out, "train.max_steps=3", "checkpoint.resume=true")
    assert result(out)["first_step"] == 1 and result(out)["step"] == 3


def test_two_jobs_started_at_once_into_one_directory(tmp_path):
    """Both start at the same moment into the same new directory: one trains, the other is refused naming
    the holder (before, both were accepted and one adapter was silently lost)."""
    import subprocess
    import sys

    out = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "launcher" / "train.py"), "--set", f"checkpoint.output_dir={out}",
           *(a for o in (*COMMON, "data.max_documents=40", "train.max_steps=3") for a in ("--set", o))]
    jobs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outcomes = sorted((job.wait(timeout=300), job.stderr.read()) for job in jobs)
    assert [code for code, _ in outcomes] == [0, 2], outcomes
    assert "is in use by another job (host" in outcomes[1][1]
    assert result(out)["step"] == 3


def test_every_kind_of_damaged_checkpoint_file_is_skipped_on_resume(tmp_path, caplog):
    """Flip one byte in each file of a real checkpoint (optimizer and model-state shards, the adapter, its
    config, the trainer state, the hooks, the manifest): resume then falls back to the previous one."""
    import logging
    import shutil

    from peft_dist.train.checkpoint import MANIFEST, latest_checkpoint

    import subprocess
    import sys

    out = tmp_path / "run"  # one process: the files are the same kinds as on N ranks
    subprocess.run([sys.executable, str(REPO / "launcher" / "train.py"), "--set", f"checkpoint.output_dir={out}",
                    *(a for o in (*COMMON, "data.max_documents=40", "train.max_steps=6", "checkpoint.save_interval=2",
                                  "checkpoint.exit_interval=4") for a in ("--set", o))], cwd=REPO, check=False,
                   capture_output=True, timeout=300)
    newest, previous = out / "checkpoints" / "step-00000004", out / "checkpoints" / "step-00000002"
    assert latest_checkpoint(out) == newest
    files = sorted(p.relative_to(newest) for p in newest.rglob("*") if p.is_file())
    assert any(str(f).endswith(".pt") and "engine" in str(f) for f in files) and Path(MANIFEST) in files
    pristine = tmp_path / "pristine"
    shutil.copytree(newest, pristine)
    for name in files:
        shutil.rmtree(newest)
        shutil.copytree(pristine, newest)
        data = bytearray((newest / name).read_bytes())
        data[len(data) // 2] ^= 0x01
        (newest / name).write_bytes(bytes(data))
        with caplog.at_level(logging.WARNING, logger="peft_dist"):
            assert latest_checkpoint(out) == previous, name
