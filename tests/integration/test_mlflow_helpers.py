"""Fast checks of the tracking helpers: run params, FLOPs against torch's FLOP counter, peak memory,
plots, the factory, and the tracker's outage path against an unreachable server (no server needed)."""
import json
import logging
import math
import socket
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image
import mlflow
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from peft_dist.config import config_to_dict
from peft_dist.train.config import load_config
from peft_dist.config.schema import TrackingConfig
from peft_dist.quant.loader import build_model
from peft_dist.tracking import NullTracker, create_tracker
from peft_dist.tracking.mlflow import MlflowTracker, resolve_uri
from peft_dist.tracking.records import BACKLOG, read_backlog, write_backlog
from peft_dist.tracking.offline import send_backlog
from peft_dist.tracking.plots import plot_losses, rank_matrix, write_plots
from peft_dist.tracking.run_info import (model_flops_per_token, run_params, sbatch_script, slurm_job_entry,
                                         throughput_metrics, write_run_files)
from tests.multiproc import REPO, run_distributed

SLURM_ENV = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "tiny", "SLURM_JOB_NUM_NODES": "1",
             "SLURM_NTASKS": "2", "SLURM_RESTART_COUNT": "0"}


def test_run_params_hold_config_deepspeed_code_versions_hardware_and_slurm():
    cfg = load_config(None, ["train.lr=2e-3"])
    ds_config = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    head = ["git", "-C", str(REPO), "rev-parse", "HEAD"]
    heads = {subprocess.run(head, capture_output=True, text=True).stdout.strip()}
    params = run_params(config_to_dict(cfg), ds_config, world_size=2, environ=SLURM_ENV)
    heads.add(subprocess.run(head, capture_output=True, text=True).stdout.strip())  # others may commit meanwhile
    assert params["train.lr"] == 2e-3
    assert params["adapters.0.method"] == "lora" and params["adapters.0.r"] == 8
    assert params["ds_config.zero_optimization.stage"] == 3
    assert params["world_size"] == 2
    assert params["git.commit"] in heads
    assert params["version.torch"] == torch.__version__ and params["version.mlflow"] == mlflow.__version__
    assert params["hardware.accelerator"] == "cpu" and params["hardware.cpu_count"] >= 1
    assert params["slurm.job_id"] == "4242" and params["slurm.ntasks"] == "2"
    assert not any(k.startswith("slurm.") for k in run_params({}, {}, 1, environ={}))


def test_slurm_job_entry_marks_requeues_and_sbatch_script_needs_slurm(tmp_path):
    assert slurm_job_entry(SLURM_ENV) == "4242"
    assert slurm_job_entry({**SLURM_ENV, "SLURM_RESTART_COUNT": "2"}) == "4242 (restart 2)"
    assert slurm_job_entry({}) is None
    assert sbatch_script({}) is None
    files = write_run_files(tmp_path, {"zero_optimization": {"stage": 3}}, environ={})
    assert [f.name for f in files] == ["ds_config.json"]
    assert json.loads(files[0].read_text()) == {"zero_optimization": {"stage": 3}}


def test_flops_per_token_matches_torch_flop_counter():
    """6N + 12 L d s against the FLOPs torch counts in a real forward and backward (eager attention,
    all parameters trainable, as the 6N convention assumes)."""
    model, _ = build_model(load_config(None, ["model.name_or_path=builtin:tiny-llama"]).model)
    model.requires_grad_(True)  # the loader returns a frozen base
    model.config._attn_implementation = "eager"
    seq, batch = 128, 2
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    counter = FlopCounterMode(display=False)
    with counter:
        model(input_ids=ids, labels=ids).loss.backward()
    measured = counter.get_total_flops() / (batch * seq)
    assert model_flops_per_token(model, seq) == pytest.approx(measured, rel=0.01)


def test_throughput_metrics():
    metrics = throughput_metrics(tokens_per_s=1e4, flops_per_token=2e6, world_size=2, peak_tflops=0.05)
    assert metrics["train/tflops_per_device"] == pytest.approx(1e4 * 2e6 / 2 / 1e12)
    assert metrics["train/mfu"] == pytest.approx(0.01 / 0.05)
    assert "train/mfu" not in throughput_metrics(1e4, 2e6, 2)  # no peak given: no MFU


PEAK_MEMORY = """
import json
import psutil
import torch
from peft_dist.distributed.memory import reset_peak_rss
from peft_dist.tracking.run_info import gather_peak_memory

reset_peak_rss()
before = psutil.Process().memory_info().rss
big = torch.ones(64 * 2**20 // 8, dtype=torch.float64)
during = psutil.Process().memory_info().rss
del big
peak = gather_peak_memory()["memory/peak_rss_gib/rank0"] * 2**30
peak_max = gather_peak_memory()["memory/peak_rss_gib/max"] * 2**30
print(json.dumps([before, during, peak, peak_max]))
"""


