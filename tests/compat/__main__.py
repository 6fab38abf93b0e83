"""Run both compatibility matrices and write the page:

    python -m tests.compat --write docs/COMPATIBILITY.md      # about 10 minutes on 2 CPU cores

The architecture matrix runs as two single-rank jobs side by side, the ZeRO matrix as 2 ranks; the page keeps its
hand-kept ``## Supported versions`` section (the output of ``.ci/check_versions.sh``).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from tests.compat import run_arch_matrix
from tests.compat.render import render, versions_section
from tests.multiproc import REPO, run_distributed


def run_matrices(out: Path) -> tuple[list[dict], list[dict]]:
    """Both matrices' cells (each job exits 0 whatever its cells recorded)."""
    arch_cells = run_arch_matrix(out)
    run_distributed(["-m", "tests.compat.zero_worker", "--out", str(out)], 2, timeout=900)
    return arch_cells, json.loads((out / "zero_cells.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", default=str(REPO / "docs" / "COMPATIBILITY.md"))
    args = parser.parse_args()
    page = Path(args.write)
    with tempfile.TemporaryDirectory() as tmp:
        arch_cells, zero_cells = run_matrices(Path(tmp))
    page.write_text(render(arch_cells, zero_cells, versions_section(page.read_text() if page.exists() else "")))
    print(page)


if __name__ == "__main__":
    main()
