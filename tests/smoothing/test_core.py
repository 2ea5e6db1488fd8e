"""PREDICT and CERTIFY against base classifiers whose smoothed behaviour is known exactly.

Coverage tests run many independent PREDICT/CERTIFY calls (fixed seeds, so they are
deterministic) and allow failures up to a binomial quantile: if each run fails with probability
at most α, the count exceeds ``allowed_failures`` with probability below FALSE_ALARM. Each
coverage test has a negative control on the same runs showing that a wrong bound or decision
(a one-sided bound at level 2α, the naive k/n, reused selection samples, no test at all) breaks
the same threshold, so the tests have the power to notice.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import beta, binom, norm
from torch import nn

from smoothing.core import Certificate, Prediction, certify, certify_from_counts, predict, predict_from_counts
from smoothing.sampling import ESTIMATION_STAGE, SELECTION_STAGE, sample_counts
from smoothing.statistics import two_sided_p_value

FALSE_ALARM = 1e-5
SHAPE = (1, 4, 4)
BIG_BATCH = 100_000


def allowed_failures(runs: int, rate: float) -> int:
    """Largest failure count that ``runs`` independent trials failing w.p. ≤ ``rate`` exceed only w.p. < FALSE_ALARM."""
    return int(binom.ppf(1 - FALSE_ALARM, runs, rate))


def one_sided_lower(k: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """Reference Clopper–Pearson lower bound straight from the Beta quantile (0 where k = 0)."""
    k = np.asarray(k)
    return np.where(k > 0, beta.ppf(alpha, np.maximum(k, 1), n - k + 1), 0.0)


def tight_probability(n: int, alpha: float, k: int) -> float:
    """A p just below the bound for k successes: there P(bound(K) > p) = P(K ≥ k) ≈ α, the worst case."""
    return float(one_sided_lower(np.array(k), n, alpha)) - 1e-9


class LinearClassifier(nn.Module):
    """f(x) = 1[wᵀx + b > 0], as logits (−z, z) with z = wᵀx + b. Its smoothed classifier is itself (App. B)."""

    def __init__(self, w: torch.Tensor, b: float) -> None:
        super().__init__()
        self.w = nn.Parameter(w.flatten().clone())
        self.b = nn.Parameter(torch.tensor(b))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.flatten(1) @ self.w + self.b  # (B,)
        return torch.stack([-z, z], dim=1)


def linear_problem(distance: float, side: int) -> tuple[LinearClassifier, torch.Tensor, int]:
    """A linear classifier and an input at ℓ2 ``distance`` from its boundary on class ``side`` (0 or 1)."""
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(SHAPE, generator=generator, dtype=torch.float64)
    x = torch.rand(SHAPE, generator=generator, dtype=torch.float64)
    sign = 1 if side == 1 else -1
    b = sign * distance * float(w.norm()) - float((w * x).sum())
    return LinearClassifier(w.float(), b), x.float(), side


class ThresholdClassifier(nn.Module):
    """Class 1 iff the first pixel exceeds ``threshold``: under noise P(class 1) = Φ((x₀ − threshold)/σ)."""

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.threshold = nn.Parameter(torch.tensor(threshold))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.flatten(1)[:, 0] - self.threshold
        return torch.stack([-z, z], dim=1)


def threshold_problem(p_class_1: float, sigma: float) -> tuple[ThresholdClassifier, torch.Tensor]:
    """A threshold classifier and a grey input x at which P(f(x + ε) = 1) = ``p_class_1`` under σ."""
    x = torch.full(SHAPE, 0.5)
    return ThresholdClassifier(0.5 - sigma * float(norm.ppf(p_class_1))), x


class ConstantClassifier(nn.Module):
    """Always the same class; no parameters."""

    def __init__(self, label: int, num_classes: int) -> None:
        super().__init__()
        self.label, self.num_classes = label, num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.one_hot(torch.full((x.shape[0],), self.label), self.num_classes).float()


class MustNotRun(nn.Module):
    """A model that fails the test if it is ever evaluated."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the model should not have been evaluated")


