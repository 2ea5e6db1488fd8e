"""PREDICT and CERTIFY of Cohen, Rosenfeld & Kolter (ICML 2019), §3.2.

The decisions (``predict_from_counts``, ``certify_from_counts``) see only class counts; the
samplers (``predict``, ``certify``) draw those counts from a model. The same decision code
serves the library, the offline commands and the service.

All radii are ℓ2 distances in the [0, 1] pixel space of the model's input, at its resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from smoothing.sampling import ESTIMATION_STAGE, SELECTION_STAGE, new_seed, sample_counts
from smoothing.statistics import lower_confidence_bound, radius_from_lower_bound, two_sided_p_value


@dataclass(frozen=True)
class Prediction:
    """PREDICT's answer. ``label`` is None when it abstained.

    Guarantee: with probability ≥ 1 - α, ``label`` is None or equals g(x).
    """

    label: int | None
    p_value: float  # two-sided binomial test of the top two counts against 1/2
    counts: tuple[int, ...]  # class counts of the n samples
    n: int
    alpha: float
    sigma: float
    seed: int | None = None

    @property
    def abstained(self) -> bool:
        return self.label is None


@dataclass(frozen=True)
class Certificate:
    """CERTIFY's answer. ``label`` is None (and ``radius`` 0) when it abstained.

    Guarantee: with probability ≥ 1 - α, either it abstained or g(x + δ) = label for every
    ‖δ‖₂ < radius, radius in ℓ2 units of the [0, 1] pixel space at the model's input resolution.
    """

    label: int | None
    radius: float
    p_a_lower: float  # one-sided (1 - α) Clopper–Pearson lower bound on P(f(x + ε) = ĉA)
    top_class: int  # ĉA, the class chosen from the selection samples
    selection_counts: tuple[int, ...]  # class counts of the n0 selection samples
    estimation_counts: tuple[int, ...]  # class counts of the n estimation samples
    n0: int
    n: int
    alpha: float
    sigma: float
    seed: int | None = None

    @property
    def abstained(self) -> bool:
        return self.label is None

    @property
    def n_a(self) -> int:
        """How often ĉA came up among the estimation samples."""
        return self.estimation_counts[self.top_class]


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 0.5:
        raise ValueError(f"alpha must lie in (0, 0.5), got {alpha}")


def predict_from_counts(counts: torch.Tensor, *, alpha: float, sigma: float, seed: int | None = None) -> Prediction:
    """PREDICT's decision: return the top class unless the two-sided binomial test on the top two
    counts fails to reject P = 1/2 at level α (then abstain). Ties go to the lower class index."""
    _check_alpha(alpha)
    counts = counts.to(torch.long).cpu()
    order = torch.argsort(-counts, stable=True)  # descending, ties by class index
    n_a = int(counts[order[0]])
    n_b = int(counts[order[1]]) if counts.numel() > 1 else 0
    p_value = two_sided_p_value(n_a, n_b)
    label = int(order[0]) if p_value <= alpha else None
    return Prediction(label, p_value, tuple(counts.tolist()), int(counts.sum()), alpha, sigma, seed)


def certify_from_counts(
    selection_counts: torch.Tensor,
    estimation_counts: torch.Tensor,
    *,
    alpha: float,
    sigma: float,
    seed: int | None = None,
) -> Certificate:
    """CERTIFY's decision from independent selection (n0) and estimation (n) counts.

    ĉA is the top selection class; p̲A is the one-sided (1 - α) Clopper–Pearson lower bound
    from ĉA's estimation count; radius σ·Φ⁻¹(p̲A), abstaining when p̲A ≤ 1/2.
    """
    _check_alpha(alpha)
    selection_counts = selection_counts.to(torch.long).cpu()
    estimation_counts = estimation_counts.to(torch.long).cpu()
    top_class = int(torch.argsort(-selection_counts, stable=True)[0])
    n = int(estimation_counts.sum())
    p_a_lower = lower_confidence_bound(int(estimation_counts[top_class]), n, alpha)
    certified = p_a_lower > 0.5
    return Certificate(
        label=top_class if certified else None,
        radius=radius_from_lower_bound(p_a_lower, sigma) if certified else 0.0,
        p_a_lower=p_a_lower,
        top_class=top_class,
        selection_counts=tuple(selection_counts.tolist()),
        estimation_counts=tuple(estimation_counts.tolist()),
        n0=int(selection_counts.sum()),
        n=n,
        alpha=alpha,
        sigma=sigma,
        seed=seed,
    )


def predict(
    model: nn.Module,
    x: torch.Tensor,
    *,
    sigma: float,
    num_classes: int,
    n: int,
    alpha: float,
    batch_size: int,
    seed: int | None = None,
    channels_last: bool = False,
) -> Prediction:
    """PREDICT(f, σ, x, n, α). x: (C, H, W) in [0, 1]. Draws n samples from the estimation stream."""
    _check_alpha(alpha)  # before sampling, so a bad request costs no forward passes
    seed = new_seed() if seed is None else seed
    counts = sample_counts(
        model,
        x,
        n,
        sigma=sigma,
        num_classes=num_classes,
        batch_size=batch_size,
        seed=seed,
        stage=ESTIMATION_STAGE,
        channels_last=channels_last,
    )
    return predict_from_counts(counts, alpha=alpha, sigma=sigma, seed=seed)


def certify(
    model: nn.Module,
    x: torch.Tensor,
    *,
    sigma: float,
    num_classes: int,
    n0: int,
    n: int,
    alpha: float,
    batch_size: int,
    seed: int | None = None,
    channels_last: bool = False,
) -> Certificate:
    """CERTIFY(f, σ, x, n0, n, α). x: (C, H, W) in [0, 1].

    Selection and estimation samples come from independent noise streams of the same seed.
    """
    _check_alpha(alpha)  # before sampling, so a bad request costs no forward passes
    seed = new_seed() if seed is None else seed
    common = dict(sigma=sigma, num_classes=num_classes, batch_size=batch_size, seed=seed, channels_last=channels_last)
    selection = sample_counts(model, x, n0, stage=SELECTION_STAGE, **common)
    estimation = sample_counts(model, x, n, stage=ESTIMATION_STAGE, **common)
    return certify_from_counts(selection, estimation, alpha=alpha, sigma=sigma, seed=seed)
