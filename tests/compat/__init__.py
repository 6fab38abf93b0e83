"""The compatibility matrices: the workers that run the cells, the page they render, and the launch of the
architecture matrix (``run_arch_matrix``), which the test and ``python -m tests.compat`` share."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.architectures import ARCHITECTURES
from tests.multiproc import run_distributed


def run_arch_matrix(out: Path, jobs: int = 2) -> list[dict]:
    """Every architecture's cells, in ARCHITECTURES order. Each cell is one-process work (world size 1), so the
    architectures are dealt to ``jobs`` independent single-rank jobs run side by side: one job alone leaves the
    second CPU core idle."""
    parts = [(out / f"part{i}", ARCHITECTURES[i::jobs]) for i in range(jobs)]
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(lambda part: run_distributed(
            ["-m", "tests.compat.arch_worker", "--out", str(part[0]), "--archs", *part[1]], 1, timeout=1500), parts))
    cells = [cell for path, _ in parts for cell in json.loads((path / "arch_cells.json").read_text())]
    return sorted(cells, key=lambda cell: ARCHITECTURES.index(cell["arch"]))