def certificate_is_wrong(cert: Certificate, true_label: int, true_radius: float) -> bool:
    """CERTIFY's guarantee fails: it certified a wrong class, or a radius beyond the true one."""
    return cert.label is not None and (cert.label != true_label or cert.radius > true_radius)


# ---------------------------------------------------------------------------------------------
# 1. Linear base classifier: certified radius vs the true distance |wᵀx + b| / ‖w‖.


@pytest.mark.parametrize("side", [0, 1])
def test_linear_radius_close_to_true_distance(side: int) -> None:
    sigma, distance, alpha, n = 0.5, 0.5, 0.001, 100_000
    model, x, label = linear_problem(distance, side)
    cert = certify(model, x, sigma=sigma, num_classes=2, n0=100, n=n, alpha=alpha, batch_size=BIG_BATCH, seed=1)
    assert cert.label == label
    assert cert.n == n and cert.n0 == 100
    assert cert.radius <= distance
    assert cert.radius >= 0.97 * distance
    # Analytic band: p̂ lies within 4 standard errors of p = Φ(d/σ), and p̲A ≈ p̂ − z_α·SE.
    p = norm.cdf(distance / sigma)
    se = math.sqrt(p * (1 - p) / n)
    z = norm.ppf(1 - alpha)
    assert sigma * norm.ppf(p - (z + 4) * se) <= cert.radius <= sigma * norm.ppf(p - (z - 4) * se)


def test_linear_mean_radius_matches_exact_expectation() -> None:
    # E[radius] = Σ_k Binom(k; n, p)·σΦ⁻¹(bound(k))·1[bound(k) > 1/2], p = Φ(d/σ); selection errors
    # (P < 1e-5 at n0 = 32) are negligible. A bound at level 2α (or α/2) shifts the mean by about
    # 0.44 (0.36) standard deviations of one radius, 9.8 (8.1) standard errors of the mean of 500.
    sigma, distance, alpha, n, n0, runs = 0.5, 0.5, 0.1, 1000, 32, 500
    model, x, label = linear_problem(distance, side=1)
    radii = np.array(
        [
            certify(model, x, sigma=sigma, num_classes=2, n0=n0, n=n, alpha=alpha, batch_size=BIG_BATCH, seed=s).radius
            for s in range(runs)
        ]
    )
    ks = np.arange(n + 1)
    bounds = one_sided_lower(ks, n, alpha)
    per_k = np.where(bounds > 0.5, sigma * norm.ppf(np.maximum(bounds, 0.5)), 0.0)
    pmf = binom.pmf(ks, n, norm.cdf(distance / sigma))
    mean = float((pmf * per_k).sum())
    sd = math.sqrt(float((pmf * (per_k - mean) ** 2).sum()))
    assert abs(radii.mean() - mean) <= 5 * sd / math.sqrt(runs)


def test_linear_coverage_radius_rarely_exceeds_true_distance() -> None:
    # d chosen so P(p̲A > p) ≈ α exactly (the worst case for this n), so a looser-than-claimed bound shows.
    sigma, alpha, n, n0, runs = 0.5, 0.1, 200, 32, 2000
    p = tight_probability(n, alpha, k=172)
    distance = sigma * float(norm.ppf(p))
    model, x, label = linear_problem(distance, side=1)
    certs = [
        certify(model, x, sigma=sigma, num_classes=2, n0=n0, n=n, alpha=alpha, batch_size=BIG_BATCH, seed=s)
        for s in range(runs)
    ]
    limit = allowed_failures(runs, alpha)
    assert sum(certificate_is_wrong(c, label, distance) for c in certs) <= limit
    assert all(c.radius < 1.5 * distance for c in certs)
    # Negative controls on the same samples: a one-sided bound at 2α, or the point estimate k/n.
    n_a = np.array([c.n_a for c in certs])
    chose_label = np.array([c.top_class == label for c in certs])
    assert int((chose_label & (one_sided_lower(n_a, n, 2 * alpha) > p)).sum()) > limit
    assert int((chose_label & (n_a / n > p)).sum()) > limit


# ---------------------------------------------------------------------------------------------
# 2. Constant base classifier: p̲A = α^(1/n) exactly.


