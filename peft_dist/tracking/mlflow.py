"""MLflow tracker for rank 0: asynchronous, batched, and never the reason a run dies or stalls.

The training thread only appends records to an in-memory buffer; one background thread creates (or
reopens) the MLflow run and sends the buffer in ``log_batch`` calls. When MLflow is unreachable the
records stay buffered and the thread retries with exponential backoff (capped), so logging costs the
training loop microseconds whether or not the server is up. ``close`` waits a bounded time for the
last flush; whatever could not be sent is written to ``<run_dir>/tracking_backlog.jsonl`` with a
warning, and the next tracker opened on that run directory (a resume, or ``python -m
peft_dist.tracking.offline RUN_DIR``) sends it.

Default store: SQLite ``<run_dir>/mlflow.db`` with artifacts in ``<run_dir>/mlartifacts``; ``tracking.uri``
or ``MLFLOW_TRACKING_URI`` selects a server.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import shutil
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from peft_dist.config.schema import TrackingConfig
from peft_dist.tracking.records import (BACKLOG, BATCHABLE, STAGING, Record, describe, read_backlog, snapshot,
                                       write_backlog)

log = logging.getLogger("peft_dist")

RUN_FILE = "tracking.json"  # run id and URI, for tools that add to the run later (e.g. an export)
# MLflow's log_batch limits per request.
MAX_METRICS, MAX_PARAMS, MAX_TAGS = 1000, 100, 100


def resolve_uri(cfg_uri: str, run_dir: Path, environ: dict[str, str] | None = None) -> str:
    """``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else a SQLite store in the run directory."""
    env = os.environ if environ is None else environ
    return cfg_uri or env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(run_dir).resolve()}/mlflow.db"


def local_artifact_root(uri: str) -> str | None:
    """For a SQLite store, artifacts go next to the database (MLflow would use ``./mlruns`` of the cwd)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()


def is_permanent(err: Exception) -> bool:
    """MLflow refused the request itself (bad value, unknown run): retrying cannot help."""
    from mlflow.exceptions import MlflowException

    if not isinstance(err, MlflowException):
        return False
    status = err.get_http_status_code()
    return 400 <= status < 500 and status != 429