def test_gather_peak_memory_single_process():
    """After a reset the peak is the current resident set (read independently, by psutil) and grows with
    a 64 MiB tensor that is touched and then freed. In a fresh process: in a pytest worker the tensor can
    come from heap pages that earlier tests freed and left resident, and then the resident set does not grow."""
    out = subprocess.run([sys.executable, "-c", PEAK_MEMORY], cwd=REPO, capture_output=True, text=True, check=True)
    before, during, peak, peak_max = json.loads(out.stdout.strip().splitlines()[-1])
    assert during >= before + 60 * 2**20
    # The tensor's pages count although it is gone (Linux batches its RSS counters: within 1 MiB).
    assert during - 2**20 <= peak <= during + 8 * 2**20
    assert peak_max == peak


@pytest.mark.slow  # two processes
def test_gather_peak_memory_reports_each_rank_on_every_rank(tmp_path):
    """Rank 1 touches 256 MiB more than rank 0: every rank gets both peaks, each between that rank's
    own getrusage peak just before and just after the gather, and they differ by at least 256 MiB."""
    run_distributed([str(Path(__file__).with_name("mlflow_memory_worker.py")), str(tmp_path)], 2, timeout=300)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    metrics = ranks[0]["metrics"]
    for r in (0, 1):
        assert ranks[r]["before_gib"] <= metrics[f"memory/peak_rss_gib/rank{r}"] <= ranks[r]["after_gib"]
    assert metrics["memory/peak_rss_gib/rank1"] - metrics["memory/peak_rss_gib/rank0"] > 0.9 * 256 / 1024
    assert metrics["memory/peak_rss_gib/max"] == metrics["memory/peak_rss_gib/rank1"]


