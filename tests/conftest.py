"""Shared test setup: CPU accelerator, quiet tokenizers, one thread per process; how pytest-xdist (README's
``-n 2``) splits the suite."""
import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Modules that share memoized launcher runs (tests/distributed/mem_runs.py): on one worker, each run happens once.
SHARED_RUNS = {f"tests/distributed/{name}.py" for name in
               ("test_n_invariance", "test_launcher_zero3", "test_ds_configs", "test_plan_measured")}
# Long modules whose tests share nothing (each launches its own jobs): dealt to the workers one test at a time.
INDEPENDENT = {"tests/distributed/test_reliability.py", "tests/distributed/test_compat_matrix.py"}


def work_unit(nodeid: str) -> str:
    """What runs whole on one xdist worker: the modules of SHARED_RUNS together, a test of INDEPENDENT alone, any
    other module whole (so that its module-scoped fixtures, a Slurm cluster or a 2-rank job that several tests read,
    are set up once)."""
    module = nodeid.split("::", 1)[0]
    if module in SHARED_RUNS:
        return "shared launcher runs"
    return nodeid if module in INDEPENDENT else module


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """xdist's module-scope scheduling with ``work_unit`` as the scope. (Marks and ``--dist loadgroup`` cannot do
    it: xdist 3.8 tags a group by rewriting ``item._nodeid``, which pytest 9 no longer reads.)"""
    from xdist.scheduler import LoadScopeScheduling

    class WorkUnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return WorkUnitScheduling(config, log)
