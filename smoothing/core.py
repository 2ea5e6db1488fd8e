"""PREDICT and CERTIFY of Cohen, Rosenfeld & Kolter (ICML 2019), §3.2.

The decisions (``predict_from_counts``, ``certify_from_counts``) see only class counts. The
procedures (``predict_procedure``, ``certify_procedure``) ask for samples and decide, as
generators in the protocol of ``smoothing.sampling.run``: the library's ``predict``/``certify``
drive them with a synchronous sampler, the service with its scheduler, so both run one code path.

All radii are ℓ2 distances in the [0, 1] pixel space of the model's input, at its resolution.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from smoothing.sampling import (
    ESTIMATION_STAGE,
    SELECTION_STAGE,
    Procedure,
    SampleRequest,
    model_sampler,
    new_seed,
    run,
)
from smoothing.statistics import certified_radius, check_alpha, lower_confidence_bound, two_sided_p_value


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

    @property
    def samples(self) -> int:
        """Noise samples spent: selection + estimation."""
        return self.n0 + self.n

    @property
    def n_max(self) -> int:
        """Estimation samples allowed: exactly n for the paper's CERTIFY."""
        return self.n


def predict_from_counts(counts: torch.Tensor, *, alpha: float, sigma: float, seed: int | None = None) -> Prediction:
    """PREDICT's decision: return the top class unless the two-sided binomial test on the top two
    counts fails to reject P = 1/2 at level α (then abstain). Ties go to the lower class index."""
    check_alpha(alpha)
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
    check_alpha(alpha)
    selection_counts = selection_counts.to(torch.long).cpu()
    estimation_counts = estimation_counts.to(torch.long).cpu()
    top_class = int(torch.argsort(-selection_counts, stable=True)[0])
    n = int(estimation_counts.sum())
    p_a_lower = lower_confidence_bound(int(estimation_counts[top_class]), n, alpha)
    certified = p_a_lower > 0.5
    return Certificate(
        label=top_class if certified else None,
        radius=certified_radius(p_a_lower, sigma),
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


def predict_procedure(*, n: int, alpha: float, sigma: float) -> Procedure[Prediction]:
    """PREDICT(σ, n, α) as a procedure: n samples of the estimation stream, then the binomial test."""
    check_alpha(alpha)
    counts = yield SampleRequest(ESTIMATION_STAGE, 0, n)
    return predict_from_counts(counts, alpha=alpha, sigma=sigma)


def certify_procedure(*, n0: int, n: int, alpha: float, sigma: float) -> Procedure[Certificate]:
    """CERTIFY(σ, n0, n, α) as a procedure: ĉA from n0 selection samples, then n independent
    estimation samples (another stream) for the Clopper–Pearson bound."""
    check_alpha(alpha)
    selection = yield SampleRequest(SELECTION_STAGE, 0, n0)
    estimation = yield SampleRequest(ESTIMATION_STAGE, 0, n)
    return certify_from_counts(selection, estimation, alpha=alpha, sigma=sigma)


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
    check_alpha(alpha)  # before sampling, so a bad request costs no forward passes
    seed = new_seed() if seed is None else seed
    sampler = model_sampler(
        model, x, sigma=sigma, num_classes=num_classes, batch_size=batch_size, seed=seed, channels_last=channels_last
    )
    return replace(run(predict_procedure(n=n, alpha=alpha, sigma=sigma), sampler), seed=seed)


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
    check_alpha(alpha)  # before sampling, so a bad request costs no forward passes
    seed = new_seed() if seed is None else seed
    sampler = model_sampler(
        model, x, sigma=sigma, num_classes=num_classes, batch_size=batch_size, seed=seed, channels_last=channels_last
    )
    return replace(run(certify_procedure(n0=n0, n=n, alpha=alpha, sigma=sigma), sampler), seed=seed)