def test_plots_from_metric_history(tmp_path):
    history = {"train/loss": [(s, 6.0 - 0.01 * s) for s in range(1, 11)], "eval/loss": [(5, 5.9), (10, 5.8)],
               "ada/rank/model.layers.10.q_proj": [(2, 4.0), (4, 3.0)],
               "ada/rank/model.layers.2.q_proj": [(2, 4.0)],
               "ada/rank_total": [(2, 8.0), (4, 6.0)], "ada/budget": [(2, 8.0), (4, 6.5)]}
    modules, steps, matrix = rank_matrix(history)
    assert modules == ["ada/rank/model.layers.2.q_proj", "ada/rank/model.layers.10.q_proj"]
    assert steps == [2, 4]
    assert matrix[1] == [4.0, 3.0] and matrix[0][0] == 4.0 and math.isnan(matrix[0][1])
    paths = write_plots(history, tmp_path)
    assert [p.name for p in paths] == ["loss.png", "rank_allocation.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.image.imread(path).shape[0] > 200
    assert write_plots({"train/lr": [(1, 0.1)]}, tmp_path / "none") == []
    assert plot_losses({}, tmp_path / "x.png") is None


def test_factory_and_uri_resolution(tmp_path, monkeypatch):
    assert isinstance(create_tracker(TrackingConfig(), tmp_path, is_main=False), NullTracker)
    assert isinstance(create_tracker(TrackingConfig(backend="none"), tmp_path, is_main=True), NullTracker)
    NullTracker().log_table({"step": [1], "prompt": ["a"], "completion": ["b"]}, "samples/step-00000001.json")
    assert resolve_uri("http://a:5000", tmp_path, {"MLFLOW_TRACKING_URI": "http://b"}) == "http://a:5000"
    assert resolve_uri("", tmp_path, {"MLFLOW_TRACKING_URI": "http://b"}) == "http://b"
    assert resolve_uri("", tmp_path, {}) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


def test_backlog_file_round_trip_keeps_refused_and_unreadable_lines(tmp_path):
    path = tmp_path / BACKLOG
    good = json.dumps({"kind": "metrics", "run_id": "r1", "values": {"x": 1.0}, "step": 3, "timestamp": 5})
    refused = json.dumps({"kind": "params", "run_id": "r1", "values": {"a": "2"}, "rejected": "changed"})
    write_backlog(path, [good, refused, '{"kind": "metr'])  # the last one cut short
    records, kept = read_backlog(path)
    assert [(r.kind, r.run_id, r.data, r.replayed) for r in records] == [
        ("metrics", "r1", {"values": {"x": 1.0}, "step": 3, "timestamp": 5}, True)]
    assert kept == [refused, '{"kind": "metr']
    assert json.loads(records[0].to_json(None)) == json.loads(good)
    write_backlog(path, [])
    assert not path.exists() and read_backlog(path) == ([], [])


def _dead_uri() -> str:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.slow  # MLflow's SQLite schema setup alone takes seconds
def test_unreachable_server_never_blocks_and_backlog_is_sent_later(tmp_path, caplog):
    """No server at all: logging stays instant, close is bounded, everything lands in the backlog
    with a warning, and the backlog is then sent to a store that works (a local SQLite one). A table sent
    again (a retry) is not appended to the one logged."""
    run_dir = tmp_path / "run"
    (tmp_path / "f.txt").write_text("payload")
    caplog.set_level(logging.WARNING, logger="peft_dist")
    tracker = MlflowTracker(TrackingConfig(uri=_dead_uri()), run_dir, flush_interval=0.1, max_backoff=0.2,
                            close_timeout=1.0)
    assert tracker.run_id is None
    slowest = 0.0
    for step in range(1, 21):
        began = time.perf_counter()
        tracker.log_metrics({"train/loss": 1.0 / step}, step)
        slowest = max(slowest, time.perf_counter() - began)
    tracker.log_params({"train.lr": 0.01})
    tracker.log_artifact(tmp_path / "f.txt", "notes")
    (tmp_path / "f.txt").unlink()  # the tracker keeps its own snapshot until it is uploaded
    table = {"step": [20, 20], "prompt": ["def f(", "the cat"], "completion": ["x):", " sat"]}
    tracker.log_table(table, "samples/step-00000020.json")
    began = time.perf_counter()
    tracker.close("FINISHED")
    assert time.perf_counter() - began < 3.0
    assert slowest < 0.5  # (a refused connection fails fast; test_mlflow_server's outage test hangs the port)
    assert "unreachable" in caplog.text and BACKLOG in caplog.text
    lines = [json.loads(line) for line in (run_dir / BACKLOG).read_text().splitlines()]
    assert [line["step"] for line in lines if line["kind"] == "metrics"] == list(range(1, 21))
    assert {line["kind"] for line in lines} == {"metrics", "params", "artifact", "table", "terminate"}

    assert send_backlog(run_dir, uri=f"sqlite:///{tmp_path}/later.db")
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/later.db")
    (run,) = client.search_runs([client.get_experiment_by_name("peft-dist").experiment_id])
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(s, 1.0 / s) for s in range(1, 21)]
    assert run.data.params == {"train.lr": "0.01"} and run.info.status == "FINISHED"
    local = client.download_artifacts(run.info.run_id, "notes/f.txt", str(tmp_path / "dl"))
    assert Path(local).read_text() == "payload"
    assert not (run_dir / ".tracking_staging").exists()
    again = MlflowTracker(TrackingConfig(uri=f"sqlite:///{tmp_path}/later.db"), run_dir, run.info.run_id, reopen=False)
    again.log_table(table, "samples/step-00000020.json")
    again.close(status=None)
    local = client.download_artifacts(run.info.run_id, "samples/step-00000020.json", str(tmp_path / "dl"))
    assert json.loads(Path(local).read_text()) == {"columns": ["step", "prompt", "completion"],
                                                   "data": [list(row) for row in zip(*table.values())]}


@pytest.mark.slow  # MLflow's SQLite schema setup alone takes seconds
def test_refused_records_are_kept_aside_and_the_rest_is_sent(tmp_path, caplog):
    """MLflow refuses to change a logged param: that record goes to the backlog marked ``rejected``
    with a warning, the metrics logged with it still arrive, and a later tracker does not resend it."""
    caplog.set_level(logging.WARNING, logger="peft_dist")
    run_dir = tmp_path / "run"
    tracker = MlflowTracker(TrackingConfig(), run_dir, flush_interval=0.1)
    tracker.log_params({"train.lr": 0.01})
    assert tracker.flush(30)
    tracker.log_params({"train.lr": 0.02})
    tracker.log_metrics({"train/loss": 3.0}, 1)
    tracker.close("FINISHED")
    client = mlflow.MlflowClient(f"sqlite:///{run_dir}/mlflow.db")
    run = client.get_run(tracker.run_id)
    assert run.data.params == {"train.lr": "0.01"} and run.data.metrics == {"train/loss": 3.0}
    assert run.info.status == "FINISHED" and "refused" in caplog.text
    (line,) = [json.loads(x) for x in (run_dir / BACKLOG).read_text().splitlines()]
    assert line["kind"] == "params" and line["values"] == {"train.lr": "0.02"} and "rejected" in line

    assert not send_backlog(run_dir)  # nothing sendable: the refused record stays for a human
    assert (run_dir / BACKLOG).read_text().count("rejected") == 1
    assert client.get_run(tracker.run_id).data.params == {"train.lr": "0.01"}
