"""Statistics behind bench/quality.py's verdicts, in plain Python (scipy is not a dependency of peft-dist).

The rule, fixed before the numbers are seen: each claim "x beats y" is judged on per-seed paired differences
d_s = loss_x(seed s) - loss_y(seed s) (the two runs of a seed share data order and initialization seed, so
pairing removes that shared variance). A paired Student t test gives a two-sided p-value and a 95% confidence
interval for the mean difference; the p-values of all claims are Holm-Bonferroni adjusted (the family is every
claim in the table). A claim

- "holds" when its adjusted p < ALPHA, its 95% CI lies below 0 and its mean difference is at least MIN_EFFECT
  nats in the claimed direction;
- is "reversed" when the same holds in the other direction;
- is "not shown" otherwise.

A paired bootstrap over test documents is reported beside it: it shows how much of the difference would
survive another draw of test text, which the seeds do not vary. The unit resampled is the document, not the
128-token block: blocks are windows of one stream, so neighbouring blocks share documents and are not
independent draws. Its statistic is the token-weighted mean loss difference (each resample's summed
differences over its summed tokens), the same average the reported losses take, so the full sample gives
exactly the difference of the two reported means; a document-mean statistic would weight a 20-token
docstring like a 6,000-token one.

An equivalence claim "x matches y" (QLoRA's NF4 base against a 16-bit one) is judged on the same differences
by two one-sided t tests (TOST) against the margin +-MIN_EFFECT, whose p-values are Holm-Bonferroni adjusted
over the equivalence claims. It "matches" when that adjusted p < ALPHA (for one claim alone: the 90% CI lies
inside +-MIN_EFFECT); it is "worse" or "better" when ``outcome`` finds x's loss higher ("reversed") or lower
("holds"); "not shown" otherwise.
"""
from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

ALPHA = 0.05
MIN_EFFECT = 0.01  # nats: the smallest loss difference this study treats as a finding


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        even, odd = m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        for numerator in (even, odd):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            return h
    raise ArithmeticError(f"incomplete beta did not converge for a={a}, b={b}, x={x}")


def incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function, for 0 <= x <= 1."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):  # the continued fraction converges fast on this side; use symmetry otherwise
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom: I_{df/(df+t^2)}(df/2, 1/2) gives the two tails."""
    tail = 0.5 * incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: int) -> float:
    """The t value with ``t_cdf(t, df) == p``, by bisection (t_cdf is monotone; 100 halvings reach double precision)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    low, high = -1e3, 1e3
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


@dataclass(frozen=True)
class Paired:
    """A paired comparison: mean of the differences x - y, its 95% CI, the two-sided p-value (t test), the
    number of pairs and the standard error of the mean (what the equivalence test needs)."""

    mean: float
    low: float
    high: float
    p: float
    n: int
    se: float


def paired_t(x: Sequence[float], y: Sequence[float], level: float = 0.95) -> Paired:
    """Paired Student t test of x - y (n - 1 degrees of freedom); needs at least 2 pairs."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"need two equal-length samples of at least 2 pairs, got {len(x)} and {len(y)}")
    d = [a - b for a, b in zip(x, y)]
    n, mean, sd = len(d), statistics.mean(d), statistics.stdev(d)
    se = sd / math.sqrt(n)
    half = t_quantile(0.5 + level / 2, n - 1) * se
    if se == 0:  # identical differences: no spread to test against; significant unless they are all zero
        p = 1.0 if mean == 0 else 0.0
    else:
        p = 2.0 * t_cdf(-abs(mean) / se, n - 1)
    return Paired(mean, mean - half, mean + half, p, n, se)


def document_bootstrap(x: Sequence[float], y: Sequence[float], tokens: Sequence[int], resamples: int = 2000,
                       seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of the token-weighted mean difference sum(x - y) / sum(tokens) when the documents are
    resampled with replacement. ``x[i]``, ``y[i]``: the two methods' losses summed over document ``i``'s
    ``tokens[i]`` tokens (the same tokens for both: the pairing)."""
    if not len(x) == len(y) == len(tokens) or not x or min(tokens) < 1:
        raise ValueError(f"need equal-length, non-empty samples and at least one token per document, got {len(x)}, "
                         f"{len(y)} and {len(tokens)} documents, fewest tokens {min(tokens, default=None)}")
    units = [(a - b, n) for a, b, n in zip(x, y, tokens)]
    rng = random.Random(seed)
    means = []
    for _ in range(resamples):
        drawn = rng.choices(units, k=len(units))
        means.append(sum(d for d, _ in drawn) / sum(n for _, n in drawn))
    means.sort()
    tail = (1.0 - level) / 2
    return means[int(tail * resamples)], means[min(resamples - 1, int((1.0 - tail) * resamples))]


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order (compare each with ALPHA)."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [0.0] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))  # keeps the adjusted values monotone
        adjusted[i] = running
    return adjusted


def outcome(test: Paired, adjusted_p: float) -> str:
    """The verdict on "x has the lower loss" (``test`` of x - y): holds, reversed or not shown (see the module doc)."""
    if adjusted_p < ALPHA and test.high < 0 and test.mean <= -MIN_EFFECT:
        return "holds"
    if adjusted_p < ALPHA and test.low > 0 and test.mean >= MIN_EFFECT:
        return "reversed"
    return "not shown"


def equivalence_p(test: Paired, margin: float = MIN_EFFECT) -> float:
    """TOST p-value of "the mean difference lies inside +-margin": the larger of the one-sided t tests against
    -margin and +margin (n - 1 degrees of freedom). Below ALPHA exactly when the (1 - 2 ALPHA) CI is inside."""
    if test.se == 0:  # identical differences: inside or not, with certainty
        return 0.0 if abs(test.mean) < margin else 1.0
    df = test.n - 1
    above_low = t_cdf(-(test.mean + margin) / test.se, df)  # H0: difference <= -margin
    below_high = t_cdf((test.mean - margin) / test.se, df)  # H0: difference >= +margin
    return max(above_low, below_high)


def equivalence(test: Paired, adjusted_p: float, adjusted_equivalence_p: float) -> str:
    """The verdict on "x matches y" (``test`` of x - y, lower is better): matches, worse, better or not shown,
    from the Holm-adjusted t-test and TOST p-values (see the module doc)."""
    if adjusted_equivalence_p < ALPHA:
        return "matches"
    return {"holds": "better", "reversed": "worse"}.get(outcome(test, adjusted_p), "not shown")
