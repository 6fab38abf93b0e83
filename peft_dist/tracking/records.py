"""What the MLflow tracker buffers, and where it keeps what it could not send.

A ``Record`` is one unit of work: a batch of metrics, params or tags, a tag to append to, an
artifact to upload, a table to log, or the run's final status. Records MLflow did not take go to
``<run_dir>/tracking_backlog.jsonl``, one JSON object per line with its run id; records MLflow
refused carry ``"rejected": <error>`` and are never re-sent. Artifacts are snapshotted (hard links)
under ``<run_dir>/.tracking_staging`` until they are uploaded.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BACKLOG = "tracking_backlog.jsonl"
STAGING = ".tracking_staging"
BATCHABLE = ("metrics", "params", "tags")  # kinds that share one log_batch request


@dataclass
class Record:
    """One unit of work for the sender; ``data`` is JSON-serialisable so it can go to the backlog."""

    kind: str  # metrics | params | tags | append_tag | artifact | table | terminate
    data: dict[str, Any]
    run_id: str | None = None  # None: the run of the tracker that logged it
    seq: int = 0
    replayed: bool = False  # loaded from an earlier session's backlog

    def size(self) -> int:
        return len(self.data.get("values", {})) if self.kind in BATCHABLE else 1

    def to_json(self, run_id: str | None, **extra: Any) -> str:
        return json.dumps({"kind": self.kind, "run_id": self.run_id or run_id, **self.data, **extra})


def read_backlog(path: Path) -> tuple[list[Record], list[str]]:
    """``(records to send again, lines to keep as they are)``; unreadable lines (a write cut short by a
    full disk) are kept for a human, like refused ones."""
    if not path.exists():
        return [], []
    records, kept = [], []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            entry = {"rejected": "not valid JSON"}
        if "rejected" in entry:
            kept.append(line)
            continue
        kind, run_id = entry.pop("kind"), entry.pop("run_id")
        records.append(Record(kind, entry, run_id, replayed=True))
    return records, kept


def write_backlog(path: Path, lines: list[str]) -> None:
    """Replace the backlog by ``lines`` (remove it if none), through a temporary file and a rename so
    it is never half-written."""
    if not lines:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    tmp.replace(path)


def snapshot(path: Path, target: Path) -> Path:
    """Hard-link ``path`` (a file or a directory tree) to ``target``; copy across file systems."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        shutil.copytree(path, target, copy_function=_link_or_copy)
    else:
        _link_or_copy(str(path), str(target))
    return target


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def describe(records: list[Record]) -> str:
    """``3 metrics, 1 artifact``: for warnings."""
    counts: dict[str, int] = {}
    for record in records:
        counts[record.kind] = counts.get(record.kind, 0) + 1
    return ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
