"""Shared test setup: CPU accelerator, quiet tokenizers, one thread per process; how pytest-xdist (README's
``-n 2 --dist loadgroup``) may split the suite."""
import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Modules that share memoized launcher runs (tests/distributed/mem_runs.py): on one worker, each run happens once.
SHARED_RUNS = {f"tests/distributed/{name}.py" for name in
               ("test_n_invariance", "test_launcher_zero3", "test_ds_configs", "test_plan_measured")}


def uses_a_module_fixture(item: pytest.Item) -> bool:
    """Whether ``item`` reads a fixture that lives longer than one test and shorter than the session (a Slurm
    cluster, a 2-rank job several tests of the module read)."""
    return any(fixture.scope in ("class", "module", "package")
               for fixtures in item._fixtureinfo.name2fixturedefs.values() for fixture in fixtures)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that share work run on one xdist worker, so that it happens once: the modules of SHARED_RUNS together,
    and a module whose tests read a module-scoped fixture whole. The other tests are dealt one by one."""
    for item in items:
        module = item.nodeid.split("::")[0]
        if module in SHARED_RUNS:
            item.add_marker(pytest.mark.xdist_group("mem_runs"))
        elif uses_a_module_fixture(item):
            item.add_marker(pytest.mark.xdist_group(module))
