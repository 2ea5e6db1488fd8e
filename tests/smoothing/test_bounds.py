import numpy as np
import pytest

from smoothing.bounds import cohen_radius, lecuyer_radius, li_radius
from smoothing.statistics import radius_from_lower_bound

# Cohen et al. (2019), Appendix I, at σ = 1 and p̄B = 1 − p̲A (values in /work/shared/PAPER-NOTES.md).
REFERENCE = [
    # p̲A, Lecuyer, Li, Cohen
    (0.6, 0.0592, 0.2022, 0.2533),
    (0.9, 0.3903, 1.0319, 1.2816),
    (0.99, 0.5549, 1.9080, 2.3263),
    (0.999, 0.5689, 2.5757, 3.0902),
]
# Interior grid used by the property tests; both ends are the hard ones numerically.
P_A_GRID = np.concatenate([[0.500001], np.linspace(0.5001, 0.99, 12), [0.995, 0.999, 0.9995, 0.9999]])
# sup over β ≤ 1 of Lecuyer's σβ / sqrt(2 ln[1.25(1 + e^β)/p̲A]) is reached at β = 1, p̲A = 1.
LECUYER_CAP = 1.0 / np.sqrt(2.0 * np.log(1.25 * (1.0 + np.e)))


@pytest.mark.parametrize(("p_a", "lecuyer", "li", "cohen"), REFERENCE)
def test_reference_table(p_a: float, lecuyer: float, li: float, cohen: float) -> None:
    assert lecuyer_radius(p_a, 1 - p_a, 1.0) == pytest.approx(lecuyer, abs=3e-4)
    assert li_radius(p_a, 1 - p_a, 1.0) == pytest.approx(li, abs=3e-4)
    assert cohen_radius(p_a, 1 - p_a, 1.0) == pytest.approx(cohen, abs=3e-4)


@pytest.mark.parametrize("p_b_fraction", [1.0, 0.3])
def test_lecuyer_below_li_below_cohen(p_b_fraction: float) -> None:
    # Cohen's bound is tight, so a valid bound may never exceed it; Li's is known to dominate Lecuyer's.
    for p_a in P_A_GRID:
        p_b = (1 - p_a) * p_b_fraction
        lecuyer, li, cohen = lecuyer_radius(p_a, p_b, 1.0), li_radius(p_a, p_b, 1.0), cohen_radius(p_a, p_b, 1.0)
        assert 0.0 < lecuyer <= li <= cohen, (p_a, p_b, lecuyer, li, cohen)


@pytest.mark.parametrize("radius", [cohen_radius, lecuyer_radius, li_radius])
def test_linear_in_sigma(radius) -> None:
    for p_a in (0.55, 0.9, 0.999):
        at_one = radius(p_a, 1 - p_a, 1.0)
        for sigma in (0.12, 0.25, 0.5, 1.0, 2.0):
            assert radius(p_a, 1 - p_a, sigma) == pytest.approx(sigma * at_one, rel=1e-9)


def test_lecuyer_never_above_cap() -> None:
    assert abs(LECUYER_CAP - 0.5705) < 1e-4
    for sigma in (0.25, 1.0):
        radii = [lecuyer_radius(p_a, 1 - p_a, sigma) for p_a in P_A_GRID]
        assert max(radii) <= LECUYER_CAP * sigma
    # p̄B = 0 removes the constraint on β, so β = 1 is allowed and p̲A → 1 reaches the cap.
    assert lecuyer_radius(1.0, 0.0, 1.0) == pytest.approx(LECUYER_CAP, rel=1e-9)


@pytest.mark.parametrize("radius", [cohen_radius, lecuyer_radius, li_radius])
@pytest.mark.parametrize("p_a", [0.0, 0.2, 0.45, 0.5])
def test_zero_when_top_class_not_above_half(radius, p_a: float) -> None:
    assert radius(p_a, 1 - p_a, 0.5) == 0.0


@pytest.mark.parametrize("radius", [cohen_radius, lecuyer_radius, li_radius])
def test_zero_when_runner_up_may_win(radius) -> None:
    # Li's expression is symmetric in p̲A and p̄B: without the explicit check it would certify here.
    assert radius(0.3, 0.4, 1.0) == 0.0
    assert radius(0.35, 0.35, 1.0) == 0.0


def test_cohen_general_runner_up_bound() -> None:
    # With p̄B < 1 − p̲A the radius grows: σ/2·(Φ⁻¹(0.7) − Φ⁻¹(0.1)).
    assert cohen_radius(0.7, 0.1, 2.0) == pytest.approx(0.5244005 + 1.2815516, abs=1e-6)
    assert cohen_radius(0.7, 0.1, 2.0) > cohen_radius(0.7, 0.3, 2.0)


def test_cohen_matches_certify_radius() -> None:
    for p_a in P_A_GRID:
        assert cohen_radius(p_a, 1 - p_a, 0.25) == pytest.approx(radius_from_lower_bound(p_a, 0.25), rel=1e-12)


def test_radii_grow_with_p_a() -> None:
    for radius in (cohen_radius, lecuyer_radius, li_radius):
        values = [radius(p_a, 1 - p_a, 1.0) for p_a in P_A_GRID]
        assert np.all(np.diff(values) > 0), radius.__name__


def test_edge_probabilities_are_finite_where_they_should_be() -> None:
    assert cohen_radius(1.0, 0.0, 1.0) == np.inf
    # Li at p̄B = 0: the power mean is 0, the supremum is at a → 1, giving sqrt(−2 ln(1 − p̲A)).
    assert li_radius(0.9, 0.0, 1.0) == pytest.approx(np.sqrt(-2 * np.log(0.1)), rel=1e-6)
    assert np.isfinite(li_radius(1 - 1e-9, 1e-9, 1.0))


@pytest.mark.parametrize("radius", [cohen_radius, lecuyer_radius, li_radius])
def test_rejects_invalid_inputs(radius) -> None:
    with pytest.raises(ValueError):
        radius(0.9, 0.1, 0.0)
    with pytest.raises(ValueError):
        radius(1.2, 0.0, 1.0)
    with pytest.raises(ValueError):
        radius(0.9, 0.2, 1.0)
