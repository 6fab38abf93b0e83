"""MLflow tracker (rank 0). Default store: SQLite ``mlflow.db`` in the run directory."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from peft_dist.config.schema import TrackingConfig


class MlflowTracker:
    def __init__(self, cfg: TrackingConfig, run_dir: Path, resume_run_id: str | None = None) -> None:
        import mlflow

        uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(run_dir).resolve()}/mlflow.db"
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        self.uri = uri
        if resume_run_id:
            self.run_id = resume_run_id
        else:
            experiment = self.client.get_experiment_by_name(cfg.experiment)
            experiment_id = (experiment.experiment_id if experiment
                             else self.client.create_experiment(cfg.experiment))
            run = self.client.create_run(experiment_id, run_name=cfg.run_name or None)
            self.run_id = run.info.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)
