"""Error control of the sequential procedures under data-dependent stopping.

Counts are drawn from exact binomials (the base classifier's only observable), so thousands of
independent runs take seconds. Slack: the allowed number of wrong answers is the (1 - 1e-4)
binomial quantile at rate α, so a correct procedure fails a test with probability ≤ 1e-4.
"""

import numpy as np
import pytest
import torch
from scipy.stats import binom, norm

from smoothing.sequential import (
    SampleRequest,
    adaptive_certify,
    certify_adaptive,
    certify_radius,
    look_schedule,
    max_certifiable_radius,
    radius_test,
    run,
)
from smoothing.statistics import lower_confidence_bound

SIGMA = 0.5


def binomial_sampler(p_a: float, rng: np.random.Generator):
    """Class 0 with probability p_a, else class 1, independently per sample."""

    def sample(request: SampleRequest) -> torch.Tensor:
        size = request.stop - request.start
        hits = int(rng.binomial(size, p_a))
        return torch.tensor([hits, size - hits])

    return sample


def allowed_failures(runs: int, alpha: float) -> int:
    return int(binom.ppf(1 - 1e-4, runs, alpha))


def test_look_schedule_is_geometric_and_ends_at_n_max() -> None:
    assert look_schedule(100_000) == (100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 51200, 100000)
    assert look_schedule(100_000, growth=10**0.5) == (100, 316, 1000, 3162, 10000, 31623, 100000)
    assert look_schedule(50) == (50,)
    with pytest.raises(ValueError):
        look_schedule(0)


def false_certification_rate(p_a: float, radius: float, alpha: float, runs: int, n_max: int) -> int:
    rng = np.random.default_rng(1)
    wrong = 0
    for _ in range(runs):
        decision = run(
            radius_test(radius=radius, sigma=SIGMA, alpha=alpha, n0=10, n_max=n_max), binomial_sampler(p_a, rng)
        )
        wrong += decision.certified
    return wrong


@pytest.mark.slow
@pytest.mark.parametrize("shift", [0.0, -0.002])
def test_radius_test_false_certifications_at_worst_case(shift: float) -> None:
    # p_A exactly at (and just below) Φ(r/σ): every "certified" answer is wrong.
    alpha, runs, radius = 0.05, 2000, 0.3
    p_a = float(norm.cdf(radius / SIGMA)) + shift
    wrong = false_certification_rate(p_a, radius, alpha, runs, n_max=10_000)
    assert wrong <= allowed_failures(runs, alpha)


def test_naive_repeated_looks_would_fail_the_same_check() -> None:
    # Negative control: testing at level α (not α/K) at every look inflates the error beyond α,
    # so the check above has the power to catch a missing union bound.
    alpha, runs, radius = 0.05, 2000, 0.3
    threshold = float(norm.cdf(radius / SIGMA))
    rng = np.random.default_rng(2)
    wrong = 0
    for _ in range(runs):
        count, n = 0, 0
        for n_k in look_schedule(10_000):
            count += int(rng.binomial(n_k - n, threshold))
            n = n_k
            if lower_confidence_bound(count, n, alpha) > threshold:
                wrong += 1
                break
    assert wrong > allowed_failures(runs, alpha)


def test_radius_test_spends_few_samples_when_p_a_is_well_above_threshold() -> None:
    rng = np.random.default_rng(3)
    decisions = [
        run(radius_test(radius=0.25, sigma=SIGMA, alpha=0.001), binomial_sampler(0.99, rng)) for _ in range(200)
    ]
    assert all(d.certified and d.label == 0 for d in decisions)
    assert np.mean([d.samples for d in decisions]) < 100_000 / 50


def test_radius_test_stops_early_for_futility_without_certifying() -> None:
    rng = np.random.default_rng(4)
    decisions = [run(radius_test(radius=1.0, sigma=SIGMA, alpha=0.001), binomial_sampler(0.8, rng)) for _ in range(100)]
    assert not any(d.certified for d in decisions)
    assert all(d.reason == "not_certified" for d in decisions)
    assert np.mean([d.samples for d in decisions]) < 5_000


def test_infeasible_radius_is_answered_without_samples() -> None:
    looks = len(look_schedule(100_000))
    ceiling = max_certifiable_radius(100_000, 0.001 / looks, SIGMA)
    assert ceiling == pytest.approx(SIGMA * norm.ppf((0.001 / looks) ** (1 / 100_000)))
    procedure = radius_test(radius=ceiling + 0.01, sigma=SIGMA, alpha=0.001)
    decision = run(procedure, lambda request: pytest.fail("no sample may be drawn"))
    assert decision.reason == "infeasible" and decision.samples == 0 and not decision.certified
    assert decision.max_certifiable_radius == pytest.approx(ceiling)


@pytest.mark.slow
def test_adaptive_radius_exceeds_the_truth_at_most_alpha_often() -> None:
    alpha, runs = 0.05, 2000
    rng = np.random.default_rng(5)
    p_a = 0.8
    true_radius = SIGMA * norm.ppf(p_a)
    over = 0
    for _ in range(runs):
        certificate = run(adaptive_certify(sigma=SIGMA, alpha=alpha, n0=10, n_max=10_000), binomial_sampler(p_a, rng))
        over += certificate.radius > true_radius
    assert over <= allowed_failures(runs, alpha)


def test_adaptive_stops_early_when_more_samples_cannot_help_much() -> None:
    rng = np.random.default_rng(6)
    certificates = [
        run(adaptive_certify(sigma=SIGMA, alpha=0.001, tolerance=0.05), binomial_sampler(0.7, rng)) for _ in range(50)
    ]
    assert np.mean([c.samples for c in certificates]) < 100_000 / 2
    assert all(c.label == 0 and 0 < c.radius < SIGMA * norm.ppf(0.7) for c in certificates)


class ConstantClassifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], 3)
        logits[:, 2] = 1.0
        return logits


def test_library_wrappers_sample_through_a_model_and_count_samples() -> None:
    model = ConstantClassifier()
    x = torch.zeros(1, 2, 2)
    # All samples agree, so p̲A = (α/K)^(1/n) with K = 11 looks: below Φ(2) = 0.97725 at 100, 200 and 400
    # samples (0.9768 at 400), above at 800.
    decision = certify_radius(model, x, radius=1.0, sigma=SIGMA, num_classes=3, alpha=0.001, batch_size=64, seed=0)
    assert decision.certified and decision.label == 2 and decision.samples == 100 + 800 and decision.looks == 4
    adaptive = certify_adaptive(model, x, sigma=SIGMA, num_classes=3, alpha=0.001, batch_size=64, n_max=1000, seed=0)
    # All samples agree: the radius is the n_max ceiling at level α/K, reached at the last look.
    assert adaptive.samples == 100 + 1000
    assert adaptive.radius == pytest.approx(max_certifiable_radius(1000, 0.001 / len(look_schedule(1000)), SIGMA))
