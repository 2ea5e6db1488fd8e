from collections.abc import Callable

import numpy as np
import pytest
from scipy.stats import binom

from smoothing.accuracy import (
    approximate_certified_accuracy,
    certified_count,
    true_accuracy_lower_bound,
    true_accuracy_lower_bound_exact,
)

Bound = Callable[[int, int, float, float], float]
BOUNDS = [true_accuracy_lower_bound, true_accuracy_lower_bound_exact]


def released_code_bound(num_correct: int, m: int, alpha: float, rho: float) -> float:
    """What the paper's released analysis code computes: too small a margin, and no 1/(1 − α)."""
    return num_correct / m - np.sqrt(alpha * (1 - alpha) * np.log(1 / rho) / m)


def worst_case_counts(truly_certified: int, m: int, alpha: float, repetitions: int, seed: int) -> np.ndarray:
    """Y over repeated CERTIFY runs in the worst case Theorem 6 allows: every truly certified example is
    counted, and each of the other m − T is (wrongly) counted with probability exactly α, independently."""
    rng = np.random.default_rng(seed)
    return truly_certified + rng.binomial(m - truly_certified, alpha, size=repetitions)


def bounds_for_counts(bound: Bound, counts: np.ndarray, m: int, alpha: float, rho: float) -> np.ndarray:
    # Y takes few distinct values: evaluate the bound once per value.
    values, inverse = np.unique(counts, return_inverse=True)
    return np.array([bound(int(y), m, alpha, rho) for y in values])[inverse]


def failure_probability(bound: Bound, truly_certified: int, m: int, alpha: float, rho: float) -> float:
    """Exact P(bound > true accuracy) in the worst case, summing over W ~ Binomial(m − T, α)."""
    wrong = np.arange(m - truly_certified + 1)
    weights = binom.pmf(wrong, m - truly_certified, alpha)
    keep = weights > 1e-15  # the rest cannot move the sum by a measurable amount
    fails = [bound(int(truly_certified + w), m, alpha, rho) > truly_certified / m for w in wrong[keep]]
    return float(np.sum(weights[keep][fails]))


@pytest.mark.parametrize("bound", BOUNDS)
@pytest.mark.parametrize("true_accuracy", [0.0, 0.3, 0.7, 0.95])
def test_bound_holds_in_simulation(bound: Bound, true_accuracy: float) -> None:
    m, alpha, rho, repetitions = 500, 0.05, 0.05, 20_000
    truly_certified = round(true_accuracy * m)
    counts = worst_case_counts(truly_certified, m, alpha, repetitions, seed=truly_certified)
    failures = np.mean(bounds_for_counts(bound, counts, m, alpha, rho) > truly_certified / m)
    # 4 standard errors of a rate of ρ over 20,000 repetitions: a false alarm has probability < 1e-4.
    assert failures <= rho + 4 * np.sqrt(rho * (1 - rho) / repetitions)


@pytest.mark.parametrize("bound", BOUNDS)
@pytest.mark.parametrize(("m", "alpha", "rho"), [(500, 0.05, 0.05), (200, 0.001, 0.001), (1000, 0.2, 0.01)])
def test_exact_failure_probability_at_most_rho(bound: Bound, m: int, alpha: float, rho: float) -> None:
    for true_accuracy in (0.0, 0.2, 0.5, 0.8, 0.95, 0.99):
        assert failure_probability(bound, round(true_accuracy * m), m, alpha, rho) <= rho + 1e-12


def test_exact_version_is_not_vacuous() -> None:
    # Its failure probability should be close to ρ (it uses the exact quantile), not far below it.
    assert failure_probability(true_accuracy_lower_bound_exact, 0, 500, 0.05, 0.05) > 0.02


def test_released_code_formula_fails_in_worst_case() -> None:
    m, alpha, rho = 10_000, 0.001, 0.001
    for true_accuracy in (0.0, 0.5):
        assert failure_probability(released_code_bound, round(true_accuracy * m), m, alpha, rho) > 10 * rho
        assert failure_probability(true_accuracy_lower_bound, round(true_accuracy * m), m, alpha, rho) <= rho