@pytest.mark.parametrize(("n", "alpha", "sigma"), [(100, 0.001, 0.25), (1000, 0.01, 0.5), (10, 0.05, 1.0)])
def test_constant_classifier_radius_is_exact(n: int, alpha: float, sigma: float) -> None:
    model = ConstantClassifier(label=2, num_classes=3)
    x = torch.rand(SHAPE)
    cert = certify(model, x, sigma=sigma, num_classes=3, n0=10, n=n, alpha=alpha, batch_size=33, seed=5)
    assert cert.label == 2 and cert.top_class == 2
    assert cert.selection_counts == (0, 0, 10)
    assert cert.estimation_counts == (0, 0, n)
    assert cert.p_a_lower == pytest.approx(alpha ** (1 / n), rel=1e-12)
    assert cert.radius == pytest.approx(sigma * norm.ppf(alpha ** (1 / n)), rel=1e-9)


def test_constant_classifier_too_few_samples_abstains() -> None:
    # α^(1/n) = 0.1^(1/3) ≈ 0.464 ≤ 1/2: even unanimous samples cannot certify.
    cert = certify(
        ConstantClassifier(1, 2),
        torch.rand(SHAPE),
        sigma=0.5,
        num_classes=2,
        n0=3,
        n=3,
        alpha=0.1,
        batch_size=8,
        seed=0,
    )
    assert cert.abstained and cert.label is None and cert.radius == 0.0
    assert cert.top_class == 1 and cert.p_a_lower == pytest.approx(0.1 ** (1 / 3), rel=1e-12)


