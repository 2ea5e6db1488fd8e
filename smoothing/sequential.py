"""Sample-efficient certification: decide "certified at radius r?" and adaptive certificates.

Both procedures draw their estimation samples in growing stages (looks) n_1 < … < n_K ≤ n_max and
may stop after any look. ``bound`` picks how P(wrong certificate) ≤ α is kept under that data-dependent
stopping (``smoothing.looks``): ``"confseq"``, an anytime-valid confidence sequence checked after every
chunk (the default); ``"union"``, Clopper–Pearson at α/K over K doubling looks; ``"union_fine"``, the same
over ×1.25 looks.

Stopping early for any other reason ("not certified at r", or "more samples would not raise the
radius by more than the tolerance") returns no more than the bound of the look it stops at, so it
spends no level: it may only cost power. The radius test stops for futility when even an optimistic
projection (p_A at its upper confidence bound at ``futility_alpha``) could not reach the target by
n_max; the adaptive certificate stops when a milder projection (p_A at its upper bound at
``projection_alpha``) would raise the radius by at most the tolerance.

The procedures are written once, as generators in the protocol of ``smoothing.sampling``: they
yield ``SampleRequest``s and receive the class counts of those samples; ``run`` drives one with a
synchronous sampler (the library) and the service drives the same generator with its scheduler.

Radii are ℓ2 distances in the [0, 1] pixel space of the model's input, at its resolution.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch
from torch import nn

from smoothing.confseq import DECISION_PRIORS
from smoothing.looks import DEFAULT_BOUND, DEFAULT_CHECK_EVERY, DEFAULT_FIRST_LOOK, Bound, evidence
from smoothing.sampling import (
    ESTIMATION_STAGE,
    SELECTION_STAGE,
    Procedure,
    SampleRequest,
    model_sampler,
    new_seed,
    run,
)
from smoothing.statistics import certified_radius, probability_for_radius, upper_confidence_bound

DEFAULT_N_MAX = 100_000
# Stopping for futility spends no α (it only answers "not certified"), so its level trades samples for
# agreement with fixed n: simulated on the shipped models' p_A (python -m training.studies.futility_sim), 0.01
# gave 36x fewer samples than fixed n in the hardest cell (σ = 0.5, r = 0.25) where 0.001 gave 30x,
# with agreement 99.8-100 % in every cell either way; 0.05 gave more (56x) at 99.2 %. With the confidence
# sequence (issue 16; same simulation, prior b = 0.25, all six cells, 40 runs per image), levels 0.01 / 0.02 /
# 0.03 / 0.05 / 0.2 gave 85x / 90x / 98x / 104x / 170x fewer samples at a lowest cell agreement of 99.3 / 99.2 /
# 98.9 / 98.6 / 97.3 %: 0.01 stays, the largest level that keeps every cell at ≥ 99 % with a margin.
# With the decision's two-prior mixture (smoothing.confseq.DECISION_PRIORS) and n0 = 16 (python -m
# training.studies.n0_sim --repeats 120 --seed 2, BENCHMARKS.md; first check after 32 samples): futility 0.02 /
# 0.025 / 0.03 gave 98.3x / 101.1x / 106.6x fewer samples than fixed n together, lowest cell agreement 99.06 /
# 99.05 / 99.04 % (mean over the cells 99.58 / 99.55 / 99.51 %); with n0 = 100, 0.03 gave 100.5x at 99.14 %.
# The targets are 100x together and 99 % agreement: 0.03, where the samples have the most room.
DEFAULT_FUTILITY_ALPHA = 0.03
# The radius decision's default selection size: n0 is paid by every input, and an input on which every sample
# agrees needs only ~30-60 estimation samples at r/σ ≤ 2, so n0 = 100 set the floor of the easy cells; 16 picks
# the wrong class only on near-ties, which cost ~0.1-0.3 points of agreement in the simulation (n0_sim).
DEFAULT_DECISION_N0 = 16
DEFAULT_TOLERANCE = 0.02
# The adaptive certificate projects the radius n_max samples would give if p_A were at its (1 - 0.05)
# upper confidence bound: optimistic enough that an unlucky early look does not stop it, far less
# so than the radius test's futility projection (which must not lose agreement with fixed n).
DEFAULT_PROJECTION_ALPHA = 0.05
R = TypeVar("R")


@dataclass(frozen=True)
class RadiusDecision:
    """Answer to "is g(x) = c_A with certified radius ≥ r?".

    Guarantee: P(certified is True and g is not constant = label on the ℓ2 ball of radius r) ≤ α.
    """

    certified: bool
    label: int | None  # c_A when certified, else None
    radius: float  # the target radius r
    reason: Literal["certified", "not_certified", "infeasible"]
    top_class: int | None  # ĉA from the selection samples (None when infeasible)
    p_a_lower: float  # lower bound (of ``bound``) at the last look (0 when infeasible)
    samples: int  # selection + estimation samples spent
    looks: int  # looks taken
    max_certifiable_radius: float  # largest radius n_max samples could certify with ``bound``
    n0: int
    n_max: int
    alpha: float
    sigma: float
    selection_counts: tuple[int, ...] = ()  # class counts of the n0 selection samples
    estimation_counts: tuple[int, ...] = ()  # class counts of all estimation samples drawn
    bound: str = DEFAULT_BOUND


@dataclass(frozen=True)
class AdaptiveCertificate:
    """CERTIFY's largest-radius certificate, stopped once n_max samples could not add > tolerance.

    Guarantee: with probability ≥ 1 - α, it abstained (label None) or g(x + δ) = label for every
    ‖δ‖₂ < radius.
    """

    label: int | None
    radius: float
    p_a_lower: float  # lower bound (of ``bound``) at the last look
    top_class: int
    samples: int
    looks: int
    n0: int
    n_max: int
    alpha: float
    sigma: float
    tolerance: float
    selection_counts: tuple[int, ...] = ()
    estimation_counts: tuple[int, ...] = ()
    bound: str = DEFAULT_BOUND


def _projected_count(count_a: int, n: int, n_max: int, projection_alpha: float) -> int:
    """ĉA's count at n_max if p_A were at its (1 - projection_alpha) upper bound: a plausible best case."""
    return min(n_max, math.ceil(upper_confidence_bound(count_a, n, projection_alpha) * n_max))