def test_theorem_6_subtracts_more_than_released_code() -> None:
    m, alpha, rho = 10_000, 0.001, 0.001
    # The released margin is even below the exact binomial quantile of the wrong-certificate count.
    released_margin = np.sqrt(alpha * (1 - alpha) * np.log(1 / rho) / m)
    assert released_margin < binom.ppf(1 - rho, m, alpha) / m
    for num_correct in range(100, m + 1, 100):
        theorem_6 = true_accuracy_lower_bound(num_correct, m, alpha, rho)
        assert num_correct / m - theorem_6 > num_correct / m - released_code_bound(num_correct, m, alpha, rho)


def test_theorem_6_formula() -> None:
    m, alpha, rho, num_correct = 1000, 0.01, 0.05, 800
    log_term = np.log(20.0)
    expected = (0.8 - 0.01 - np.sqrt(2 * 0.01 * 0.99 * log_term / 1000) - log_term / 3000) / 0.99
    assert true_accuracy_lower_bound(num_correct, m, alpha, rho) == pytest.approx(expected, rel=1e-12)
    assert true_accuracy_lower_bound(0, m, alpha, rho) == 0.0  # clipped


@pytest.mark.parametrize("m", [50, 500, 3000])
@pytest.mark.parametrize("alpha", [0.001, 0.05, 0.2, 0.5])
@pytest.mark.parametrize("rho", [0.001, 0.05])
def test_exact_version_is_tighter(m: int, alpha: float, rho: float) -> None:
    simple_quantile = binom.ppf(1 - rho, m, alpha)
    for num_correct in np.linspace(0, m, 11).astype(int):
        exact = true_accuracy_lower_bound_exact(int(num_correct), m, alpha, rho)
        assert exact >= true_accuracy_lower_bound(int(num_correct), m, alpha, rho)
        # The quantile of all m examples, (Y − q(m))/m, is valid too but never tighter.
        assert exact >= (num_correct - simple_quantile) / m
        assert 0.0 <= exact <= num_correct / m


def test_bounds_increase_with_count() -> None:
    for bound in BOUNDS:
        values = [bound(y, 300, 0.01, 0.01) for y in range(301)]
        assert np.all(np.diff(values) >= 0)
        assert values[-1] > 0.9


@pytest.mark.parametrize("bound", BOUNDS)
def test_bounds_reject_invalid_arguments(bound: Bound) -> None:
    for arguments in [(5, 0, 0.01, 0.01), (11, 10, 0.01, 0.01), (5, 10, 0.6, 0.01), (5, 10, 0.01, 0.0)]:
        with pytest.raises(ValueError):
            bound(*arguments)


def test_approximate_certified_accuracy() -> None:
    radii = np.array([0.0, 0.2, 0.5, 0.5, 1.0, np.nan])
    correct = np.array([False, True, True, False, True, True])  # first: abstention; last: NaN radius
    assert certified_count(radii, correct, 0.0) == 3
    assert approximate_certified_accuracy(radii, correct, 0.0) == pytest.approx(3 / 6)
    assert approximate_certified_accuracy(radii, correct, 0.5) == pytest.approx(2 / 6)  # radius ≥ r counts
    assert approximate_certified_accuracy(radii, correct, 0.51) == pytest.approx(1 / 6)
    assert approximate_certified_accuracy(radii, correct, 2.0) == 0.0


def test_abstention_as_label_minus_one() -> None:
    predicted, labels = np.array([3, -1, 2]), np.array([3, 1, 1])
    radii = np.array([0.4, 0.0, 0.9])
    assert certified_count(radii, predicted == labels, 0.0) == 1


def test_approximate_certified_accuracy_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        certified_count(np.zeros(3), np.ones(2, dtype=bool), 0.1)
    with pytest.raises(ValueError):
        approximate_certified_accuracy(np.zeros(0), np.zeros(0, dtype=bool), 0.1)
