"""Certified ℓ2 radii of a Gaussian-smoothed classifier: Theorem 1 of Cohen et al. (2019) and the two
earlier, looser guarantees it is compared with in their Appendix I (Lecuyer et al. 2019; Li et al. 2019).

All three take the same inputs: p̲A, a lower bound on the probability of the top class under noise,
p̄B, an upper bound on the runner-up's (CERTIFY uses p̄B = 1 − p̲A), and the noise level σ. Every radius is
an ℓ2 distance in the same units as σ, i.e. the [0, 1] pixel space of the model's input. Each function
returns 0.0 when it certifies nothing (always the case when p̲A ≤ p̄B).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp
from scipy.stats import norm

# Largest Rényi order a searched by ``li_radius``. The objective decays like 1/a for large a; for p̄B = 1 − p̲A
# the optimum sits at a ≈ 1.1–1.5 all the way from p̲A = 0.6 to 1 − 1e-15, so 10⁴ leaves a wide margin.
_LI_MAX_LOG_ORDER = np.log(1e4)
# Smallest log(a): at a = 1 exactly the power mean is a 0/0 limit, so the search starts just above it.
_LI_MIN_LOG_ORDER = 1e-9
_GRID_POINTS = 200


def _check_inputs(p_a_lower: float, p_b_upper: float, sigma: float) -> None:
    if not (0.0 <= p_a_lower <= 1.0 and 0.0 <= p_b_upper <= 1.0):
        raise ValueError(f"probabilities must lie in [0, 1], got p_a_lower={p_a_lower}, p_b_upper={p_b_upper}")
    if p_a_lower + p_b_upper > 1.0 + 1e-12:
        raise ValueError(f"p_a_lower + p_b_upper must not exceed 1, got {p_a_lower} + {p_b_upper}")
    if not sigma > 0.0:
        raise ValueError(f"sigma must be positive, got {sigma}")


def _maximize_on_interval(objective, low: float, high: float) -> float:
    """Largest value of a smooth 1-D objective on [low, high]: best point of a coarse grid, refined by a
    bounded scalar search between its neighbours (the grid keeps the search out of local optima)."""
    grid = np.linspace(low, high, _GRID_POINTS)
    values = np.array([objective(x) for x in grid])
    best = int(np.argmax(values))
    left, right = grid[max(best - 1, 0)], grid[min(best + 1, _GRID_POINTS - 1)]
    refined = minimize_scalar(lambda x: -objective(x), bounds=(left, right), method="bounded", options={"xatol": 1e-12})
    return float(max(values[best], -refined.fun))


def cohen_radius(p_a_lower: float, p_b_upper: float, sigma: float) -> float:
    """Theorem 1 of Cohen, Rosenfeld & Kolter (ICML 2019): R = σ/2 · (Φ⁻¹(p̲A) − Φ⁻¹(p̄B)).

    ℓ2 radius in the units of σ. The bound is tight for Gaussian smoothing, so no valid bound exceeds it.
    Infinite when p̲A = 1 and p̄B < 1; 0.0 when p̲A ≤ p̄B.
    """
    _check_inputs(p_a_lower, p_b_upper, sigma)
    if p_a_lower <= p_b_upper:
        return 0.0
    return float(sigma / 2 * (norm.ppf(p_a_lower) - norm.ppf(p_b_upper)))


def lecuyer_radius(p_a_lower: float, p_b_upper: float, sigma: float) -> float:
    """ℓ2 radius certified by the differential-privacy argument of Lecuyer et al. (IEEE S&P 2019), in the
    form of Cohen et al. (2019), Appendix I:

        R = sup over 0 < β ≤ min(1, ½·ln(p̲A/p̄B)) of σ·β / sqrt(2·ln[1.25·(1 + e^β) / (p̲A − e^{2β}·p̄B)]).

    It comes from the Gaussian mechanism being (β, γ)-DP for σ² = ‖δ‖²·2·ln(1.25/γ)/β² and needing
    p̲A > e^{2β}·p̄B + γ·(1 + e^β). Units of σ; because β ≤ 1 it never exceeds about 0.570σ.
    0.0 when p̲A ≤ p̄B.
    """
    _check_inputs(p_a_lower, p_b_upper, sigma)
    if p_a_lower <= p_b_upper:
        return 0.0
    beta_max = 1.0 if p_b_upper == 0.0 else min(1.0, 0.5 * np.log(p_a_lower / p_b_upper))

    def radius_over_sigma(beta: float) -> float:
        margin = p_a_lower - np.exp(2 * beta) * p_b_upper
        if beta <= 0.0 or margin <= 0.0:  # γ would have to be ≤ 0: nothing certified at this β
            return 0.0
        return float(beta / np.sqrt(2 * np.log(1.25 * (1 + np.exp(beta)) / margin)))

    return sigma * _maximize_on_interval(radius_over_sigma, 0.0, beta_max)


def _log_power_mean(exponent: float, log_p: np.ndarray) -> float:
    """ln M_t(p) = (1/t)·ln(mean(p^t)), computed from ln p without forming p^t, which overflows for small p
    and large |t|. Near t = 0 (a → 1) ln(mean(p^t)) is tiny and its difference from 0 would cancel
    catastrophically in the logsumexp form, so it is taken as log1p(mean(expm1(t·ln p))) instead."""
    scaled = exponent * log_p
    if np.max(np.abs(scaled)) < 0.5:
        return float(np.log1p(np.mean(np.expm1(scaled))) / exponent)
    return float((logsumexp(scaled) - np.log(len(scaled))) / exponent)


def _li_squared_radius_over_sigma(log_order: float, p_a_lower: float, p_b_upper: float) -> float:
    """−(2/a)·ln[1 − p̲A − p̄B + 2·M_{1−a}(p̲A, p̄B)] at a = e^log_order, M_t the power mean of exponent t,
    evaluated in log space (the exponent 1/(1 − a) blows up near a = 1, p^{1−a} overflows for large a)."""
    order = np.exp(log_order)
    with np.errstate(divide="ignore"):  # ln(0) = −inf is the right limit for p̄B = 0 or p̲A + p̄B = 1
        log_power_mean = _log_power_mean(1.0 - order, np.log([p_a_lower, p_b_upper]))
        log_inner = np.logaddexp(np.log(max(1.0 - p_a_lower - p_b_upper, 0.0)), np.log(2.0) + log_power_mean)
    return float(-2.0 / order * log_inner)


def li_radius(p_a_lower: float, p_b_upper: float, sigma: float) -> float:
    """ℓ2 radius certified by the Rényi-divergence argument of Li et al. (NeurIPS 2019), in the form of
    Cohen et al. (2019), Appendix I:

        R = σ · sqrt( sup over a > 1 of −(2/a) · ln[1 − p̲A − p̄B + 2·((p̲A^{1−a} + p̄B^{1−a})/2)^{1/(1−a)}] ).

    The supremum is found by a grid plus bounded search over log a in (0, ln 10⁴]. Units of σ.
    0.0 when p̲A ≤ p̄B (the expression is symmetric in p̲A and p̄B, so it only means something for p̲A > p̄B).
    """
    _check_inputs(p_a_lower, p_b_upper, sigma)
    if p_a_lower <= p_b_upper:
        return 0.0
    best = _maximize_on_interval(
        lambda log_order: _li_squared_radius_over_sigma(log_order, p_a_lower, p_b_upper),
        _LI_MIN_LOG_ORDER,
        _LI_MAX_LOG_ORDER,
    )
    return float(sigma * np.sqrt(max(best, 0.0)))