def test_constant_classifier_predict() -> None:
    pred = predict(
        ConstantClassifier(0, 4), torch.rand(SHAPE), sigma=1.0, num_classes=4, n=10, alpha=0.01, batch_size=4, seed=2
    )
    assert pred.label == 0 and pred.counts == (10, 0, 0, 0) and pred.n == 10
    assert pred.p_value == pytest.approx(2 / 1024, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# 3. Coverage with a known p: counts drawn directly (many runs) and through a real model.


@functools.cache
def predict_once(counts: tuple[int, ...], alpha: float) -> Prediction:
    """PREDICT from counts, memoised: the decision is a pure function of the counts, so runs cost one call per row."""
    return predict_from_counts(torch.tensor(counts), alpha=alpha, sigma=1.0)


def draw_counts(p: tuple[float, ...], n0: int, n: int, runs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Independent selection (runs, classes) and estimation (runs, classes) multinomial counts."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n0, p, size=runs), rng.multinomial(n, p, size=runs)


P_TIGHT = (tight_probability(200, 0.1, k=172), 0.1, 0.9 - tight_probability(200, 0.1, k=172))
P_TIE = (0.45, 0.45, 0.10)  # selection is a coin flip between two classes


@pytest.mark.parametrize("p", [P_TIGHT, P_TIE], ids=["tight", "tie"])
def test_certify_coverage_from_counts(p: tuple[float, ...]) -> None:
    alpha, n0, n, runs = 0.1, 16, 200, 3000
    selection, estimation = draw_counts(p, n0, n, runs, seed=1)
    violations = 0
    for sel, est in zip(selection, estimation, strict=True):
        cert = certify_from_counts(torch.from_numpy(sel), torch.from_numpy(est), alpha=alpha, sigma=1.0)
        assert sum(cert.selection_counts) == n0 and cert.n == n
        violations += cert.p_a_lower > p[cert.top_class]
    assert violations <= allowed_failures(runs, alpha)


def test_certify_coverage_control_loose_bounds_fail() -> None:
    # Same draws as the "tight" case: the harness flags a 2α bound and the naive estimate.
    alpha, n0, n, runs = 0.1, 16, 200, 3000
    selection, estimation = draw_counts(P_TIGHT, n0, n, runs, seed=1)
    top = selection.argmax(axis=1)
    n_a = estimation[np.arange(runs), top]
    p_top = np.array(P_TIGHT)[top]
    limit = allowed_failures(runs, alpha)
    assert int((one_sided_lower(n_a, n, 2 * alpha) > p_top).sum()) > limit
    assert int((n_a / n > p_top).sum()) > limit


def test_certify_coverage_control_reused_selection_samples_fail() -> None:
    # Choosing ĉA from the estimation samples themselves biases n_A upward when two classes tie.
    alpha, n, runs = 0.1, 200, 3000
    _, estimation = draw_counts(P_TIE, 16, n, runs, seed=1)
    violations = 0
    for est in estimation:
        cert = certify_from_counts(torch.from_numpy(est), torch.from_numpy(est), alpha=alpha, sigma=1.0)
        violations += cert.p_a_lower > P_TIE[cert.top_class]
    assert violations > allowed_failures(runs, alpha)


def test_certify_coverage_through_model_with_independent_streams() -> None:
    # p = 1/2 exactly and n0 = n = 119 (where P(bound > 1/2) ≈ 0.0996 ≈ α): any certificate is wrong.
    # Were selection and estimation the same samples, about 2α of runs would certify.
    alpha, n, runs = 0.1, 119, 2000
    model, x = threshold_problem(0.5, sigma=0.25)
    certs = [
        certify(model, x, sigma=0.25, num_classes=2, n0=n, n=n, alpha=alpha, batch_size=BIG_BATCH, seed=s)
        for s in range(runs)
    ]
    limit = allowed_failures(runs, alpha)
    assert sum(not c.abstained for c in certs) <= limit
    assert sum(c.selection_counts == c.estimation_counts for c in certs) < runs // 10
    # Control: deciding from the estimation counts alone (ĉA from them too) certifies too often.
    reused = [
        certify_from_counts(
            torch.tensor(c.estimation_counts), torch.tensor(c.estimation_counts), alpha=alpha, sigma=0.25
        )
        for c in certs
    ]
    assert sum(not c.abstained for c in reused) > limit


@pytest.mark.parametrize("p", [(0.505, 0.495), (0.4, 0.395, 0.205)], ids=["two", "three"])
def test_predict_coverage_from_counts(p: tuple[float, ...]) -> None:
    alpha, n, runs = 0.1, 1000, 3000
    _, counts = draw_counts(p, 1, n, runs, seed=2)
    wrong = 0
    for row in counts:
        pred = predict_once(tuple(row.tolist()), alpha)
        assert pred.n == n
        wrong += pred.label not in (None, 0)
    limit = allowed_failures(runs, alpha)
    assert wrong <= limit
    # Control: PREDICT without its test (plain argmax) returns the runner-up far more than α.
    assert int((counts.argmax(axis=1) != 0).sum()) > limit


def test_predict_coverage_through_model() -> None:
    alpha, sigma, n, runs = 0.1, 0.5, 500, 1000
    model, x = threshold_problem(0.505, sigma)  # g(x) = 1, barely
    preds = [
        predict(model, x, sigma=sigma, num_classes=2, n=n, alpha=alpha, batch_size=BIG_BATCH, seed=s)
        for s in range(runs)
    ]
    limit = allowed_failures(runs, alpha)
    assert sum(pred.label == 0 for pred in preds) <= limit
    assert sum(pred.label == 1 for pred in preds) > 0  # it does answer sometimes
    assert sum(pred.counts[0] >= pred.counts[1] for pred in preds) > limit  # control: plain argmax


# ---------------------------------------------------------------------------------------------
# 4. PREDICT abstains on a 50/50 base classifier.


@pytest.mark.parametrize("p", [(0.5, 0.5), (0.4, 0.4, 0.2)], ids=["two", "three"])
def test_predict_abstains_on_even_split_from_counts(p: tuple[float, ...]) -> None:
    alpha, n, runs = 0.1, 200, 3000
    _, counts = draw_counts(p, 1, n, runs, seed=3)
    answered = sum(not predict_once(tuple(row.tolist()), alpha).abstained for row in counts)
    limit = allowed_failures(runs, alpha)
    assert answered <= limit  # abstention rate ≥ 1 − α − slack
    # Control: the same test run at level 3α answers too often.
    assert sum(predict_once(tuple(row.tolist()), alpha).p_value <= 3 * alpha for row in counts) > limit


def test_predict_abstains_on_even_split_through_model() -> None:
    alpha, sigma, n, runs = 0.1, 0.25, 100, 1000
    model, x = threshold_problem(0.5, sigma)
    answered = sum(
        not predict(model, x, sigma=sigma, num_classes=2, n=n, alpha=alpha, batch_size=BIG_BATCH, seed=s).abstained
        for s in range(runs)
    )
    assert answered <= allowed_failures(runs, alpha)


# ---------------------------------------------------------------------------------------------
# 5. Counts add up, streams are the documented ones, seeds reproduce.


@pytest.mark.parametrize("batch_size", [1, 7, 32, 33, 1000])
@pytest.mark.parametrize(("n0", "n"), [(1, 31), (32, 33), (257, 1)])
def test_certify_counts_sum_to_samples_asked_for(batch_size: int, n0: int, n: int) -> None:
    model, x = threshold_problem(0.7, sigma=0.5)
    cert = certify(model, x, sigma=0.5, num_classes=2, n0=n0, n=n, alpha=0.01, batch_size=batch_size, seed=4)
    assert (cert.n0, cert.n) == (n0, n)
    assert sum(cert.selection_counts) == n0 and sum(cert.estimation_counts) == n
    assert cert == certify(model, x, sigma=0.5, num_classes=2, n0=n0, n=n, alpha=0.01, batch_size=64, seed=4)
    pred = predict(model, x, sigma=0.5, num_classes=2, n=n, alpha=0.01, batch_size=batch_size, seed=4)
    assert pred.n == n and sum(pred.counts) == n


def test_certify_and_predict_draw_from_the_documented_streams() -> None:
    model, x = threshold_problem(0.6, sigma=0.5)
    common = dict(sigma=0.5, num_classes=2, batch_size=50, seed=77)
    cert = certify(model, x, n0=100, n=300, alpha=0.01, **common)
    assert cert.selection_counts == tuple(sample_counts(model, x, 100, stage=SELECTION_STAGE, **common).tolist())
    assert cert.estimation_counts == tuple(sample_counts(model, x, 300, stage=ESTIMATION_STAGE, **common).tolist())
    pred = predict(model, x, n=300, alpha=0.01, **common)
    assert pred.counts == cert.estimation_counts and pred.seed == 77


def test_missing_seed_is_drawn_and_reproduces() -> None:
    model, x = threshold_problem(0.6, sigma=0.5)
    cert = certify(model, x, sigma=0.5, num_classes=2, n0=50, n=500, alpha=0.01, batch_size=64)
    assert isinstance(cert.seed, int)
    assert cert == certify(model, x, sigma=0.5, num_classes=2, n0=50, n=500, alpha=0.01, batch_size=500, seed=cert.seed)
    pred = predict(model, x, sigma=0.5, num_classes=2, n=500, alpha=0.01, batch_size=64)
    assert isinstance(pred.seed, int) and pred.seed != cert.seed


# ---------------------------------------------------------------------------------------------
# Decisions from hand-made counts.


def test_predict_from_counts_hand_values() -> None:
    pred = predict_from_counts(torch.tensor([0, 9, 1]), alpha=0.05, sigma=0.5, seed=3)
    assert pred.label == 1 and pred.p_value == pytest.approx(2 * 11 / 1024, rel=1e-12)
    assert (pred.counts, pred.n, pred.alpha, pred.sigma, pred.seed) == ((0, 9, 1), 10, 0.05, 0.5, 3)
    assert predict_from_counts(torch.tensor([0, 9, 1]), alpha=0.01, sigma=0.5).abstained
    # Only the top two counts enter the test: a third class changes nothing.
    assert predict_from_counts(torch.tensor([50, 9, 1]), alpha=0.05, sigma=0.5).p_value == pytest.approx(
        two_sided_p_value(50, 9), rel=1e-12
    )
    single = predict_from_counts(torch.tensor([7]), alpha=0.05, sigma=0.5)
    assert single.label == 0 and single.p_value == pytest.approx(2 / 128, rel=1e-12)


@pytest.mark.parametrize("counts", [[0, 40, 40], [40, 40, 0], [40, 0, 40], [20, 20]])
def test_predict_from_counts_tie_at_top_abstains(counts: list[int]) -> None:
    pred = predict_from_counts(torch.tensor(counts), alpha=0.25, sigma=0.5)
    assert pred.abstained and pred.p_value == 1.0


@pytest.mark.parametrize(("counts", "label"), [([100, 3, 3], 0), ([3, 100, 3], 1), ([3, 3, 100], 2)])
def test_predict_from_counts_runner_up_tie_keeps_winner(counts: list[int], label: int) -> None:
    pred = predict_from_counts(torch.tensor(counts), alpha=0.01, sigma=0.5)
    assert pred.label == label and pred.p_value == pytest.approx(two_sided_p_value(100, 3), rel=1e-12)


@pytest.mark.parametrize(("selection", "top"), [([0, 5, 5], 1), ([5, 0, 5], 0), ([2, 2], 0), ([0, 0, 1], 2)])
def test_certify_from_counts_tie_breaks_to_lower_index(selection: list[int], top: int) -> None:
    estimation = torch.tensor([1000] * len(selection))
    cert = certify_from_counts(torch.tensor(selection), estimation, alpha=0.01, sigma=0.5)
    assert cert.top_class == top


def test_certify_from_counts_class_comes_from_selection_only() -> None:
    cert = certify_from_counts(torch.tensor([1, 9]), torch.tensor([90, 10]), alpha=0.01, sigma=0.5)
    assert cert.top_class == 1 and cert.n_a == 10
    assert cert.p_a_lower == pytest.approx(beta.ppf(0.01, 10, 91), rel=1e-9)
    assert cert.abstained and cert.label is None and cert.radius == 0.0


def test_certify_from_counts_hand_values() -> None:
    cert = certify_from_counts(torch.tensor([0, 10, 0]), torch.tensor([5, 990, 5]), alpha=0.001, sigma=0.25, seed=9)
    p_a_lower = beta.ppf(0.001, 990, 11)
    assert cert.label == 1 and cert.n_a == 990
    assert cert.p_a_lower == pytest.approx(p_a_lower, rel=1e-9)
    assert cert.radius == pytest.approx(0.25 * norm.ppf(p_a_lower), rel=1e-9)
    assert (cert.n0, cert.n, cert.alpha, cert.sigma, cert.seed) == (10, 1000, 0.001, 0.25, 9)
    assert (cert.selection_counts, cert.estimation_counts) == ((0, 10, 0), (5, 990, 5))


def test_certify_from_counts_abstains_at_or_below_half() -> None:
    # At α = 0.1 and n = 100, 56 successes give p̲A ≈ 0.4909 (abstain) and 57 give ≈ 0.5010 (certify).
    cert = certify_from_counts(torch.tensor([0, 3]), torch.tensor([44, 56]), alpha=0.1, sigma=0.5)
    assert cert.p_a_lower == pytest.approx(0.4909472780913809, rel=1e-9)
    assert cert.abstained and cert.label is None and cert.radius == 0.0
    cert = certify_from_counts(torch.tensor([0, 3]), torch.tensor([43, 57]), alpha=0.1, sigma=0.5)
    assert cert.p_a_lower == pytest.approx(0.5009583287031432, rel=1e-9)
    assert cert.label == 1 and cert.radius == pytest.approx(0.5 * norm.ppf(0.5009583287031432), rel=1e-9)


# ---------------------------------------------------------------------------------------------
# α validation: before any sampling.


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, -0.1, math.nan])
def test_alpha_outside_open_interval_is_rejected(alpha: float) -> None:
    counts = torch.tensor([10, 0])
    with pytest.raises(ValueError, match="alpha"):
        predict_from_counts(counts, alpha=alpha, sigma=0.5)
    with pytest.raises(ValueError, match="alpha"):
        certify_from_counts(counts, counts, alpha=alpha, sigma=0.5)
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="alpha"):
        predict(MustNotRun(), x, sigma=0.5, num_classes=2, n=10, alpha=alpha, batch_size=10)
    with pytest.raises(ValueError, match="alpha"):
        certify(MustNotRun(), x, sigma=0.5, num_classes=2, n0=10, n=10, alpha=alpha, batch_size=10)


