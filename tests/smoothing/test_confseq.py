"""The mixture confidence sequence: its closed form against the integral, its inversion, its width.

Its error over every n is computed exactly in tests/smoothing/test_sequential.py, beside the other bounds.
"""

import math

import numpy as np
import pytest
from scipy.integrate import quad
from scipy.stats import norm

from smoothing.confseq import DECISION_PRIORS, log_mixture, log_mixture_of_priors, lower_confidence_sequence, rejects
from smoothing.statistics import lower_confidence_bound


def mixture_by_quadrature(k: int, n: int, p0: float, prior_b: float) -> float:
    def weighted_ratio(q: float) -> float:
        log_ratio = k * math.log(q / p0) + (n - k) * math.log((1 - q) / (1 - p0))
        return math.exp(log_ratio) * prior_b * (1 - q) ** (prior_b - 1)

    return math.log(quad(weighted_ratio, p0, 1, limit=500)[0] / (1 - p0) ** prior_b)


@pytest.mark.parametrize("prior_b", [0.25, 0.5, 1.0])
@pytest.mark.parametrize(("k", "n", "p0"), [(90, 100, 0.8), (100, 100, 0.95), (990, 1000, 0.98), (5, 10, 0.3)])
def test_closed_form_is_the_mixture_integral(k: int, n: int, p0: float, prior_b: float) -> None:
    assert log_mixture(k, n, p0, prior_b) == pytest.approx(mixture_by_quadrature(k, n, p0, prior_b), abs=1e-8)


@pytest.mark.parametrize(("k", "n"), [(1, 1), (7, 10), (95, 100), (100, 100), (9_850, 10_000), (100_000, 100_000)])
@pytest.mark.parametrize("alpha", [0.001, 0.05])
@pytest.mark.parametrize("priors", [(0.1,), DECISION_PRIORS])
def test_lower_bound_is_where_the_rejected_region_ends(k: int, n: int, alpha: float, priors) -> None:
    lower = lower_confidence_sequence(k, n, alpha, priors)
    assert 0.0 <= lower <= k / (n + 1)
    if lower > 0:  # everything below the bound is rejected, the bound itself (just above) is not
        for p0 in np.linspace(1e-6, lower, 50)[:-1]:
            assert rejects(k, n, float(p0), alpha, priors)
        assert log_mixture_of_priors(k, n, lower, priors) == pytest.approx(-math.log(alpha), abs=1e-6)
    # Anytime validity costs width: never tighter than the fixed-n bound on the same counts.
    assert lower <= lower_confidence_bound(k, n, alpha)


def test_unanimous_samples_reach_nearly_the_fixed_n_bound() -> None:
    # At σ = 0.25, n = 100,000, α = 0.001: fixed n certifies 0.953 when all samples agree; doubling looks at α/11
    # reach 0.934; the confidence sequence must be within 0.01 of fixed n.
    n, alpha, sigma = 100_000, 0.001, 0.25
    fixed = sigma * norm.ppf(alpha ** (1 / n))
    union = sigma * norm.ppf((alpha / 11) ** (1 / n))
    sequence = sigma * norm.ppf(lower_confidence_sequence(n, n, alpha))
    assert union < sequence < fixed and fixed - sequence < 0.01


@pytest.mark.parametrize(("k", "n", "p0"), [(90, 100, 0.8), (100, 100, 0.95), (990, 1000, 0.98)])
def test_decision_mixture_is_the_average_of_its_priors(k: int, n: int, p0: float) -> None:
    average = sum(math.exp(mixture_by_quadrature(k, n, p0, b)) for b in DECISION_PRIORS) / len(DECISION_PRIORS)
    assert log_mixture_of_priors(k, n, p0, DECISION_PRIORS) == pytest.approx(math.log(average), abs=1e-8)


def test_decision_mixture_needs_fewer_samples_just_above_the_threshold() -> None:
    # p̂ 0.3 points above p0 = Φ(0.5 / 0.25): b = 0.1 alone has not rejected by n = 50,000, the mixture with b = 1
    # has; on unanimous samples it needs at most a few more than b = 0.1 alone (log 2 of evidence: 335 vs 311).
    p0, alpha = float(norm.cdf(2.0)), 0.001
    n = 50_000
    k = round((p0 + 0.003) * n)
    assert rejects(k, n, p0, alpha, DECISION_PRIORS) and not rejects(k, n, p0, alpha, priors=(0.1,))

    def unanimous_needs(priors: tuple[float, ...]) -> int:
        return next(m for m in range(1, 10_000) if rejects(m, m, p0, alpha, priors))

    assert unanimous_needs((0.1,)) <= unanimous_needs(DECISION_PRIORS) <= unanimous_needs((0.1,)) + 40
