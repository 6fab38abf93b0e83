"""Pure helpers of the bench scripts: budget matching (bench/quality.py) and the scaling fit (bench/scaling.py)."""
import sys

import pytest

from tests.multiproc import REPO

sys.path.insert(0, str(REPO / "bench"))

import quality  # noqa: E402
import scaling  # noqa: E402


def kept_by_formula(adapter: dict) -> int:
    """Kept parameters written down from the shape (hidden d, L layers), independent of the meta model."""
    d, layers = quality.SHAPE.hidden, quality.SHAPE.layers
    if adapter["method"] == "prefix":  # P_k and P_v: l vectors of width d per layer, the MLP folded away
        return layers * 2 * adapter["length"] * d
    if adapter["method"] == "krona_block":  # A (a1, a2) and B (d/a1, d/a2) per layer, + s_res
        a1, a2 = adapter["a1"], adapter["a2"]
        return layers * (a1 * a2 + (d // a1) * (d // a2) + adapter["residual"])
    raise ValueError(adapter["method"])


@pytest.mark.parametrize("budget", [0.001, 0.01])
@pytest.mark.parametrize("method", ["prefix", "krona_block", "prefix_reparam"])
def test_matched_budget_is_near_the_target(method, budget):
    (adapter,), count, _ = quality.match_budget(method, budget)
    assert count == kept_by_formula(adapter)
    assert 0.8 < count / (budget * quality.SHAPE.total_params()) < 1.25, (adapter, count)


def test_mam_splits_its_budget_between_prefix_and_scaled_adapter():
    (mam,), count, _ = quality.match_budget("mam", 0.01)
    (prefix,), p, _ = quality.match_budget("prefix", 0.005)
    assert (mam["prefix_length"], mam["scale"]) == (prefix["length"], 4.0)
    assert quality.parameter_counts([mam]) == (count, count) and count > p


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


@pytest.mark.parametrize("x_loss, spread, outcome", [
    (3.90, 0.01, "holds"), (4.10, 0.01, "reversed"), (3.995, 0.01, "no difference beyond the seed spread"),
    (3.90, 0.0, "one seed, no spread to judge by")])
def test_verdict_needs_a_difference_beyond_the_seed_spread(x_loss, spread, outcome):
    results = {("krona", 0.001): {"loss": (x_loss, spread)}, ("lora", 0.001): {"loss": (4.0, spread / 2)}}
    assert quality.verdict("krona", "lora", results, 0.001).endswith(outcome)
