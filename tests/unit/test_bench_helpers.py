"""Pure helpers of the bench scripts: budget matching, claims and the learning-rate sweep (bench/quality.py) and the
scaling fit (bench/scaling.py)."""
import math
import sys

import pytest

from tests.multiproc import REPO

sys.path.insert(0, str(REPO / "bench"))

import quality  # noqa: E402
import scaling  # noqa: E402


def kept_by_formula(adapter: dict) -> int:
    """Kept parameters written down from the shape (hidden d, FFN f, L layers), independent of the meta model."""
    d, f, layers = quality.SHAPE.hidden, quality.SHAPE.intermediate, quality.SHAPE.layers
    dims = {"q_proj": (d, d), "k_proj": (d, d), "v_proj": (d, d), "o_proj": (d, d), "gate_proj": (f, d),
            "up_proj": (f, d), "down_proj": (d, f)}
    linears = [dims[t] for t in adapter.get("target_modules", [])] * layers  # (d_out, d_in) of each target
    method = adapter["method"]
    if method == "lora":  # A (r, d_in) and B (d_out, r)
        return sum(adapter["r"] * (o + i) for o, i in linears)
    if method == "adalora":  # the final budget: target_r triplets of each matrix, one singular value each
        return sum(adapter["target_r"] * (o + i + 1) for o, i in linears)
    if method == "krona":  # A (a1, a2) and B (d_out/a1, d_in/a2) per target
        return sum(adapter["a1"] * adapter["a2"] + (o // adapter["a1"]) * (i // adapter["a2"]) for o, i in linears)
    if method == "krona_block":  # A (a1, a2) and B (d/a1, d/a2) per layer, + s_res
        a1, a2 = adapter["a1"], adapter["a2"]
        return layers * (a1 * a2 + (d // a1) * (d // a2) + adapter["residual"])
    if method == "parallel_adapter":  # down (r, d) + bias r, up (d, r) + bias d, per layer
        return layers * (2 * d * adapter["r"] + adapter["r"] + d)
    if method == "prefix":  # P_k and P_v: l vectors of width d per layer, the MLP folded away
        return layers * 2 * adapter["length"] * d
    if method == "bitfit":  # two RMSNorm weights per layer and the final one
        return (2 * layers + 1) * d
    raise ValueError(method)


def by_formula(adapters: list[dict]) -> tuple[int, int]:
    """A counter for ``quality.plan`` from the formulas (kept only: the planner matches on kept parameters)."""
    (adapter,) = adapters
    kept = kept_by_formula(adapter)
    return kept, kept


@pytest.mark.parametrize("adapters", [
    [{"method": "lora", "r": 3, "alpha": 6, "target_modules": quality.ALL}],
    [{"method": "krona", "a1": 4, "a2": 8, "target_modules": quality.ALL}],
    [{"method": "parallel_adapter", "sublayer": "ffn", "r": 5, "scale": 4.0}],
    [{"method": "bitfit", "norm": True}],
])
def test_formulas_agree_with_the_injected_model(adapters):
    assert quality.parameter_counts(adapters)[0] == kept_by_formula(adapters[0])


@pytest.mark.parametrize("budget", [0.001, 0.01])
@pytest.mark.parametrize("method", ["prefix", "krona_block", "prefix_reparam"])
def test_matched_budget_is_near_the_target(method, budget):
    (adapter,), count, _ = quality.match_budgets((method,), budget, [])[method]
    assert count == kept_by_formula(adapter)
    assert 0.8 < count / (budget * quality.SHAPE.total_params()) < 1.25, (adapter, count)


def test_mam_is_counted_as_its_two_parts():
    (mam,), kept, trained = next(o for o in quality.counted("mam", quality.parameter_counts)
                                 if o[0][0]["prefix_length"] == 2 and o[0][0]["r"] == 1)
    prefix = quality.parameter_counts([{"method": "prefix", "length": 2, "reparameterize": False}])
    adapter = quality.parameter_counts([{"method": "parallel_adapter", "sublayer": "ffn", "r": 1, "scale": 4.0}])
    assert quality.parameter_counts([mam]) == (kept, trained) == (prefix[0] + adapter[0], prefix[1] + adapter[1])


# Pairs no configuration can match: MAM's count is prefixes (2,048 each) plus an adapter (2,052 r + 1,024), half a
# prefix off; KronA^B has 2,048 / 2,560 / 4,352 near 0.1%, KronA 4,096 / 5,120.
UNMATCHABLE = {("krona_block", "krona", 0.001), ("mam", "prefix", 0.001), ("prefix_reparam", "parallel", 0.001)}


def test_planned_pairs_are_matched_within_two_percent():
    rows = quality.plan(quality.METHODS, quality.BUDGETS, by_formula)
    kept = {(method, budget): k for method, budget, _, k, _ in rows}
    for x, y, b in quality.compared_pairs(quality.BUDGETS):
        target = b * quality.SHAPE.total_params()
        assert 0.5 <= kept[x, b] / target <= 2.0 and 0.5 <= kept[y, b] / target <= 2.0
        if (x, y, b) in UNMATCHABLE:  # the planner is not lazy: no two configurations in the window match
            near = {m: [k for _, k, _ in quality.counted(m, by_formula) if 0.5 <= k / target <= 2.0] for m in (x, y)}
            assert min(quality.mismatch(i, j) for i in near[x] for j in near[y]) > quality.BUDGET_TOLERANCE
        else:
            assert quality.mismatch(kept[x, b], kept[y, b]) <= quality.BUDGET_TOLERANCE, (x, y, b)


def test_adalora_is_counted_at_its_final_budget():
    lora = [{"method": "lora", "r": 4, "alpha": 8, "target_modules": quality.QV}]
    adalora = [{"method": "adalora", "init_r": 6, "target_r": 4, "target_modules": quality.QV, "tinit": 1, "tfinal": 1}]
    lam = 4 * quality.SHAPE.layers * 2  # one singular value per kept triplet
    kept, trained = quality.parameter_counts(adalora)
    assert kept == quality.parameter_counts(lora)[0] + lam and trained == kept * 6 // 4


def test_reparameterized_prefix_keeps_only_its_vectors():
    kept, trained = quality.parameter_counts([{"method": "prefix", "length": 3, "hidden": 8}])
    assert kept == quality.SHAPE.layers * 2 * 3 * quality.SHAPE.hidden and trained > kept


def test_fitted_exponent_recovers_a_power_law():
    assert scaling.fitted_exponent([1, 2, 4], [8.0, 4.0, 2.0]) == pytest.approx(-1.0)
    assert scaling.fitted_exponent([1, 2, 4], [5.0, 5.0, 5.0]) == pytest.approx(0.0)


def test_docstrings_keeps_only_docstrings():
    source = '"""Module."""\nx = 1\n\nclass A:\n    """Class."""\n    def f(self):\n        """Function."""\n        return "not this"\n'
    assert quality.docstrings(source) == "Module.\n\nClass.\n\nFunction."
    assert quality.docstrings("def broken(:\n") == ""


def test_writing_results_keeps_the_hand_written_reading():
    old = quality.results_markdown(["| old table |"], "--write docs/RESULTS.md", "")
    assert old.endswith(quality.HAND_WRITTEN + "\n")
    previous = old + "\n## Reading the table\n\nKronA holds at 0.1%.\n"
    new = quality.results_markdown(["| new table |"], "--write docs/RESULTS.md", previous)
    assert "| new table |" in new and "| old table |" not in new
    assert new.endswith(quality.HAND_WRITTEN + "\n\n## Reading the table\n\nKronA holds at 0.1%.\n")


def result(kept: int, seeds: list[float]) -> dict:
    """A ``claims`` entry: each seed's loss, and 4 test blocks per seed around it."""
    return {"kept": kept, "seeds": seeds, "blocks": [[s - 0.01, s + 0.01, s - 0.02, s + 0.02] for s in seeds]}


LORA = [4.00, 4.03, 3.98, 4.01, 4.02]  # seed-to-seed spread larger than the effects below, shared by the pair


@pytest.mark.parametrize("shift, outcome", [(-0.05, "holds"), (+0.05, "reversed"), (-0.002, "not shown")])
def test_claims_pair_by_seed(shift, outcome):
    krona = [v + shift + e for v, e in zip(LORA, [0.001, -0.001, 0.002, 0.0, -0.002])]
    (line,) = quality.claims({("krona", 0.001): result(4096, krona), ("lora", 0.001): result(4096, LORA)}, (0.001,))
    assert line.endswith(outcome) and "Holm" in line


def test_claims_skip_unmatched_budgets_and_correct_for_the_family():
    krona = [v - 0.05 for v in LORA]
    results = {("krona", 0.001): result(4096, krona), ("lora", 0.001): result(4096, LORA),
               ("krona_block", 0.001): result(4352, [v - 0.1 for v in LORA])}
    unmatched, matched = sorted(quality.claims(results, (0.001,)), key=lambda line: "not compared" not in line)
    assert unmatched.endswith("not compared, budgets not matched within 2% (4,352 vs 4,096)")
    assert matched.endswith("holds")


def test_sweep_widens_the_grid_until_the_optimum_is_inside():
    def loss(lr: float) -> float:  # lowest at lr = 1 (log10 0), beyond the grid's top
        return math.log10(lr) ** 2

    best, scores = quality.best_learning_rate(loss, (1e-3, 1e-2, 1e-1))
    assert best == pytest.approx(1.0) and sorted(scores)[-1] == pytest.approx(10.0)  # grown by x10 twice
    best, _ = quality.best_learning_rate(lambda lr: float("nan") if lr > 0.05 else loss(lr * 100), (1e-3, 1e-2, 1e-1))
    assert best == pytest.approx(1e-2)  # a diverged run (nan) never counts as the best
    with pytest.raises(RuntimeError, match="still on the edge"):
        quality.best_learning_rate(lambda lr: -lr, (1e-3, 1e-2, 1e-1), widenings=2)
