"""bench/stats.py against known answers: published t tables, a hand-worked paired test, Holm's textbook example."""
import random
import sys

import pytest

from tests.multiproc import REPO

sys.path.insert(0, str(REPO / "bench"))

import stats  # noqa: E402


@pytest.mark.parametrize("df, quantile", [(1, 12.706), (2, 4.303), (4, 2.776), (10, 2.228), (30, 2.042)])
def test_t_quantile_matches_the_printed_table(df, quantile):
    # two-sided 95% critical values, e.g. NIST/SEMATECH e-Handbook, table 1.3.6.7.2
    assert stats.t_quantile(0.975, df) == pytest.approx(quantile, abs=5e-4)
    assert stats.t_quantile(0.025, df) == pytest.approx(-quantile, abs=5e-4)


def test_t_cdf_known_values():
    assert stats.t_cdf(1.0, 1) == pytest.approx(0.75)  # Cauchy: 1/2 + atan(1)/pi
    assert stats.t_cdf(2.0, 2) == pytest.approx(0.5 + 2 / (2 * 6**0.5))  # df 2: 1/2 + t / (2 sqrt(2 + t^2))
    assert stats.t_cdf(0.0, 7) == pytest.approx(0.5)
    assert stats.t_cdf(2.0, 10) == pytest.approx(0.963306, abs=1e-6)
    assert stats.t_cdf(-2.0, 10) == pytest.approx(1 - 0.963306, abs=1e-6)


def test_incomplete_beta_edge_cases():
    assert stats.incomplete_beta(1.0, 1.0, 0.3) == pytest.approx(0.3)  # uniform
    assert stats.incomplete_beta(2.5, 2.5, 0.5) == pytest.approx(0.5)  # symmetric
    assert stats.incomplete_beta(2.0, 3.0, 0.0) == 0.0 and stats.incomplete_beta(2.0, 3.0, 1.0) == 1.0


def test_paired_t_on_a_hand_example():
    # d = 1..5: mean 3, sd sqrt(2.5), se 0.7071, t = 4.243 on 4 df, half-width 2.776 * 0.7071 = 1.963
    test = stats.paired_t([1.5, 2.5, 3.5, 4.5, 5.5], [0.5, 0.5, 0.5, 0.5, 0.5])
    assert (test.mean, test.n) == (pytest.approx(3.0), 5)
    assert (test.low, test.high) == (pytest.approx(1.0368, abs=1e-4), pytest.approx(4.9632, abs=1e-4))
    assert test.p == pytest.approx(0.01324, abs=1e-5)


def test_paired_t_removes_what_the_pair_shares():
    # a large per-seed offset shared by both methods hides a constant 0.02 gap from an unpaired test, not this one
    shared = [0.0, 0.3, -0.2, 0.5, -0.4]
    noise = [0.001, -0.002, 0.0, 0.002, -0.001]
    test = stats.paired_t([4.0 + s + e for s, e in zip(shared, noise)], [4.02 + s for s in shared])
    assert test.high < 0 and test.p < 1e-4


def test_holm_on_the_textbook_example():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 -> 0.02, 0.03, 0.06, max(0.04, 0.06); returned in input order
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_document_bootstrap_on_two_documents():
    # document A: 1 token, loss difference 1.0; B: 3 tokens, summed difference 0. Drawing 2 documents with
    # replacement gives AA (1/4): 1.0, AB or BA (1/2): 1/4 (token-weighted; a document mean would say 0.5),
    # BB (1/4): 0. The 2.5% and 97.5% quantiles are 0 and 1; the 30% and 70% ones both 0.25.
    x, y, tokens = [5.0, 12.0], [4.0, 12.0], [1, 3]
    assert stats.document_bootstrap(x, y, tokens) == (0.0, 1.0)
    assert stats.document_bootstrap(x, y, tokens, level=0.4) == (0.25, 0.25)


def test_document_bootstrap_covers_the_true_difference():
    rng = random.Random(1)
    tokens = [rng.randint(20, 2000) for _ in range(60)]
    y = [n * rng.gauss(4.0, 0.3) for n in tokens]  # summed losses: the documents differ in level and length
    x = [v + n * (-0.05 + rng.gauss(0.0, 0.02)) for v, n in zip(y, tokens)]  # true per-token difference -0.05
    low, high = stats.document_bootstrap(x, y, tokens, seed=0)
    assert low < -0.05 < high and high - low < 0.02
    assert stats.document_bootstrap(x, y, tokens, seed=0) == (low, high)  # a fixed seed gives a fixed interval


