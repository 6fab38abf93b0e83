"""Worker for test_mlflow_helpers: ``torchrun --nproc_per_node 2 mlflow_memory_worker.py OUT``.

Rank 1 first touches 256 MiB more than rank 0; every rank then calls ``gather_peak_memory`` and
writes what it got, plus its own ``getrusage`` peak just before and after, to ``OUT/rank<N>.json``.
"""
import json
import resource
import sys
from pathlib import Path

import torch

from peft_dist.distributed.env import exit_process
from peft_dist.tracking.run_info import gather_peak_memory


def main(out: Path) -> None:
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    if rank == 1:
        torch.ones(256 * 2**20 // 8, dtype=torch.float64)  # 256 MiB touched, then freed: rank 1 peaks higher
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30
    metrics = gather_peak_memory()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # the gather itself allocates
    (out / f"rank{rank}.json").write_text(json.dumps({"metrics": metrics, "before_gib": before,
                                                      "after_gib": after}))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    exit_process(0)
