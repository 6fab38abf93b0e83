"""The compatibility matrices: every method on every architecture (single-rank jobs), and every method x base
(int8 or NF4 weights with fp32 training, bf16 base with bf16 training) x ZeRO stage (2 ranks).

Each test runs its matrix (tests/compat/), asserts the cells, and checks that docs/COMPATIBILITY.md (written
by ``python -m tests.compat``, never by a test) states the same verdicts, numbers aside.
"""
from __future__ import annotations

import json

import pytest

from peft_dist.adapters import methods
from tests.architectures import ARCHITECTURES
from tests.compat import run_arch_matrix, zero_worker
from tests.compat.render import arch_table, arch_verdict, doc_table, verdicts, zero_table, zero_verdict
from tests.multiproc import REPO, run_distributed

pytestmark = pytest.mark.slow

DOC = REPO / "docs" / "COMPATIBILITY.md"
REGENERATE = "the page is stale: run `python -m tests.compat --write docs/COMPATIBILITY.md`"
# Cells that cannot work, and why: OPT's decoder layer calls fc1/fc2 itself, it has no FFN module to wrap.
REFUSED = {("opt", m): "matches no attention or FFN sub-layer in OPTForCausalLM"
           for m in ("krona_block", "mam", "parallel_adapter", "sequential_adapter")}


def test_every_method_on_every_architecture(tmp_path):
    cells = run_arch_matrix(tmp_path)
    assert {(c["arch"], c["method"]) for c in cells} == {(a, m) for a in ARCHITECTURES for m in methods()}
    for cell in cells:
        key = (cell["arch"], cell["method"])
        if key in REFUSED:
            assert REFUSED[key] in cell.get("refused", ""), cell
            continue
        assert arch_verdict(cell).startswith("✓"), (arch_verdict(cell), cell.get("traceback", ""))
        mergeable = cell["method"] in ("adalora", "bitfit", "krona", "lora")
        assert ("export_gap" in cell) == mergeable, cell  # the others are refused by the merged export
    assert verdicts(doc_table(DOC.read_text(), "Every method on every architecture")) == verdicts(
        arch_table(cells)), REGENERATE


def test_every_method_base_and_stage(tmp_path):
    run_distributed(["-m", "tests.compat.zero_worker", "--out", str(tmp_path)], 2,
                    timeout=900)
    cells = json.loads((tmp_path / "zero_cells.json").read_text())
    failed = {(c["method"], c["base"], c["stage"]): zero_verdict(c) + "\n" + c.get("traceback", "")
              for c in cells if not zero_verdict(c).startswith("✓")}
    assert not failed, failed
    assert len(cells) == len(methods()) * len(zero_worker.COLUMNS)
    # ZeRO-2 keeps whole parameters on every rank; ZeRO-3 partitions and gathers them. In fp32 the loss
    # curves must agree, which checks that every method's parameters are gathered where they are used.
    for method in methods():
        zero2, zero3 = (next(c for c in cells if c["method"] == method and c["base"] == "int8" and c["stage"] == s)
                        for s in (2, 3))
        assert zero3["losses"] == pytest.approx(zero2["losses"], rel=1e-5), method
    assert verdicts(doc_table(DOC.read_text(), "Every method on each base and ZeRO stage")) == verdicts(
        zero_table(cells)), REGENERATE