def test_document_bootstrap_refuses_documents_without_tokens():
    with pytest.raises(ValueError, match="at least one token"):
        stats.document_bootstrap([1.0, 2.0], [1.0, 2.0], [3, 0])


def paired(mean: float, spread: float) -> stats.Paired:
    """A test of x - y over 5 seeds whose differences are ``mean`` plus a symmetric spread."""
    y = [4.0] * 5
    return stats.paired_t([4.0 + mean + spread * k for k in (-2, -1, 0, 1, 2)], y)


@pytest.mark.parametrize("test, adjusted, outcome", [
    (paired(-0.05, 0.002), 0.001, "holds"),
    (paired(+0.05, 0.002), 0.001, "reversed"),
    (paired(-0.05, 0.002), 0.2, "not shown"),  # significant alone, not after the correction
    (paired(-0.005, 0.0005), 0.001, "not shown"),  # significant but below MIN_EFFECT
    (paired(-0.05, 0.05), 0.001, "not shown"),  # the CI reaches 0
])
def test_verdict_rule(test, adjusted, outcome):
    assert stats.outcome(test, adjusted) == outcome


def test_too_few_pairs_is_an_error():
    with pytest.raises(ValueError, match="at least 2"):
        stats.paired_t([1.0], [2.0])


def test_equivalence_p_is_the_tost_dual_of_the_confidence_interval():
    # the hand example's d = 0.001..0.005: mean 0.003, se 0.0007071 on 4 df. Against a margin at the 95% CI's
    # far bound only that side's one-sided test counts, at 0.025; at mean + 2.132 se (t 0.95, 4 df), 0.05
    test = stats.paired_t([0.001 * k for k in range(1, 6)], [0.0] * 5)
    assert test.se == pytest.approx(0.00070711, abs=1e-8)
    assert stats.equivalence_p(test, test.high) == pytest.approx(0.025, abs=1e-6)
    assert stats.equivalence_p(test, 0.003 + 2.132 * test.se) == pytest.approx(0.05, abs=1e-4)
    mirrored = stats.paired_t([0.0] * 5, [0.001 * k for k in range(1, 6)])  # mean -0.003: the other side counts
    assert stats.equivalence_p(mirrored, test.high) == pytest.approx(0.025, abs=1e-6)
    assert stats.equivalence_p(test, 0.002) > 0.5  # the mean itself lies outside +-0.002


def test_equivalence_p_without_spread():
    assert stats.equivalence_p(stats.paired_t([4.005] * 3, [4.0] * 3)) == 0.0  # +0.005 surely inside +-0.01
    assert stats.equivalence_p(stats.paired_t([4.02] * 3, [4.0] * 3)) == 1.0


@pytest.mark.parametrize("test, adjusted, adjusted_equivalence, verdict", [
    (paired(+0.002, 0.0005), 0.001, 0.001, "matches"),  # detectably different, but surely within 0.01
    (paired(+0.002, 0.0005), 0.5, 0.2, "not shown"),  # the same, in a family whose correction leaves it at 0.2
    (paired(+0.05, 0.002), 0.001, 1.0, "worse"),
    (paired(-0.05, 0.002), 0.001, 1.0, "better"),
    (paired(+0.008, 0.002), 0.001, 0.3, "not shown"),  # below 0.01 on average, but not surely within it
    (paired(+0.0, 0.05), 1.0, 1.0, "not shown"),  # too noisy to tell
])
def test_equivalence_verdict_rule(test, adjusted, adjusted_equivalence, verdict):
    assert stats.equivalence(test, adjusted, adjusted_equivalence) == verdict


def test_equivalence_p_of_the_verdict_cases():
    assert stats.equivalence_p(paired(+0.002, 0.0005)) < 0.001  # the "matches" case above
    assert stats.equivalence_p(paired(+0.008, 0.002)) > stats.ALPHA  # the "not surely within" case
