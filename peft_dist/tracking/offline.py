"""Adding to a run's MLflow record after training: send an unsent backlog, record a merged export.

Both find the run through ``<run_dir>/tracking.json`` (run id, tracking URI, experiment), written by
the tracker as soon as its run exists.

    python -m peft_dist.tracking.offline RUN_DIR [--uri URI]   # send tracking_backlog.jsonl
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from peft_dist.config.schema import TrackingConfig
from peft_dist.tracking.mlflow import RUN_FILE, MlflowTracker
from peft_dist.tracking.records import BACKLOG

# One tag per export format, so a later export of the other format does not overwrite the first.
EXPORT_TAGS = {"merged": "export.merged_model_path", "peft": "export.peft_path"}


def reopen(run_dir: str | Path, uri: str = "") -> MlflowTracker:
    """A tracker on the run recorded in ``run_dir`` that leaves the run's status alone."""
    run_dir = Path(run_dir)
    recorded = json.loads((run_dir / RUN_FILE).read_text()) if (run_dir / RUN_FILE).exists() else {}
    cfg = TrackingConfig(uri=uri or recorded.get("tracking_uri", ""),
                         experiment=recorded.get("experiment", TrackingConfig.experiment))
    return MlflowTracker(cfg, run_dir, recorded.get("run_id"), reopen=False)


def send_backlog(run_dir: str | Path, uri: str = "") -> bool:
    """Send ``tracking_backlog.jsonl``; True when nothing is left in it."""
    run_dir = Path(run_dir)
    if (run_dir / BACKLOG).exists():
        reopen(run_dir, uri).close(status=None)
    return not (run_dir / BACKLOG).exists()


def record_export(run_dir: str | Path, export_path: str | Path, fmt: str = "merged") -> bool:
    """Record where this run was exported in format ``fmt``: the tag ``EXPORT_TAGS[fmt]`` (e.g.
    ``export.merged_model_path``) and an artifact ``export/<tag suffix>.txt`` (the model itself is not
    uploaded). False, and nothing done, when the run was not tracked (no ``tracking.json``)."""
    run_dir = Path(run_dir)
    if not (run_dir / RUN_FILE).exists():
        return False
    tag = EXPORT_TAGS[fmt]
    path = str(Path(export_path).resolve())
    note = run_dir / f"{tag.removeprefix('export.')}.txt"
    note.write_text(path + "\n")
    tracker = reopen(run_dir)
    tracker.set_tags({tag: path})
    tracker.log_artifact(note, "export")
    tracker.close(status=None)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Send the MLflow records a run could not send while training")
    parser.add_argument("run_dir")
    parser.add_argument("--uri", default="", help="tracking URI (default: the one recorded in tracking.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if send_backlog(args.run_dir, args.uri):
        print(f"{args.run_dir}: nothing left to send")
        return 0
    print(f"{Path(args.run_dir) / BACKLOG}: some records remain (see the warnings above)")
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