def _as_tuple(counts: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(c) for c in counts.to(torch.long).cpu())


def _top_class(counts: torch.Tensor) -> int:
    return int(torch.argsort(-counts.to(torch.long).cpu(), stable=True)[0])


@dataclass(frozen=True)
class _Look:
    """The counts after look k: n estimation samples so far, ĉA = ``top`` from the selection samples."""

    k: int
    n: int
    top: int
    selection: torch.Tensor
    estimation: torch.Tensor

    @property
    def count_a(self) -> int:
        return int(self.estimation[self.top])


def _staged(n0: int, looks: tuple[int, ...], stop: Callable[[_Look], R | None]) -> Procedure[R]:
    """Selection from n0 samples, then estimation samples up to each look until ``stop`` returns a
    result (every stop rule must return one at the last look, n_max)."""
    selection = yield SampleRequest(SELECTION_STAGE, 0, n0)
    top = _top_class(selection)
    estimation, n = torch.zeros_like(selection, dtype=torch.long), 0
    for k, n_k in enumerate(looks, start=1):
        estimation, n = estimation + (yield SampleRequest(ESTIMATION_STAGE, n, n_k)), n_k
        result = stop(_Look(k, n, top, selection, estimation))
        if result is not None:
            return result
    raise AssertionError("unreachable: every stop rule stops at n_max")


def radius_test(
    *,
    radius: float,
    sigma: float,
    alpha: float,
    n0: int = DEFAULT_DECISION_N0,
    n_max: int = DEFAULT_N_MAX,
    first_look: int = DEFAULT_FIRST_LOOK,
    futility_alpha: float = DEFAULT_FUTILITY_ALPHA,
    bound: Bound = DEFAULT_BOUND,
    check_every: int = DEFAULT_CHECK_EVERY,
    looks: Sequence[int] | None = None,
) -> Procedure[RadiusDecision]:
    """Decide whether g(x) = ĉA with radius ≥ ``radius``: reject p_A ≤ Φ(r/σ) at level α.

    Selection: ĉA from n0 samples. Estimation: after each look of ``bound`` (module doc), certified as
    soon as the bound excludes p_A ≤ Φ(r/σ); not certified once even the optimistic projection to
    n_max cannot. When r exceeds what n_max samples can ever certify, answers "infeasible" without
    sampling. ``looks`` (cumulative estimation sizes ending at n_max) replaces the bound's schedule.
    """
    test = evidence(
        bound, alpha, n_max, first_look=first_look, check_every=check_every, looks=looks, priors=DECISION_PRIORS
    )
    threshold = max(0.5, probability_for_radius(radius, sigma))
    ceiling = certified_radius(test.lower(n_max, n_max), sigma)
    common = dict(
        radius=radius, max_certifiable_radius=ceiling, n0=n0, n_max=n_max, alpha=alpha, sigma=sigma, bound=bound
    )
    if radius >= ceiling or not test.rejects(n_max, n_max, threshold):
        return RadiusDecision(
            False, None, reason="infeasible", top_class=None, p_a_lower=0.0, samples=0, looks=0, **common
        )

    def stop(look: _Look) -> RadiusDecision | None:
        certified = test.rejects(look.count_a, look.n, threshold)
        if not (
            certified
            or look.n == n_max
            or not test.rejects(_projected_count(look.count_a, look.n, n_max, futility_alpha), n_max, threshold)
        ):
            return None
        return RadiusDecision(
            certified,
            look.top if certified else None,
            reason="certified" if certified else "not_certified",
            top_class=look.top,
            p_a_lower=test.lower(look.count_a, look.n),
            samples=n0 + look.n,
            looks=look.k,
            **common,
            selection_counts=_as_tuple(look.selection),
            estimation_counts=_as_tuple(look.estimation),
        )

    return (yield from _staged(n0, test.looks, stop))


