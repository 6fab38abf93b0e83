"""MLflow tracking against a real ``mlflow server`` (127.0.0.1, random free port, SQLite backend and
proxied artifact store in a temp dir), and the no-server default (SQLite in the run directory).

Everything the trainer logs is read back through ``MlflowClient``. The outage test stops the server
while a tracker is logging and starts it again on the same port and database.
"""
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from peft_dist.config.schema import TrackingConfig
from peft_dist.distributed.env import free_port
from peft_dist.generate import generate
from peft_dist.tracking.mlflow import RUN_FILE, MlflowTracker
from peft_dist.tracking.records import BACKLOG
from peft_dist.tracking.offline import EXPORT_TAGS, record_export, send_backlog
from tests.multiproc import REPO, TINY_JOB, run_distributed

pytestmark = pytest.mark.slow

ADALORA_CONFIG = """\
model: {name_or_path: builtin:tiny-llama}
adapters:
  - {method: adalora, name: ada, init_r: 6, target_r: 3, tinit: 1, tfinal: 1, delta_t: 1, total_step: 6,
     target_modules: [q_proj, v_proj]}
train: {lr: 1.0e-2, warmup_steps: 1, micro_batch_size: 2, max_steps: 3, log_interval: 2, eval_interval: 3, eval_batches: 2}
data: {path: builtin:python-stdlib, max_documents: 60}
checkpoint: {save_interval: 2}
tracking: {experiment: tiny-adalora, peak_tflops: 0.05, sample_prompts: ["def main(", "the cat"],
           sample_max_new_tokens: 8}
deepspeed: {overrides: {zero_optimization.stage3_param_persistence_threshold: 0}}
"""


