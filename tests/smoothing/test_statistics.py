"""Clopper–Pearson bounds, the binomial test and the radius, against hand-computed values.

The exact-value tests catch a bound that is valid but too loose (for example the two-sided
interval at level α used as the one-sided bound): a coverage simulation cannot see that.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import beta, binom, binomtest, norm

from smoothing.statistics import (
    lower_confidence_bound,
    probability_for_radius,
    radius_from_lower_bound,
    two_sided_p_value,
    upper_confidence_bound,
)

GRID = [(1, 1), (1, 10), (3, 10), (9, 10), (50, 100), (99, 100), (873, 1000), (99_000, 100_000)]
ALPHAS = [0.001, 0.01, 0.05, 0.1, 0.25]


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("n", [1, 2, 10, 100, 100_000])
def test_lower_bound_when_every_sample_agrees_is_alpha_to_the_one_over_n(n: int, alpha: float) -> None:
    # P(K = n) = p^n = α solves the one-sided bound at k = n.
    assert lower_confidence_bound(n, n, alpha) == pytest.approx(alpha ** (1 / n), rel=1e-12)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("n", [1, 10, 1000])
def test_no_successes_give_lower_bound_zero_and_all_give_upper_bound_one(n: int, alpha: float) -> None:
    assert lower_confidence_bound(0, n, alpha) == 0.0
    assert upper_confidence_bound(n, n, alpha) == 1.0


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize(("k", "n"), GRID)
def test_bounds_are_beta_quantiles(k: int, n: int, alpha: float) -> None:
    assert lower_confidence_bound(k, n, alpha) == pytest.approx(beta.ppf(alpha, k, n - k + 1), rel=1e-9)
    if k < n:
        assert upper_confidence_bound(k, n, alpha) == pytest.approx(beta.ppf(1 - alpha, k + 1, n - k), rel=1e-9)
    # Mirror image: the upper bound on p is one minus the lower bound on 1 - p.
    assert upper_confidence_bound(k, n, alpha) == pytest.approx(1 - lower_confidence_bound(n - k, n, alpha), abs=1e-12)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize(("k", "n"), [(k, n) for k, n in GRID if k > 0])
def test_lower_bound_is_exactly_one_sided(k: int, n: int, alpha: float) -> None:
    # Defining property: at p = bound(k), seeing k or more successes has probability exactly α.
    # The two-sided interval at level α would give α/2 here; a naive k/n would give about 1/2.
    p = lower_confidence_bound(k, n, alpha)
    assert binom.sf(k - 1, n, p) == pytest.approx(alpha, rel=1e-6)


@pytest.mark.parametrize("alpha", [0.001, 0.1])
@pytest.mark.parametrize("n", [10, 57, 400])
def test_lower_bound_coverage_exact_over_p_grid(n: int, alpha: float) -> None:
    # P_p(bound(K) > p) = Σ_k pmf(k) 1[bound(k) > p], summed exactly (no Monte Carlo) for many p.
    bounds = np.array([lower_confidence_bound(k, n, alpha) for k in range(n + 1)])
    ks = np.arange(n + 1)
    worst = 0.0
    for p in np.linspace(0.001, 0.999, 499):
        violation = float(binom.pmf(ks, n, p)[bounds > p].sum())
        assert violation <= alpha * (1 + 1e-9)
        worst = max(worst, violation)
    # …and the bound is not needlessly loose: just below each bound(k) the violation nears α.
    just_below = [float(binom.pmf(ks, n, b - 1e-9)[bounds > b - 1e-9].sum()) for b in bounds[1:]]
    assert max(just_below) == pytest.approx(alpha, rel=1e-4)


def test_lower_bound_is_monotone() -> None:
    n = 200
    by_k = [lower_confidence_bound(k, n, 0.01) for k in range(n + 1)]
    assert all(a < b for a, b in zip(by_k, by_k[1:], strict=False))
    by_alpha = [lower_confidence_bound(150, n, a) for a in (0.001, 0.01, 0.1, 0.4)]
    assert all(a < b for a, b in zip(by_alpha, by_alpha[1:], strict=False))
    assert all(lower_confidence_bound(k, n, 0.01) < k / n < upper_confidence_bound(k, n, 0.01) for k in range(1, n))


@pytest.mark.parametrize("n", [0, -3])
def test_bounds_need_samples(n: int) -> None:
    with pytest.raises(ValueError, match="n > 0"):
        lower_confidence_bound(0, n, 0.01)
    with pytest.raises(ValueError, match="n > 0"):
        upper_confidence_bound(0, n, 0.01)


def two_sided_by_hand(n_a: int, n_b: int) -> float:
    """Σ of Binomial(n, 1/2) probabilities no larger than that of the observed count, summed with math.comb."""
    n = n_a + n_b
    pmf = [math.comb(n, k) / 2**n for k in range(n + 1)]
    return min(1.0, sum(q for q in pmf if q <= pmf[n_a] * (1 + 1e-12)))


@pytest.mark.parametrize(
    ("n_a", "n_b", "expected"),
    [
        (10, 0, 2 / 1024),  # 2 · (1/2)^10
        (9, 1, 2 * 11 / 1024),  # 2 · (1 + 10) / 2^10
        (5, 5, 1.0),
        (1, 0, 1.0),
        (6, 0, 2 / 64),
        (7, 3, 2 * (1 + 10 + 45 + 120) / 1024),
    ],
)
def test_two_sided_p_value_hand_values(n_a: int, n_b: int, expected: float) -> None:
    assert two_sided_p_value(n_a, n_b) == pytest.approx(expected, rel=1e-12)
    assert two_sided_p_value(n_b, n_a) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("n_a", "n_b"), [(13, 4), (40, 21), (100, 73), (8, 8), (0, 30)])
def test_two_sided_p_value_matches_direct_sum(n_a: int, n_b: int) -> None:
    assert two_sided_p_value(n_a, n_b) == pytest.approx(two_sided_by_hand(n_a, n_b), rel=1e-9)


def test_two_sided_p_value_without_trials_is_one() -> None:
    assert two_sided_p_value(0, 0) == 1.0


@pytest.mark.parametrize(
    ("p_a_lower", "cohen"),
    [(0.6, 0.2533), (0.9, 1.2816), (0.99, 2.3263), (0.999, 3.0902)],  # PAPER-NOTES.md, Appendix I table, σ = 1
)
@pytest.mark.parametrize("sigma", [1.0, 0.25, 0.5])
def test_radius_reference_values(p_a_lower: float, cohen: float, sigma: float) -> None:
    assert radius_from_lower_bound(p_a_lower, sigma) == pytest.approx(sigma * cohen, abs=sigma * 6e-5)


def test_radius_hand_values_and_inverse() -> None:
    assert radius_from_lower_bound(0.5, 0.5) == 0.0
    assert radius_from_lower_bound(0.8413447460685429, 0.25) == pytest.approx(0.25, rel=1e-12)  # Φ(1)
    assert radius_from_lower_bound(0.975, 2.0) == pytest.approx(2 * 1.959963984540054, rel=1e-12)
    for radius in (0.0, 0.1, 0.37, 1.0, 2.5):
        assert probability_for_radius(radius, 0.5) == pytest.approx(norm.cdf(radius / 0.5), rel=1e-12)
        assert radius_from_lower_bound(probability_for_radius(radius, 0.5), 0.5) == pytest.approx(radius, abs=1e-9)


@pytest.mark.parametrize("n", [1, 2, 7, 100, 1000, 100_000])
def test_two_sided_p_value_equals_scipy_binomtest(n: int) -> None:
    for n_a in sorted({0, 1, n // 3, n // 2, (n + 1) // 2, n - 1, n}):
        expected = binomtest(n_a, n, 0.5, alternative="two-sided").pvalue
        assert two_sided_p_value(n_a, n - n_a) == pytest.approx(expected, rel=1e-9, abs=1e-300)
