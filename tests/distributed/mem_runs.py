"""Short real launcher runs shared by test_n_invariance.py, test_ds_configs.py, test_launcher_zero3.py and
test_plan_measured.py.

They compare against the same 2-rank ZeRO-3 fp32 runs, so runs are memoized for the pytest session (a run is
keyed by its rank count, launcher and overrides) instead of launching one twice.
"""
import json

from tests.multiproc import REPO, TINY_JOB, run_distributed

PARTITION_ALL = "deepspeed.overrides.zero_optimization.stage3_param_persistence_threshold=0"


def launch(tmp_path, name: str, nprocs: int, *overrides: str, launcher: str = "deepspeed") -> dict:
    """result.json of a ``TINY_JOB`` run of ``launcher/train.py`` with every tensor partitioned, untracked, plus
    its combined output under "log"."""
    out = tmp_path / name
    proc = run_distributed([str(REPO / "launcher" / "train.py"), "--set", f"checkpoint.output_dir={out}",
                     "--set", "tracking.backend=none", "--set", PARTITION_ALL,
                     *[a for o in (*TINY_JOB, *overrides) for a in ("--set", o)]], nprocs, launcher=launcher)
    return {**json.loads((out / "result.json").read_text()), "log": proc.stdout + proc.stderr}


GLOBAL_BATCH = 4  # sequences per optimizer step, whatever the number of ranks
# 4 steps of micro-batch 1 (so every run computes the same per-sequence forwards), little data to tokenize.
SHORT = ("train.max_steps=4", "train.warmup_steps=1", "train.micro_batch_size=1", "train.eval_batches=2",
         "data.max_documents=30")
_RUNS: dict[tuple, dict] = {}


def short_run(tmp_path_factory, nprocs: int, *overrides: str, launcher: str = "torchrun") -> dict:
    """``result.json`` of ``launcher/train.py`` on ``nprocs`` ranks, global batch 4 via accumulation."""
    key = (nprocs, launcher, *overrides)
    if key not in _RUNS:
        root = tmp_path_factory.getbasetemp() / "short_runs"  # one per pytest session
        accumulation = f"train.gradient_accumulation_steps={GLOBAL_BATCH // nprocs}"
        _RUNS[key] = launch(root, f"run{len(_RUNS)}", nprocs, *SHORT, accumulation, *overrides,
                            launcher=launcher)
    return _RUNS[key]