class MlflowTracker:
    """Rank 0's tracker. Public methods never raise and never wait on the network (``close`` waits a
    bounded ``close_timeout``).

    Args:
        cfg: the ``tracking`` section (URI, experiment, run name).
        run_dir: the run directory (default store, backlog, staged artifacts).
        resume_run_id: reopen this run instead of creating one (saved in the training checkpoint).
        flush_interval: seconds between sends; records logged in between go in one batch.
        max_backoff: cap on the wait between retries while MLflow is unreachable.
        close_timeout: how long ``close`` waits for the final flush.
        start_timeout: how long the constructor waits for the run to exist (so ``run_id`` is known).
        max_buffer: records kept in memory during an outage; older ones are spilled to the backlog.
        reopen: mark a resumed run RUNNING again (False for tools that only add artifacts).
    """

    def __init__(self, cfg: TrackingConfig, run_dir: str | Path, resume_run_id: str | None = None, *,
                 flush_interval: float = 1.0, max_backoff: float = 10.0, close_timeout: float = 15.0,
                 start_timeout: float = 20.0, max_buffer: int = 20_000, reopen: bool = True) -> None:
        # MLflow's REST client retries 7 times over minutes by default; we retry ourselves, with backoff.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.cfg = cfg
        self.run_dir = Path(run_dir).resolve()
        self.uri = resolve_uri(cfg.uri, self.run_dir)
        self.flush_interval, self.max_backoff, self.close_timeout = flush_interval, max_backoff, close_timeout
        self.max_buffer = max_buffer
        self._run_id = resume_run_id
        self._reopen = reopen and resume_run_id is not None
        self._lock = threading.Lock()
        self._buffer: deque[Record] = deque()
        self._seq = 0
        self._history: dict[str, list[tuple[int, float]]] = {}
        self._kept_lines: list[str] = []  # backlog lines that stay (rejected or spilled this session)
        self._failures = 0
        self._closing = threading.Event()
        self._abandoned = False
        self._file_lock = threading.Lock()
        self._wake = threading.Event()
        self._tried = threading.Event()  # the first connection attempt is over, whatever its outcome
        self._ready = threading.Event()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._load_backlog()
        self._thread = threading.Thread(target=self._work, name="mlflow-tracker", daemon=True)
        self._thread.start()
        self._tried.wait(start_timeout)
        if not self._ready.is_set():
            log.warning("tracking: no MLflow run yet (%s unreachable); training continues, logging is buffered",
                        self.uri)

    @property
    def run_id(self) -> str | None:
        """The MLflow run id (save it in checkpoints; pass it back as ``resume_run_id``)."""
        return self._run_id

    # --- the trainer's side: append and return --------------------------------------------------

    def log_params(self, params: dict[str, Any]) -> None:
        items = [(k, str(v)[:6000]) for k, v in params.items()]  # MLflow's param value limit
        for start in range(0, len(items), MAX_PARAMS):
            self._put("params", {"values": dict(items[start:start + MAX_PARAMS])})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        try:
            values = {k: float(v) for k, v in metrics.items()}
        except (TypeError, ValueError) as err:
            log.warning("tracking: metrics at step %d not logged: %s", step, err)
            return
        with self._lock:
            for key, value in values.items():
                self._history.setdefault(key, []).append((step, value))
        items = list(values.items())
        for start in range(0, len(items), MAX_METRICS):
            self._put("metrics", {"values": dict(items[start:start + MAX_METRICS]), "step": step,
                                  "timestamp": now})

    def set_tags(self, tags: dict[str, str]) -> None:
        items = [(k, str(v)[:8000]) for k, v in tags.items()]
        for start in range(0, len(items), MAX_TAGS):
            self._put("tags", {"values": dict(items[start:start + MAX_TAGS])})

    def append_tag(self, key: str, value: str) -> None:
        """Append ``value`` to a comma-separated tag (e.g. the Slurm job ids across requeues)."""
        self._put("append_tag", {"key": key, "value": str(value)})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or directory later; a hard-linked snapshot is taken now, so the caller may
        delete or rewrite ``path`` (e.g. rotate checkpoints) right away."""
        try:
            staged = self._stage(Path(path))
        except OSError as err:
            log.warning("tracking: cannot snapshot artifact %s (%s); it is not logged", path, err)
            return
        self._put("artifact", {"path": str(staged), "artifact_path": artifact_path})

    def log_table(self, columns: dict[str, list], artifact_file: str) -> None:
        """A table (column name -> values, JSON-serialisable) as the artifact ``artifact_file`` (.json), which
        MLflow's UI shows as a table; sent later, like every record."""
        self._put("table", {"columns": columns, "artifact_file": artifact_file})

    def metric_history(self) -> dict[str, list[tuple[int, float]]]:
        """Every metric point of this run known here (including those logged before a resume), by step."""
        with self._lock:
            return {k: sorted(v) for k, v in self._history.items()}

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything logged so far was sent; False if that did not happen within ``timeout``."""
        deadline = time.monotonic() + timeout
        self._wake.set()
        while time.monotonic() < deadline:
            with self._lock:
                if not self._buffer:
                    return True
            time.sleep(0.05)
        return False

    def close(self, status: str | None = "FINISHED") -> None:
        """Mark the run ``status`` (None leaves it), flush for at most ``close_timeout`` seconds, and
        write what is still unsent to the backlog file."""
        if self._closing.is_set():
            return
        if status is not None:
            self._put("terminate", {"status": status})
        self._closing.set()
        self._wake.set()
        self._thread.join(self.close_timeout)
        with self._lock:
            self._abandoned = self._thread.is_alive()
            unsent = list(self._buffer)
            self._buffer.clear()
        if unsent:
            self._write_backlog(unsent, append=True)
            log.warning("tracking: MLflow at %s unreachable at close; %d unsent records (%s) written to %s. "
                        "They are sent on resume, or now with: python -m peft_dist.tracking.offline %s",
                        self.uri, len(unsent), describe(unsent), self.run_dir / BACKLOG, self.run_dir)

    # --- internals ------------------------------------------------------------------------------

    def _put(self, kind: str, data: dict[str, Any]) -> None:
        with self._lock:
            self._seq += 1
            self._buffer.append(Record(kind, data, None, self._seq))  # None: this tracker's run

    def _stage(self, path: Path) -> Path:
        with self._lock:
            self._seq += 1
            seq = self._seq
        return snapshot(path, self.run_dir / STAGING / f"{seq:08d}" / path.name)

    def _work(self) -> None:
        """The sender thread: connect, send in batches, back off while MLflow is unreachable."""
        client = None
        while not self._abandoned:
            try:
                self._spill_overflow()
                if client is None:
                    try:
                        client = self._connect()
                    finally:
                        self._tried.set()
                self._send_all(client)
                self._announce_recovery()
                if self._closing.is_set():
                    return
            except Exception as err:  # anything at all: the training loop must not notice
                self._failures += 1
                if self._failures == 1:
                    log.warning("tracking: MLflow at %s unreachable (%s); training continues, records are "
                                "buffered and retried", self.uri, _short(err))
            delay = self.flush_interval if not self._failures else min(
                self.max_backoff, self.flush_interval * 2 ** self._failures)
            self._wake.wait(0.05 if self._closing.is_set() and not self._failures else delay)
            self._wake.clear()

    def _announce_recovery(self) -> None:
        """Say once that MLflow answers again. Called before the answered records leave the buffer, so
        whoever sees the buffer drained (``flush``) also sees this line."""
        if self._failures:
            log.warning("tracking: MLflow at %s reachable again after %d failed attempts; buffered records "
                        "are being sent", self.uri, self._failures)
        self._failures = 0

    def _connect(self):
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=self.uri)
        if self._run_id is None:
            experiment = client.get_experiment_by_name(self.cfg.experiment)
            if experiment is None:
                try:
                    experiment_id = client.create_experiment(self.cfg.experiment,
                                                             artifact_location=local_artifact_root(self.uri))
                except mlflow.exceptions.MlflowException:  # created meanwhile by another job
                    experiment_id = client.get_experiment_by_name(self.cfg.experiment).experiment_id
            else:
                experiment_id = experiment.experiment_id
            run = client.create_run(experiment_id, run_name=self.cfg.run_name or None)
            self._run_id = run.info.run_id
            resumed = None
        else:
            try:
                resumed = client.get_run(self._run_id)
            except Exception as err:
                if not is_permanent(err):
                    raise
                log.warning("tracking: run %s not found at %s (%s); starting a new run", self._run_id, self.uri,
                            _short(err))
                self._run_id, self._reopen = None, False
                return self._connect()
            if self._reopen:
                client.update_run(self._run_id, status="RUNNING")
        (self.run_dir / RUN_FILE).write_text(json.dumps({"run_id": self._run_id, "tracking_uri": self.uri,
                                                         "experiment": self.cfg.experiment}, indent=2))
        self._ready.set()
        self._tried.set()  # the constructor need not wait for the history below
        if resumed is not None:
            self._load_history(client, resumed)
        return client

    def _load_history(self, client, run) -> None:
        """Metric points logged before a resume, so the final plots show the whole run."""
        earlier = {}
        for key in run.data.metrics:
            earlier[key] = [(m.step, m.value) for m in client.get_metric_history(self._run_id, key)]
        with self._lock:
            for key, points in earlier.items():
                steps = {s for s, _ in self._history.get(key, [])}
                self._history[key] = [p for p in points if p[0] not in steps] + self._history.get(key, [])

    def _send_all(self, client) -> None:
        while True:
            with self._lock:
                batch = self._next_batch()
            if not batch:
                return
            try:
                self._send(client, batch)
            except Exception as err:
                if not is_permanent(err):
                    raise
                for record in batch:  # one at a time, so only the refused records are set aside
                    try:
                        self._send(client, [record])
                    except Exception as err:
                        if not is_permanent(err):
                            raise
                        self._write_backlog([record], append=True, rejected=_short(err))
                        log.warning("tracking: MLflow refused %s (%s); kept in %s", describe([record]),
                                    _short(err), self.run_dir / BACKLOG)
            self._announce_recovery()
            with self._lock:
                if self._abandoned:
                    return
                while self._buffer and self._buffer[0].seq <= batch[-1].seq:
                    self._buffer.popleft()
                replayed_all = any(r.replayed for r in batch) and not any(r.replayed for r in self._buffer)
            if replayed_all:
                self._write_backlog([], append=False)  # the loaded backlog is sent: keep only the rest

    def _next_batch(self) -> list[Record]:
        """A prefix of the buffer that fits one request: batchable records of one run, or one other."""
        if not self._buffer:
            return []
        first = self._buffer[0]
        if first.kind not in BATCHABLE:
            return [first]
        batch, counts = [], dict.fromkeys(BATCHABLE, 0)
        limits = {"metrics": MAX_METRICS, "params": MAX_PARAMS, "tags": MAX_TAGS}
        for record in self._buffer:
            if record.kind not in BATCHABLE or record.run_id != first.run_id:
                break
            if counts[record.kind] + record.size() > limits[record.kind] or sum(counts.values()) + record.size() > 1000:
                break
            counts[record.kind] += record.size()
            batch.append(record)
        return batch

    def _send(self, client, batch: list[Record]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        run_id = batch[0].run_id or self._run_id
        first = batch[0]
        if first.kind in BATCHABLE:
            metrics = [Metric(k, v, r.data["timestamp"], r.data["step"])
                       for r in batch if r.kind == "metrics" for k, v in r.data["values"].items()]
            params = [Param(k, v) for r in batch if r.kind == "params" for k, v in r.data["values"].items()]
            tags = [RunTag(k, v) for r in batch if r.kind == "tags" for k, v in r.data["values"].items()]
            client.log_batch(run_id, metrics=metrics, params=params, tags=tags)
        elif first.kind == "append_tag":
            key, value = first.data["key"], first.data["value"]
            old = client.get_run(run_id).data.tags.get(key, "")
            entries = old.split(",") if old else []
            if entries[-1:] != [value]:  # a retried request must not append twice
                client.set_tag(run_id, key, ",".join(entries + [value])[-8000:])
        elif first.kind == "artifact":
            path = Path(first.data["path"])
            if path.is_dir():
                client.log_artifacts(run_id, str(path), first.data["artifact_path"])
            elif path.exists():
                client.log_artifact(run_id, str(path), first.data["artifact_path"])
            if path.is_relative_to(self.run_dir / STAGING):
                shutil.rmtree(path.parent, ignore_errors=True)
                with contextlib.suppress(OSError):  # only once every snapshot is uploaded
                    (self.run_dir / STAGING).rmdir()
        elif first.kind == "table":
            artifact_file = first.data["artifact_file"]
            logged = client.list_artifacts(run_id, posixpath.dirname(artifact_file) or None)
            if artifact_file not in {info.path for info in logged}:  # log_table appends: a retry must not
                client.log_table(run_id, first.data["columns"], artifact_file)
        elif first.kind == "terminate":
            client.set_terminated(run_id, first.data["status"])

    def _spill_overflow(self) -> None:
        """During a long outage, move the oldest half of an over-full buffer to the backlog file."""
        with self._lock:
            if len(self._buffer) <= self.max_buffer:
                return
            spilled = [self._buffer.popleft() for _ in range(len(self._buffer) // 2)]
        self._write_backlog(spilled, append=True)
        log.warning("tracking: MLflow at %s unreachable; %d buffered records spilled to %s", self.uri,
                    len(spilled), self.run_dir / BACKLOG)

    def _write_backlog(self, records: list[Record], append: bool, rejected: str | None = None) -> None:
        """The backlog holds: rejected and spilled records, loaded ones not yet re-sent, and (with
        ``append``) ``records``. Written to a temporary file and renamed, so it is never half-written."""
        extra = {"rejected": rejected} if rejected else {}
        with self._file_lock:
            with self._lock:
                if append:
                    self._kept_lines += [r.to_json(self._run_id, **extra) for r in records]
                pending = [r.to_json(self._run_id) for r in self._buffer if r.replayed]
                content = self._kept_lines + pending
            write_backlog(self.run_dir / BACKLOG, content)

    def _load_backlog(self) -> None:
        """Queue an earlier session's unsent records first; rejected ones stay in the file."""
        records, self._kept_lines = read_backlog(self.run_dir / BACKLOG)
        for record in records:
            self._seq += 1
            record.seq, record.run_id = self._seq, record.run_id or self._run_id
            self._buffer.append(record)
        if records:
            log.info("tracking: %d records from %s will be sent first", len(records), self.run_dir / BACKLOG)


def _short(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
