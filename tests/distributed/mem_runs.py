"""Short real launcher runs shared by test_n_invariance.py and test_ds_configs.py.

Both compare against the same 2-rank ZeRO-3 fp32 run, so runs are memoized for the pytest session
(a run is keyed by its rank count and overrides) instead of launching it twice.
"""
from tests.distributed.test_launcher_zero3 import launch

GLOBAL_BATCH = 4  # sequences per optimizer step, whatever the number of ranks
# 4 steps of micro-batch 1 (so every run computes the same per-sequence forwards), little data to tokenize.
SHORT = ("train.max_steps=4", "train.warmup_steps=1", "train.micro_batch_size=1", "train.eval_batches=2",
         "data.max_documents=30")
_RUNS: dict[tuple, dict] = {}


def short_run(tmp_path_factory, nprocs: int, *overrides: str) -> dict:
    """``result.json`` of ``launcher/train.py`` on ``nprocs`` ranks, global batch 4 via accumulation."""
    key = (nprocs, *overrides)
    if key not in _RUNS:
        root = tmp_path_factory.getbasetemp() / "short_runs"  # one per pytest session
        accumulation = f"train.gradient_accumulation_steps={GLOBAL_BATCH // nprocs}"
        _RUNS[key] = launch(root, f"run{len(_RUNS)}", nprocs, *SHORT, accumulation, *overrides,
                            launcher="torchrun")
    return _RUNS[key]
