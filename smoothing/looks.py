"""How the sequential procedures bound p_A under data-dependent stopping: the bounds and their look schedules.

- ``"confseq"``: the anytime-valid mixture confidence sequence of ``smoothing.confseq``, valid at every n
  simultaneously (Ville's inequality), so it is checked after every chunk (``chunk_schedule``).
- ``"union"``: a union bound over doubling looks 100, 200, 400, …, n_max: at each look the one-sided
  Clopper–Pearson bound at level α/K. Whatever rule picks the look at which we stop, a wrong answer needs one
  of the K bounds to be wrong, each with probability ≤ α/K (Horváth et al., ICLR 2022 split the level across
  stages the same way).
- ``"union_fine"``: the same with looks growing ×1.25 (K = 32 to 100,000): less overshoot, smaller α/K.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from smoothing import confseq
from smoothing.statistics import certified_radius, check_alpha, lower_confidence_bound

Bound = Literal["confseq", "union", "union_fine"]
BOUNDS: tuple[str, ...] = get_args(Bound)
# Chosen by python -m training.studies.bound_sim on the reference images' p_A (BENCHMARKS.md, issue 16): more
# decisions per sample than either union bound, and the only one whose largest radius at n_max is within 0.01
# of fixed n's.
DEFAULT_BOUND: Bound = "confseq"
DEFAULT_FIRST_LOOK = 100
# Doubling: a test stops at most 2x past the sample size it needed; a simulation on the shipped models'
# p_A values gave 66x fewer samples than fixed n = 100,000 with doubling, 52x with growth sqrt(10),
# whose fewer looks (7 instead of 11) buy only a slightly larger α/K.
DEFAULT_GROWTH = 2.0
FINE_GROWTH = 1.25
# The confidence sequence is checked after chunks that double from FIRST_CHUNK to ``check_every`` estimation
# samples, then after every ``check_every``, then after every 1/CHECK_FRACTION of the samples so far once that
# is larger (so a request makes ~80 trips through the scheduler, not n_max/128; overshoot stays ≤ 1/16).
FIRST_CHUNK = 32  # issue 16 (n0_sim): a first check after 8 saved no samples over 32 and cost agreement
DEFAULT_CHECK_EVERY = 128
CHECK_FRACTION = 16


def look_schedule(n_max: int, first: int = DEFAULT_FIRST_LOOK, growth: float = DEFAULT_GROWTH) -> tuple[int, ...]:
    """Cumulative estimation sample sizes at each look of a union bound: first, first·growth, …, n_max."""
    if n_max < 1 or first < 1 or growth <= 1:
        raise ValueError("need n_max >= 1, first >= 1 and growth > 1")
    looks = []
    size = float(min(first, n_max))
    while round(size) < n_max:
        looks.append(round(size))
        size *= growth
    looks.append(n_max)
    return tuple(looks)


def chunk_schedule(n_max: int, check_every: int = DEFAULT_CHECK_EVERY, first: int = FIRST_CHUNK) -> tuple[int, ...]:
    """Cumulative estimation sizes at which the confidence sequence is checked: first, 2·first, … up to steps of
    ``check_every``, then steps of max(check_every, n/CHECK_FRACTION), ending at n_max."""
    if n_max < 1 or check_every < 1 or first < 1:
        raise ValueError("need n_max, check_every and first >= 1")
    looks = [min(first, check_every, n_max)]
    while looks[-1] < n_max:
        n = looks[-1]
        looks.append(min(n_max, n + max(min(n, check_every), round(n / CHECK_FRACTION))))
    return tuple(looks)


@dataclass(frozen=True)
class Evidence:
    """One way of bounding p_A under data-dependent stopping over the looks ``looks`` (see the module doc).

    ``lower(k, n)``: lower bound on p_A after k of n estimation samples at one of the looks; ``rejects(k, n, p0)``:
    whether that excludes every p_A ≤ p0. Guarantee: P(lower(k_n, n) > p_A at some look) ≤ α.
    """

    bound: Bound
    alpha: float
    looks: tuple[int, ...]
    priors: tuple[float, ...] = (confseq.DEFAULT_PRIOR_B,)  # the confidence sequence's Beta(1, b) mixture

    @property
    def alpha_look(self) -> float:
        return self.alpha / len(self.looks)

    def lower(self, k: int, n: int) -> float:
        if self.bound == "confseq":
            return confseq.lower_confidence_sequence(k, n, self.alpha, self.priors)
        return lower_confidence_bound(k, n, self.alpha_look)

    def rejects(self, k: int, n: int, p0: float) -> bool:
        if self.bound == "confseq":
            return confseq.rejects(k, n, p0, self.alpha, self.priors)
        return lower_confidence_bound(k, n, self.alpha_look) > p0


def evidence(
    bound: Bound,
    alpha: float,
    n_max: int,
    *,
    first_look: int = DEFAULT_FIRST_LOOK,
    check_every: int = DEFAULT_CHECK_EVERY,
    looks: Sequence[int] | None = None,
    priors: tuple[float, ...] = (confseq.DEFAULT_PRIOR_B,),
) -> Evidence:
    """The looks and bound of ``bound``; ``looks`` (cumulative sizes ending at n_max) overrides the schedule;
    ``priors``: the confidence sequence's mixture (``smoothing.confseq``)."""
    check_alpha(alpha)
    if bound not in BOUNDS:
        raise ValueError(f"bound must be one of {BOUNDS}, got {bound!r}")
    if looks is not None:
        looks = tuple(int(n) for n in looks)
        if not looks or looks[-1] != n_max or any(b <= a for a, b in zip((0, *looks), looks, strict=False)):
            raise ValueError("looks must increase strictly from above 0 to n_max")
    elif bound == "confseq":
        looks = chunk_schedule(n_max, check_every)
    else:
        looks = look_schedule(n_max, first_look, DEFAULT_GROWTH if bound == "union" else FINE_GROWTH)
    return Evidence(bound, alpha, looks, tuple(priors))


def max_certifiable_radius(
    n_max: int,
    alpha: float,
    sigma: float,
    bound: Bound = DEFAULT_BOUND,
    priors: tuple[float, ...] = (confseq.DEFAULT_PRIOR_B,),
) -> float:
    """The radius certified when all n_max samples agree: no answer of ``bound`` can certify more (ℓ2, units of σ).

    For the union bounds σ·Φ⁻¹((α/K)^(1/n_max)); for the confidence sequence σ·Φ⁻¹(L_{n_max}(n_max)).
    """
    return certified_radius(evidence(bound, alpha, n_max, priors=priors).lower(n_max, n_max), sigma)
