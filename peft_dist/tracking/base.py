"""The tracker protocol the trainer uses, and the factory that picks a backend."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from peft_dist.config.schema import TrackingConfig


class Tracker(Protocol):
    """What the trainer calls. Implementations must never raise into the training loop."""

    run_id: str | None

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def close(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Used on ranks other than 0 and with ``tracking.backend: none``."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass


def create_tracker(cfg: TrackingConfig, run_dir: Path, is_main: bool,
                   resume_run_id: str | None = None) -> Tracker:
    """An MLflow tracker on rank 0 (resuming ``resume_run_id`` if given), a null tracker elsewhere."""
    if not is_main or cfg.backend == "none":
        return NullTracker()
    from peft_dist.tracking.mlflow import MlflowTracker

    return MlflowTracker(cfg, run_dir, resume_run_id)