@pytest.mark.parametrize("alpha", [1e-12, 0.4999])
def test_alpha_inside_open_interval_is_accepted(alpha: float) -> None:
    assert predict_from_counts(torch.tensor([10, 0]), alpha=alpha, sigma=0.5).alpha == alpha
    assert certify_from_counts(torch.tensor([1, 0]), torch.tensor([10, 0]), alpha=alpha, sigma=0.5).alpha == alpha


# ---------------------------------------------------------------------------------------------
# The same properties at scale and at smaller α (slow, except the memoised PREDICT one).


@pytest.mark.slow
@pytest.mark.parametrize(("sigma", "distance"), [(0.25, 0.3), (0.5, 1.0), (1.0, 0.5)])
def test_linear_radius_within_one_percent_at_a_million_samples(sigma: float, distance: float) -> None:
    """The certified radius approaches the true distance from below, as close as n = 10⁶ samples allow.

    With p_A = Φ(d/σ) and se = √(p_A(1-p_A)/n), the bound lies below p_A by z_α·se plus the
    sampling error: a radius below σ·Φ⁻¹(p_A - (z_α + 4.5)·se) happens with probability < 4e-6 for an
    honest sampler (and fails for noise whose projection is off by a few standard errors). At
    σ = 0.25 and 0.5 that is within 1 % of d; at σ = 1, d = 0.5 within 2 %.
    """
    model, x, label = linear_problem(distance, side=0)
    n, alpha = 1_000_000, 0.001
    cert = certify(model, x, sigma=sigma, num_classes=2, n0=100, n=n, alpha=alpha, batch_size=BIG_BATCH, seed=3)
    p_a = norm.cdf(distance / sigma)
    se = math.sqrt(p_a * (1 - p_a) / n)
    assert cert.label == label
    assert sigma * norm.ppf(p_a - (norm.ppf(1 - alpha) + 4.5) * se) <= cert.radius <= distance


