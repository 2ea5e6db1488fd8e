"""Error control of the sequential procedures under data-dependent stopping.

Counts are drawn from exact binomials (the base classifier's only observable), so thousands of
independent runs take seconds. Slack: the allowed number of wrong answers is the (1 - 1e-4)
binomial quantile at rate α, so a correct procedure fails a test with probability ≤ 1e-4.
"""

import numpy as np
import pytest
import torch
from scipy.stats import binom, norm

from smoothing import confseq
from smoothing.looks import BOUNDS, chunk_schedule, evidence, look_schedule, max_certifiable_radius
from smoothing.sequential import (
    DEFAULT_DECISION_N0,
    SampleRequest,
    adaptive_certify,
    certify_adaptive,
    certify_radius,
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


def test_chunk_schedule_doubles_then_steps_then_grows_by_a_sixteenth() -> None:
    chunks = chunk_schedule(100_000)
    assert chunks[:5] == (32, 64, 128, 256, 384) and chunks[-1] == 100_000
    sizes, steps = np.array(chunks[:-1]), np.diff(chunks)
    assert np.all(steps[2:-1] >= 128) and np.all(steps[:-1] <= np.maximum(128, sizes[:-1] / 16 + 1))
    assert len(chunks) < 100  # trips through the scheduler per request
    assert chunk_schedule(50) == (32, 50)


def test_bounds_reject_bad_arguments() -> None:
    with pytest.raises(ValueError):
        evidence("bonferroni", 0.01, 1000)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        evidence("confseq", 0.01, 1000, looks=(10, 5, 1000))
    with pytest.raises(ValueError):
        evidence("confseq", 0.01, 1000, looks=(10, 500))  # must end at n_max


def random_looks(rng: np.random.Generator, n_max: int, largest_chunk: int = 256) -> tuple[int, ...]:
    """Cumulative sizes of chunks of random size 1..largest_chunk, ending at n_max: a scheduler's arbitrary chunking."""
    sizes = np.cumsum(rng.integers(1, largest_chunk + 1, size=2 * n_max // largest_chunk + 10))
    return (*(int(n) for n in sizes[sizes < n_max]), n_max)


def rejection_thresholds(looks: tuple[int, ...], rejected) -> dict[int, int]:
    """Smallest k rejected at each look n (rejection is monotone in k); n + 1 when none is."""
    thresholds = {}
    for n in looks:
        low, high = 0, n + 1
        while low < high:
            mid = (low + high) // 2
            if mid <= n and rejected(mid, n):
                high = mid
            else:
                low = mid + 1
        thresholds[n] = low
    return thresholds


def exact_false_rejection(p: float, looks: tuple[int, ...], rejected) -> float:
    """P_p(rejected at some look), k_n ~ Binomial(n, p), exactly: the count's distribution is carried from
    sample to sample and the rejected paths are removed at each look."""
    thresholds = rejection_thresholds(looks, rejected)
    alive = np.zeros(looks[-1] + 1)
    alive[0] = 1.0
    for n in range(1, looks[-1] + 1):
        alive[1 : n + 1] = alive[1 : n + 1] * (1 - p) + alive[:n] * p
        alive[0] *= 1 - p
        if n in thresholds:
            alive[thresholds[n] :] = 0.0
    return float(1.0 - alive.sum())


EXACT_N_MAX, EXACT_ALPHA, EXACT_P0 = 3_000, 0.05, 0.8


@pytest.mark.parametrize(
    ("bound", "every_sample"), [("confseq", False), ("confseq", True), ("union", False), ("union_fine", False)]
)
def test_exact_error_of_each_bound_at_the_worst_case_is_at_most_alpha(bound: str, every_sample: bool) -> None:
    # p_A = p0 exactly: every rejection is a false certificate. The stopping rules only stop sooner, so this is
    # the error of the radius test with futility switched off; the confidence sequence even when asked after
    # every single sample.
    looks = tuple(range(1, EXACT_N_MAX + 1)) if every_sample else None
    test = evidence(bound, EXACT_ALPHA, EXACT_N_MAX, looks=looks)
    error = exact_false_rejection(EXACT_P0, test.looks, lambda k, n: test.rejects(k, n, EXACT_P0))
    assert 0.0 < error <= EXACT_ALPHA


@pytest.mark.parametrize("looks", [tuple(range(1, EXACT_N_MAX + 1)), look_schedule(EXACT_N_MAX)])
def test_exact_error_without_the_correction_exceeds_alpha(looks: tuple[int, ...]) -> None:
    # Negative control: Clopper–Pearson at level α (no α/K, no mixture) at every look is wrong well over α of the
    # time, so the computation above can tell a corrected bound from an uncorrected one.
    uncorrected = evidence("union", EXACT_ALPHA, EXACT_N_MAX, looks=(EXACT_N_MAX,))
    error = exact_false_rejection(EXACT_P0, looks, lambda k, n: uncorrected.rejects(k, n, EXACT_P0))
    assert error > 2 * EXACT_ALPHA


COVERAGE_RUNS, COVERAGE_ALPHA, COVERAGE_N_MAX, COVERAGE_RADIUS = 2000, 0.05, 5_000, 0.3


@pytest.mark.slow
@pytest.mark.parametrize("bound", BOUNDS)
def test_radius_test_false_certifications_at_worst_case(bound: str) -> None:
    # p_A exactly at Φ(r/σ), the worst case (the bounds are supermartingales for every p_A below): every
    # "certified" answer is wrong. Chunks of random size, a new
    # chunking per run; futility almost never stops, so each run asks the bound after every chunk to n_max.
    rng = np.random.default_rng(1)
    p_a = float(norm.cdf(COVERAGE_RADIUS / SIGMA))
    wrong = 0
    for _ in range(COVERAGE_RUNS):
        procedure = radius_test(
            radius=COVERAGE_RADIUS,
            sigma=SIGMA,
            alpha=COVERAGE_ALPHA,
            n0=10,
            n_max=COVERAGE_N_MAX,
            futility_alpha=1e-9,
            bound=bound,
            looks=random_looks(rng, COVERAGE_N_MAX),
        )
        wrong += run(procedure, binomial_sampler(p_a, rng)).certified
    assert wrong <= allowed_failures(COVERAGE_RUNS, COVERAGE_ALPHA)


def test_uncorrected_bound_fails_the_same_check() -> None:
    # Negative control of the test above: Clopper–Pearson at level α (not α/K, not the mixture) after every chunk
    # of random size inflates the error beyond α, so that check has the power to catch a missing correction.
    rng = np.random.default_rng(2)
    threshold = float(norm.cdf(COVERAGE_RADIUS / SIGMA))
    wrong = 0
    for _ in range(COVERAGE_RUNS):
        count, n = 0, 0
        for n_k in random_looks(rng, COVERAGE_N_MAX):
            count += int(rng.binomial(n_k - n, threshold))
            n = n_k
            if lower_confidence_bound(count, n, COVERAGE_ALPHA) > threshold:
                wrong += 1
                break
    assert wrong > allowed_failures(COVERAGE_RUNS, COVERAGE_ALPHA)


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


@pytest.mark.parametrize("bound", BOUNDS)
def test_infeasible_radius_is_answered_without_samples(bound: str) -> None:
    # The radius decision's ceiling comes from its own test (the confidence sequence with the decision's priors).
    ceiling = max_certifiable_radius(100_000, 0.001, SIGMA, bound, priors=confseq.DECISION_PRIORS)
    if bound == "union":
        assert ceiling == pytest.approx(SIGMA * norm.ppf((0.001 / 11) ** (1 / 100_000)))
    # Fixed n's ceiling σ·Φ⁻¹(α^(1/n)) is an upper limit for every bound.
    assert 0 < ceiling < SIGMA * norm.ppf(0.001 ** (1 / 100_000))
    procedure = radius_test(radius=ceiling + 0.01, sigma=SIGMA, alpha=0.001, bound=bound)
    decision = run(procedure, lambda request: pytest.fail("no sample may be drawn"))
    assert decision.reason == "infeasible" and decision.samples == 0 and not decision.certified
    assert decision.max_certifiable_radius == pytest.approx(ceiling) and decision.bound == bound


def test_confidence_sequence_certifies_the_largest_radius_within_0_01_of_fixed_n() -> None:
    fixed = 0.25 * norm.ppf(0.001 ** (1 / 100_000))
    assert fixed - max_certifiable_radius(100_000, 0.001, 0.25, "confseq") < 0.01
    assert fixed - max_certifiable_radius(100_000, 0.001, 0.25, "union") > 0.015


@pytest.mark.slow
@pytest.mark.parametrize("bound", BOUNDS)
@pytest.mark.parametrize("p_a", [0.8, 0.99])
def test_adaptive_radius_exceeds_the_truth_at_most_alpha_often(bound: str, p_a: float) -> None:
    rng = np.random.default_rng(5)
    true_radius = SIGMA * norm.ppf(p_a)
    over = 0
    for _ in range(COVERAGE_RUNS):
        procedure = adaptive_certify(
            sigma=SIGMA,
            alpha=COVERAGE_ALPHA,
            n0=10,
            n_max=COVERAGE_N_MAX,
            tolerance=0.0,  # never stops early: the bound is asked after every chunk up to n_max
            bound=bound,
            looks=random_looks(rng, COVERAGE_N_MAX, largest_chunk=512),
        )
        over += run(procedure, binomial_sampler(p_a, rng)).radius > true_radius
    assert over <= allowed_failures(COVERAGE_RUNS, COVERAGE_ALPHA)


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
    common = dict(sigma=SIGMA, num_classes=3, alpha=0.001, batch_size=64, seed=0)
    # All samples agree, so p̲A = (α/K)^(1/n) with K = 11 looks: below Φ(2) = 0.97725 at 100, 200 and 400
    # samples (0.9768 at 400), above at 800.
    decision = certify_radius(model, x, radius=1.0, bound="union", n0=100, **common)
    assert decision.certified and decision.label == 2 and decision.samples == 100 + 800 and decision.looks == 4
    # The confidence sequence, asked after every chunk (32, 64, 128, 256, 384, …), certifies at the first chunk
    # whose mixture (the decision's two priors) exceeds 1/α; n0 is the decision's default.
    decision = certify_radius(model, x, radius=1.0, bound="confseq", **common)
    threshold = float(norm.cdf(2.0))
    first = next(n for n in chunk_schedule(100_000) if confseq.rejects(n, n, threshold, 0.001, confseq.DECISION_PRIORS))
    assert decision.certified and decision.label == 2 and decision.samples == DEFAULT_DECISION_N0 + first < 100 + 800
    for bound in BOUNDS:
        adaptive = certify_adaptive(model, x, n_max=1000, tolerance=0.0, bound=bound, **common)
        # All samples agree: the radius is the n_max ceiling of the bound, reached at the last look.
        assert adaptive.samples == 100 + 1000
        assert adaptive.radius == pytest.approx(max_certifiable_radius(1000, 0.001, SIGMA, bound))