def adaptive_certify(
    *,
    sigma: float,
    alpha: float,
    n0: int = 100,
    n_max: int = DEFAULT_N_MAX,
    tolerance: float = DEFAULT_TOLERANCE,
    first_look: int = DEFAULT_FIRST_LOOK,
    projection_alpha: float = DEFAULT_PROJECTION_ALPHA,
    bound: Bound = DEFAULT_BOUND,
    check_every: int = DEFAULT_CHECK_EVERY,
    looks: Sequence[int] | None = None,
) -> Procedure[AdaptiveCertificate]:
    """CERTIFY with an input-specific sample size.

    After each look the radius is σ·Φ⁻¹(p̲A) with p̲A the lower bound of ``bound``; sampling stops once
    n_max samples would raise it by at most ``tolerance`` (ℓ2) even if p_A were at its
    (1 - ``projection_alpha``) upper confidence bound, or at n_max. Abstains (label None, radius 0)
    when p̲A ≤ 1/2 at the stopping look. Inputs on which every sample agrees keep sampling to
    n_max: their radius grows with n until then.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    test = evidence(bound, alpha, n_max, first_look=first_look, check_every=check_every, looks=looks)

    def stop(look: _Look) -> AdaptiveCertificate | None:
        p_a_lower = test.lower(look.count_a, look.n)
        radius = certified_radius(p_a_lower, sigma)
        if look.n < n_max:
            best = test.lower(_projected_count(look.count_a, look.n, n_max, projection_alpha), n_max)
            if certified_radius(best, sigma) - radius > tolerance:
                return None
        return AdaptiveCertificate(
            label=look.top if p_a_lower > 0.5 else None,
            radius=radius,
            p_a_lower=p_a_lower,
            top_class=look.top,
            samples=n0 + look.n,
            looks=look.k,
            n0=n0,
            n_max=n_max,
            alpha=alpha,
            sigma=sigma,
            tolerance=tolerance,
            selection_counts=_as_tuple(look.selection),
            estimation_counts=_as_tuple(look.estimation),
            bound=bound,
        )

    return (yield from _staged(n0, test.looks, stop))


def certify_radius(
    model: nn.Module,
    x: torch.Tensor,
    *,
    radius: float,
    sigma: float,
    num_classes: int,
    alpha: float,
    batch_size: int,
    n0: int = DEFAULT_DECISION_N0,
    n_max: int = DEFAULT_N_MAX,
    seed: int | None = None,
    channels_last: bool = False,
    bound: Bound = DEFAULT_BOUND,
) -> RadiusDecision:
    """``radius_test`` on a model: is x certified at ``radius``? (x: (C, H, W) in [0, 1])."""
    seed = new_seed() if seed is None else seed
    sampler = model_sampler(
        model, x, sigma=sigma, num_classes=num_classes, batch_size=batch_size, seed=seed, channels_last=channels_last
    )
    return run(radius_test(radius=radius, sigma=sigma, alpha=alpha, n0=n0, n_max=n_max, bound=bound), sampler)


def certify_adaptive(
    model: nn.Module,
    x: torch.Tensor,
    *,
    sigma: float,
    num_classes: int,
    alpha: float,
    batch_size: int,
    n0: int = 100,
    n_max: int = DEFAULT_N_MAX,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int | None = None,
    channels_last: bool = False,
    bound: Bound = DEFAULT_BOUND,
) -> AdaptiveCertificate:
    """``adaptive_certify`` on a model (x: (C, H, W) in [0, 1])."""
    seed = new_seed() if seed is None else seed
    sampler = model_sampler(
        model, x, sigma=sigma, num_classes=num_classes, batch_size=batch_size, seed=seed, channels_last=channels_last
    )
    procedure = adaptive_certify(sigma=sigma, alpha=alpha, n0=n0, n_max=n_max, tolerance=tolerance, bound=bound)
    return run(procedure, sampler)