class MlflowServer:
    """``mlflow server`` in its own process group, so stopping it stops its workers too."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> None:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.root}/server.db",
             "--artifacts-destination", str(self.root / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited:\n{(self.root / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server not up after {timeout}s:\n{(self.root / 'server.log').read_text()[-3000:]}")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if not self.running():
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory):
    """One server for the module (starting one takes seconds); tests find it running."""
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    yield srv
    srv.stop()


@pytest.fixture
def server(shared_server):
    if not shared_server.running():
        shared_server.start()
    return shared_server


def series(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for info in client.list_artifacts(run_id, path):
        out |= artifact_paths(client, run_id, info.path) if info.is_dir else {info.path}
    return out


def test_tracker_outage_never_stalls_and_everything_arrives_after_restart(server, tmp_path, caplog):
    """Stop the server while a tracker logs and start it again (same port and database): log calls
    return at once while the server hangs and while it is down, and every record logged meanwhile arrives
    after the restart. (Records still unsent at ``close`` go to the backlog file: test_mlflow_helpers
    covers that.)"""
    caplog.set_level(logging.WARNING, logger="peft_dist")
    run_dir = tmp_path / "run"
    tracker = MlflowTracker(TrackingConfig(uri=server.uri), run_dir, flush_interval=0.2, max_backoff=1.0,
                            close_timeout=30.0)
    run_id = tracker.run_id
    assert run_id and json.loads((run_dir / RUN_FILE).read_text())["run_id"] == run_id
    slowest = 0.0
    for step in range(1, 10):
        if step == 4:
            assert tracker.flush(30)
            server.stop()
            # A server that hangs: the port takes connections and never answers, so a request made by
            # log_metrics itself would wait out MLFLOW_HTTP_REQUEST_TIMEOUT (10 s).
            hung = socket.create_server(("127.0.0.1", server.port))
        if step == 5:
            time.sleep(0.5)  # the sender is now waiting on the hung server with step 4's record
        began = time.perf_counter()
        tracker.log_metrics({"train/loss": 10.0 - step, "train/lr": 0.1 * step}, step)
        if step == 5:
            tracker.append_tag("slurm.job_ids", "11")
            (tmp_path / "note.txt").write_text("written during the outage")
            tracker.log_artifact(tmp_path / "note.txt", "notes")
        slowest = max(slowest, time.perf_counter() - began)
    assert slowest < 0.5, slowest
    hung.close()  # the hung request is reset; then the server is down and connections are refused
    time.sleep(1.0)  # a few failed sends while the server is down
    assert not tracker.flush(0.5)
    assert "unreachable" in caplog.text
    server.start()
    assert tracker.flush(60)
    assert "reachable again" in caplog.text
    tracker.close("FINISHED")
    client = MlflowClient(server.uri)
    run = client.get_run(run_id)
    assert series(client, run_id, "train/loss") == [(s, 10.0 - s) for s in range(1, 10)]
    assert series(client, run_id, "train/lr") == [(s, 0.1 * s) for s in range(1, 10)]
    assert run.data.tags["slurm.job_ids"] == "11" and run.info.status == "FINISHED"
    assert artifact_paths(client, run_id) == {"notes/note.txt"}
    assert not (run_dir / BACKLOG).exists()

    # Resume: the same run is RUNNING again and its earlier history is known (for the final plots).
    resumed = MlflowTracker(TrackingConfig(uri=server.uri), run_dir, run_id, flush_interval=0.2)
    assert resumed.run_id == run_id and client.get_run(run_id).info.status == "RUNNING"
    deadline = time.monotonic() + 30
    while len(resumed.metric_history().get("train/loss", [])) < 9 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert resumed.metric_history()["train/loss"] == [(s, 10.0 - s) for s in range(1, 10)]
    resumed.close("FINISHED")
    assert client.get_run(run_id).info.status == "FINISHED"

    # Later exports are recorded on the same run, found through run_dir/tracking.json; a peft-format export
    # after the merged one keeps the merged model's tag.
    assert record_export(run_dir, tmp_path / "merged")
    assert record_export(run_dir, tmp_path / "peft", "peft")
    assert not record_export(tmp_path / "untracked", tmp_path / "merged")  # no tracking.json: no new run
    run = client.get_run(run_id)
    assert run.data.tags[EXPORT_TAGS["merged"]] == str((tmp_path / "merged").resolve())
    assert run.data.tags[EXPORT_TAGS["peft"]] == str((tmp_path / "peft").resolve())
    assert run.info.status == "FINISHED"
    local = client.download_artifacts(run_id, "export/merged_model_path.txt", str(tmp_path / "dl"))
    assert Path(local).read_text().strip() == str((tmp_path / "merged").resolve())


def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)


def is_checked_out_commit(commit: str, since: str) -> bool:
    """``commit`` was HEAD at some point since ``since`` (others may commit while a test runs)."""
    return (git("merge-base", "--is-ancestor", since, commit).returncode == 0
            and git("merge-base", "--is-ancestor", commit, "HEAD").returncode == 0)


def launch(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return run_distributed([str(REPO / "launcher" / "train.py"), *args], 2, env=env)


def start_when(server: MlflowServer, ready: Path, timeout: float = 300.0) -> threading.Thread:
    """Start ``server`` in the background once ``ready`` exists (i.e. in the middle of a job)."""
    def wait_then_start() -> None:
        deadline = time.monotonic() + timeout
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        server.start()

    thread = threading.Thread(target=wait_then_start, daemon=True)
    thread.start()
    return thread


def test_two_rank_adalora_run_logs_everything_and_resume_continues_the_run(server, tmp_path):
    """One MLflow run for the job (rank 0 only) with every listed param, metric series and artifact.
    A resume in a second Slurm job continues the same run and appends its job id to the tag; that job
    starts while the server is down and the server comes back mid-run (after the step-4 checkpoint):
    the job finishes, and what it logged arrives, directly or through the backlog file. The sample
    completions both ranks generated under ZeRO-3 are those peft_dist.generate gives for the adapter."""
    config = tmp_path / "adalora.yaml"
    config.write_text(ADALORA_CONFIG)
    run_dir = tmp_path / "run"
    env = {"MLFLOW_TRACKING_URI": server.uri, "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2"}
    head_before = git("rev-parse", "HEAD").stdout.strip()
    launch(["--config", str(config), "--set", f"checkpoint.output_dir={run_dir}"], env)
    first = json.loads((run_dir / "result.json").read_text())
    server.stop()
    restart = start_when(server, run_dir / "checkpoints" / "step-00000004")
    job = launch(["--config", str(config), "--set", f"checkpoint.output_dir={run_dir}",
                  "--set", "checkpoint.resume=true", "--set", "train.max_steps=6"], {**env, "SLURM_JOB_ID": "4243"})
    second = json.loads((run_dir / "result.json").read_text())
    restart.join()
    assert server.running() and "unreachable" in job.stderr
    if (run_dir / BACKLOG).exists():  # the server came back after the job's bounded close
        assert "unsent records" in job.stderr
        assert send_backlog(run_dir)

    client = MlflowClient(server.uri)
    experiment = client.get_experiment_by_name("tiny-adalora")
    (run,) = client.search_runs([experiment.experiment_id])  # one run for both jobs and all ranks
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.tags["slurm.job_ids"] == "4242,4243"

    params = run.data.params
    expected = {"adapters.0.method": "adalora", "adapters.0.init_r": "6", "train.max_steps": "3",
                "train.lr": "0.01", "world_size": "2", "ds_config.zero_optimization.stage": "3",
                "ds_config.zero_optimization.stage3_param_persistence_threshold": "0",
                "ds_config.train_batch_size": "4",
                "version.torch": torch.__version__, "version.mlflow": mlflow.__version__,
                "hardware.accelerator": "cpu", "slurm.job_id": "4242"}
    assert {k: params.get(k) for k in expected} == expected
    assert is_checked_out_commit(params["git.commit"], since=head_before)
    assert {"version.deepspeed", "version.transformers", "version.bitsandbytes", "hardware.cpu_count",
            "hardware.memory_gib", "git.dirty"} <= set(params)

    loss = series(client, run_id, "train/loss")
    assert [s for s, _ in loss] == [2, 3, 4, 6]  # first job: every 2 steps and its last; then the resume
    by_step = {**{first["first_step"] + i: v for i, v in enumerate(first["losses"])},
               **{second["first_step"] + i: v for i, v in enumerate(second["losses"])}}
    assert second["first_step"] == 3  # resumed from the step-2 checkpoint
    assert [v for _, v in loss] == pytest.approx([by_step[s] for s in (2, 3, 4, 6)], rel=1e-12)
    assert series(client, run_id, "eval/loss")[-1] == (6, pytest.approx(second["eval_loss"], rel=1e-12))
    assert series(client, run_id, "eval/perplexity")[-1][1] == pytest.approx(math.exp(second["eval_loss"]))
    tflops = dict(series(client, run_id, "train/tflops_per_device"))
    mfu = dict(series(client, run_id, "train/mfu"))
    assert sorted(mfu) == [2, 3, 4, 6] and all(mfu[s] == pytest.approx(tflops[s] / 0.05) for s in mfu)
    for key in ("train/lr", "train/grad_norm", "train/tokens_per_s", "train/samples_per_s"):
        points = series(client, run_id, key)
        assert [s for s, _ in points] == [2, 3, 4, 6] and all(v > 0 for _, v in points), key
    for rank in (0, 1):  # peak memory of both ranks, gathered to rank 0
        assert all(0.2 < v < 16 for _, v in series(client, run_id, f"memory/peak_rss_gib/rank{rank}"))
    modules = [k for k in run.data.metrics if k.startswith("ada/rank/")]
    assert len(modules) == 8  # q_proj and v_proj of 4 layers
    budget = dict(series(client, run_id, "ada/budget"))
    totals = series(client, run_id, "ada/rank_total")
    for step, total in totals:  # the per-module ranks add up to the total, within the budget
        assert total == sum(dict(series(client, run_id, m))[step] for m in modules) <= budget[step]
    assert totals[-1][1] < 8 * 6  # pruned below init_r on every module

    artifacts = artifact_paths(client, run_id)
    assert {"config/run_config.yaml", "config/ds_config.json", "plots/loss.png", "plots/rank_allocation.png",
            "adapter/adapter_model.safetensors", "adapter/adapter_config.json",
            "checkpoints/step-00000002/adapter_model.safetensors",
            "checkpoints/step-00000004/adapter_model.safetensors"} <= artifacts
    local = client.download_artifacts(run_id, "adapter/adapter_model.safetensors", str(tmp_path / "dl"))
    assert Path(local).read_bytes() == (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    assert not (run_dir / BACKLOG).exists()

    prompts = ["def main(", "the cat"]
    tables = {step: json.loads(Path(client.download_artifacts(run_id, f"samples/step-{step:08d}.json",
                                                              str(tmp_path / "dl"))).read_text()) for step in (3, 6)}
    for step, table in tables.items():  # step 3 once, though both jobs evaluated it
        assert table["columns"] == ["step", "prompt", "completion"]
        assert [row[:2] for row in table["data"]] == [[step, p] for p in prompts]
    assert [generate(str(run_dir / "adapter"), p, max_new_tokens=8) for p in prompts] == [
        p + row[2] for p, row in zip(prompts, tables[6]["data"])]


def test_no_server_default_is_sqlite_in_the_run_directory(tmp_path):
    """No ``tracking.uri`` and no ``MLFLOW_TRACKING_URI``: the run lands in ``<run_dir>/mlflow.db`` with
    artifacts beside it, and nothing is written to the working directory."""
    run_dir, cwd = tmp_path / "run", tmp_path / "cwd"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run([sys.executable, str(REPO / "launcher" / "train.py"),
                           *(a for o in TINY_JOB for a in ("--set", o)),
                           "--set", f"checkpoint.output_dir={run_dir}", "--set", "train.max_steps=2", "--set", "train.warmup_steps=1",
                           "--set", "train.log_interval=1", "--set", "data.max_documents=40"],
                          env={**env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}, cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert os.listdir(cwd) == []
    client = MlflowClient(f"sqlite:///{run_dir}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("peft-dist").experiment_id])
    result = json.loads((run_dir / "result.json").read_text())
    assert [v for _, v in series(client, run.info.run_id, "train/loss")] == pytest.approx(result["losses"], rel=1e-12)
    assert run.data.params["world_size"] == "1" and run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith((run_dir / "mlartifacts").as_uri())
    assert (run_dir / "mlartifacts" / run.info.run_id / "artifacts" / "adapter" / "adapter_model.safetensors").is_file()
