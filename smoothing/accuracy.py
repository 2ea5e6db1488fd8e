"""Certified accuracy over a test set: the approximate one CERTIFY measures, and lower bounds on the true
one (Cohen et al. 2019, Appendix D, Theorem 6).

"Certified accuracy at radius r" is the fraction of m test examples (x, y) on which the smoothed classifier
g is correct and robust: g(x + δ) = y for every ‖δ‖₂ < r. CERTIFY can only approximate it: its answer for
one example is wrong with probability at most α. "Approximate certified accuracy" counts the examples on
which CERTIFY returned the right label with a radius ≥ r. Radii are ℓ2 in the [0, 1] pixel space.

Setting shared by both lower bounds. Split the m examples into the T truly certified at r and the N = m − T
that are not. Let Y be the number CERTIFY approximately certifies at r, and W how many of those lie among
the N. For one of the N, being counted means CERTIFY returned y with radius ≥ r although g(x) ≠ y or g is
not robust to r: a wrong certificate, probability ≤ α, independently across examples (each call draws
its own noise). So Y ≤ T + W with W stochastically dominated by Binomial(N, α).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import binom


def _check_arguments(num_correct: int, m: int, alpha: float, rho: float) -> None:
    if m <= 0:
        raise ValueError(f"need m > 0 examples, got {m}")
    if not 0 <= num_correct <= m:
        raise ValueError(f"num_correct must lie in [0, m] = [0, {m}], got {num_correct}")
    if not 0.0 < alpha <= 0.5:
        raise ValueError(f"alpha must lie in (0, 0.5], got {alpha}")
    if not 0.0 < rho < 1.0:
        raise ValueError(f"rho must lie in (0, 1), got {rho}")


def true_accuracy_lower_bound(num_correct: int, m: int, alpha: float, rho: float) -> float:
    """Theorem 6 of Cohen et al. (2019): with probability ≥ 1 − ρ over CERTIFY's randomness, the true
    certified accuracy at r is at least

        1/(1 − α) · ( Y/m − α − sqrt(2·α·(1 − α)·ln(1/ρ)/m) − ln(1/ρ)/(3m) ),   clipped at 0,

    where Y = ``num_correct`` is the number of the m examples CERTIFY (run at level α) approximately
    certified at r (right label, radius ≥ r).

    Why: W, the wrong certificates among the counted examples, is a sum of N independent indicators each
    with mean ≤ α (module docstring), so Bernstein's inequality (in its sub-gamma form, for summands at most 1
    above their mean; Boucheron, Lugosi & Massart 2013, Thm 2.10) gives W ≤ N·α + sqrt(2·N·α(1 − α)·ln(1/ρ))
    + ln(1/ρ)/3 with probability ≥ 1 − ρ (the variance bound p(1 − p) ≤ α(1 − α) for p ≤ α needs α ≤ 1/2).
    With Y ≤ T + W, N = m − T ≤ m inside the square root, and A = T/m:
    Y/m ≤ A + (1 − A)·α + sqrt(...) + ln(1/ρ)/(3m); solving for A gives the bound, the 1/(1 − α) coming
    from the (1 − A)·α term. ``true_accuracy_lower_bound_exact`` is never smaller.
    """
    _check_arguments(num_correct, m, alpha, rho)
    log_term = np.log(1.0 / rho)
    deviation = np.sqrt(2.0 * alpha * (1.0 - alpha) * log_term / m) + log_term / (3.0 * m)
    return float(max(0.0, (num_correct / m - alpha - deviation) / (1.0 - alpha)))


def true_accuracy_lower_bound_exact(num_correct: int, m: int, alpha: float, rho: float) -> float:
    """Lower bound on the true certified accuracy at r, valid with probability ≥ 1 − ρ over CERTIFY's
    randomness, from exact binomial quantiles instead of Bernstein's inequality. Same inputs as
    ``true_accuracy_lower_bound``; never smaller than it.

    Let q(n) = ``binom.ppf(1 − ρ, n, α)``, the smallest k with P(Binomial(n, α) ≤ k) ≥ 1 − ρ. The bound is
    k̂/m with k̂ the smallest integer k in [0, m] such that Y ≤ k + q(m − k).

    Proof of validity. With T the truly certified count and N = m − T, Y ≤ T + W and W is dominated by
    Binomial(N, α) (module docstring), so P(W > q(N)) ≤ P(Binomial(N, α) > q(N)) ≤ ρ. Outside that event,
    Y ≤ T + q(m − T): k = T satisfies the condition, hence k̂ ≤ T.

    The analogue of Theorem 6's 1/(1 − α) factor is using Binomial(N, α) rather than Binomial(m, α). The
    simpler (Y − q(m))/m is also valid (q is nondecreasing in n, so every admissible k has k ≥ Y − q(m)),
    needs no 1/(1 − α) factor, but at high accuracy falls below Theorem 6: it charges all m examples with
    α wrong certificates, Theorem 6 only the N uncertified ones.

    Never below Theorem 6. Bernstein gives P(Binomial(n, α) ≤ n·α + D(n)) ≥ 1 − ρ with
    D(n) = sqrt(2n·α(1 − α)·ln(1/ρ)) + ln(1/ρ)/3, so q(n) ≤ n·α + D(n) ≤ n·α + D(m). Every admissible k
    then has Y ≤ k + (m − k)·α + D(m), i.e. k ≥ (Y − m·α − D(m))/(1 − α): Theorem 6's bound times m.
    """
    _check_arguments(num_correct, m, alpha, rho)
    candidates = np.arange(m + 1)
    admissible = num_correct <= candidates + binom.ppf(1.0 - rho, m - candidates, alpha)
    # k = m is always admissible (q(0) = 0 and Y ≤ m), so argmax finds a True.
    return float(np.argmax(admissible) / m)


def certified_count(radii: np.ndarray, correct: np.ndarray, r: float) -> int:
    """Y: how many examples CERTIFY certified with the right label and radius ≥ r.

    ``radii`` are CERTIFY's radii (ℓ2, [0, 1] pixel space); ``correct`` is True where its label equals the
    true label. An abstention is never certified: give it ``correct`` False (e.g. ``predicted == labels``
    with -1 for an abstention) or a NaN radius.
    """
    radii = np.asarray(radii, dtype=float)
    correct = np.asarray(correct, dtype=bool)
    if radii.shape != correct.shape:
        raise ValueError(f"radii and correct must have the same shape, got {radii.shape} and {correct.shape}")
    return int(np.count_nonzero(correct & (radii >= r)))  # NaN >= r is False


def approximate_certified_accuracy(radii: np.ndarray, correct: np.ndarray, r: float) -> float:
    """Fraction of examples CERTIFY certified with the right label and radius ≥ r (Cohen et al. 2019, §4):
    ``certified_count`` divided by the number of examples. Abstentions count as not certified."""
    radii = np.asarray(radii, dtype=float)
    if radii.size == 0:
        raise ValueError("need at least one example")
    return certified_count(radii, correct, r) / radii.size
