"""The tracker protocol the trainer uses, and the factory that picks a backend."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

from peft_dist.config.schema import TrackingConfig
from peft_dist.tracking.mlflow import MlflowTracker

log = logging.getLogger("peft_dist")


class Tracker(Protocol):
    """What the trainer calls. Implementations never raise into the training loop and never wait on
    the network, except ``close`` (bounded)."""

    @property
    def run_id(self) -> str | None: ...

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def log_table(self, columns: dict[str, list], artifact_file: str) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def append_tag(self, key: str, value: str) -> None: ...

    def metric_history(self) -> dict[str, list[tuple[int, float]]]: ...

    def close(self, status: str | None = "FINISHED") -> None: ...


class NullTracker:
    """Used on ranks other than 0 and with ``tracking.backend: none``."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_table(self, columns: dict[str, list], artifact_file: str) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def append_tag(self, key: str, value: str) -> None:
        pass

    def metric_history(self) -> dict[str, list[tuple[int, float]]]:
        return {}

    def close(self, status: str | None = "FINISHED") -> None:
        pass


def create_tracker(cfg: TrackingConfig, run_dir: str | Path, is_main: bool,
                   resume_run_id: str | None = None) -> Tracker:
    """An MLflow tracker on rank 0 (reopening ``resume_run_id`` if given), a null tracker elsewhere.

    One MLflow run per job, not per process. If the tracker cannot even be built (e.g. the run
    directory is not writable) the run goes on untracked, with a warning.
    """
    if not is_main or cfg.backend == "none":
        return NullTracker()
    try:
        return MlflowTracker(cfg, run_dir, resume_run_id)
    except Exception as err:
        log.warning("tracking: cannot start the MLflow tracker (%s: %s); this run is not tracked",
                    type(err).__name__, err)
        return NullTracker()