@pytest.mark.slow
def test_linear_coverage_at_small_alpha() -> None:
    sigma, alpha, n, n0, runs = 0.5, 0.01, 1000, 32, 20_000
    p = tight_probability(n, alpha, k=900)
    distance = sigma * float(norm.ppf(p))
    model, x, label = linear_problem(distance, side=0)
    certs = [
        certify(model, x, sigma=sigma, num_classes=2, n0=n0, n=n, alpha=alpha, batch_size=BIG_BATCH, seed=s)
        for s in range(runs)
    ]
    limit = allowed_failures(runs, alpha)
    assert sum(certificate_is_wrong(c, label, distance) for c in certs) <= limit
    n_a = np.array([c.n_a for c in certs])
    chose_label = np.array([c.top_class == label for c in certs])
    assert int((chose_label & (one_sided_lower(n_a, n, 2 * alpha) > p)).sum()) > limit


P_TIGHT_SLOW = (tight_probability(200, 0.05, k=165), 0.2, 0.8 - tight_probability(200, 0.05, k=165))


@pytest.mark.slow
@pytest.mark.parametrize("p", [P_TIGHT_SLOW, P_TIE], ids=["tight", "tie"])
def test_certify_coverage_from_counts_many_runs(p: tuple[float, ...]) -> None:
    alpha, n0, n, runs = 0.05, 16, 200, 40_000
    selection, estimation = draw_counts(p, n0, n, runs, seed=11)
    violations = sum(
        certify_from_counts(torch.from_numpy(sel), torch.from_numpy(est), alpha=alpha, sigma=1.0).p_a_lower
        > p[int(np.argmax(sel))]
        for sel, est in zip(selection, estimation, strict=True)
    )
    limit = allowed_failures(runs, alpha)
    assert violations <= limit
    # Control: on the same draws a bound at level 2α fails.
    top = selection.argmax(axis=1)
    loose = one_sided_lower(estimation[np.arange(runs), top], n, 2 * alpha)
    assert int((loose > np.array(p)[top]).sum()) > limit


def test_predict_abstains_on_even_split_many_runs() -> None:
    # Memoised PREDICT makes 40,000 runs cheap: only a few hundred distinct count rows occur.
    alpha, n, runs = 0.01, 1000, 40_000
    _, counts = draw_counts((0.5, 0.5), 1, n, runs, seed=12)
    answered = sum(not predict_once(tuple(row.tolist()), alpha).abstained for row in counts)
    assert answered <= allowed_failures(runs, alpha)
