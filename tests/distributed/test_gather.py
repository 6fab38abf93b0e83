"""ZeRO-3's parameter gathers on gloo (3 real CPU processes): ``init_distributed`` routes DeepSpeed's
``all_gather_into_tensor`` through ``all_gather_in_place``, which must give what gloo's own all-gather gives
and must not hold a second copy of the gathered tensor (gloo's does). The end-to-end oracles are the ZeRO-3
tests against single-process runs (test_loader_zero3.py, test_n_invariance.py), which gather through it too.
"""
import json

import pytest

from tests.multiproc import REPO, run_distributed

WORKER = str(REPO / "tests" / "distributed" / "gather_worker.py")
GATHERED_MIB = 96


@pytest.mark.slow
def test_zero3_gathers_on_gloo_equal_gloos_own_without_its_second_copy(tmp_path):
    run_distributed([WORKER, "--out", str(tmp_path), "--mib", str(GATHERED_MIB)], 3, timeout=300)
    for rank in range(3):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["installed"]
        assert result["mismatches"] == []
        # gloo's all-gather receives into a buffer of its own (the oracle that this measures what it claims);
        # ours receives in place: observed 95.8-95.9 MiB against 0-0.004 MiB
        assert result["gloo_peak_rise_mib"] > 0.9 * GATHERED_MIB, result
        assert result["ours_peak_rise_mib"] < 0.1 * GATHERED_MIB, result
