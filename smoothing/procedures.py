"""What a request asks, as one value: the mode, its parameters and the procedure that answers it.

A ``Question`` names everything, apart from the model and the input, that determines the
distribution of an answer: the procedure (PREDICT, the paper's CERTIFY, the radius decision, the
adaptive certificate), its parameters, and the constants of the procedures and of the noise
(``PROCEDURE_CONSTANTS``, summarised by ``PROCEDURE_VERSION``, which changes whenever one of them
does). The service keys its certificate cache by it; parameters that change neither the samples
nor the decision (a fixed-mode target radius) are not part of it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Literal

from smoothing.confseq import DECISION_PRIORS, DEFAULT_PRIOR_B
from smoothing.core import Certificate, Prediction, certify_procedure, predict_procedure
from smoothing.looks import (
    CHECK_FRACTION,
    DEFAULT_BOUND,
    DEFAULT_CHECK_EVERY,
    DEFAULT_FIRST_LOOK,
    DEFAULT_GROWTH,
    FINE_GROWTH,
    FIRST_CHUNK,
)
from smoothing.sampling import NOISE_BLOCK, NOISE_SCHEME, Procedure
from smoothing.sequential import (
    DEFAULT_FUTILITY_ALPHA,
    DEFAULT_PROJECTION_ALPHA,
    DEFAULT_TOLERANCE,
    AdaptiveCertificate,
    RadiusDecision,
    adaptive_certify,
    radius_test,
)
from smoothing.statistics import certified_radius, check_alpha

Mode = Literal["predict", "fixed", "radius", "adaptive"]
Result = Prediction | Certificate | RadiusDecision | AdaptiveCertificate

PROCEDURE_CONSTANTS: dict[str, Any] = {
    "bound": DEFAULT_BOUND,
    "first_chunk": FIRST_CHUNK,
    "check_every": DEFAULT_CHECK_EVERY,
    "check_fraction": CHECK_FRACTION,
    "confseq_prior_b": DEFAULT_PRIOR_B,
    "decision_priors": list(DECISION_PRIORS),
    "first_look": DEFAULT_FIRST_LOOK,
    "growth": DEFAULT_GROWTH,
    "fine_growth": FINE_GROWTH,
    "futility_alpha": DEFAULT_FUTILITY_ALPHA,
    "projection_alpha": DEFAULT_PROJECTION_ALPHA,
    "noise_block": NOISE_BLOCK,
    "noise": NOISE_SCHEME,
}
"""The server-side constants an answer depends on beyond its request's parameters."""

PROCEDURE_VERSION = hashlib.sha256(json.dumps(PROCEDURE_CONSTANTS, sort_keys=True).encode()).hexdigest()[:12]
"""A short digest of ``PROCEDURE_CONSTANTS``: changes whenever one of them changes."""


@dataclass(frozen=True)
class Question:
    """One request's procedure and parameters (σ is the model's own).

    mode: 'predict' (PREDICT with n samples), 'fixed' (CERTIFY with n0 + n), 'radius' ("certified
    at ``radius``?", sequential up to n_max = n) or 'adaptive' (sequential certificate up to n,
    stopping within ``tolerance``). ``radius`` is set only in mode 'radius', ``tolerance`` only in
    mode 'adaptive', n0 is 0 in mode 'predict'.
    """

    mode: Mode
    sigma: float
    alpha: float
    n: int
    n0: int = 0
    radius: float | None = None
    tolerance: float | None = None

    def __post_init__(self) -> None:
        check_alpha(self.alpha)
        if self.n < 1 or self.n0 < (0 if self.mode == "predict" else 1):
            raise ValueError(f"need n >= 1 and n0 >= 1 (0 for predict), got n={self.n}, n0={self.n0}")
        if (self.radius is not None) != (self.mode == "radius"):
            raise ValueError("radius is set exactly in mode 'radius'")
        if (self.tolerance is not None) != (self.mode == "adaptive"):
            raise ValueError("tolerance is set exactly in mode 'adaptive'")

    def procedure(self) -> Procedure[Result]:
        """A fresh generator of this question's procedure (see ``smoothing.sampling.run``)."""
        common = dict(sigma=self.sigma, alpha=self.alpha)
        if self.mode == "predict":
            return predict_procedure(n=self.n, **common)
        if self.mode == "fixed":
            return certify_procedure(n0=self.n0, n=self.n, **common)
        if self.mode == "radius":
            return radius_test(radius=self.radius, n0=self.n0, n_max=self.n, **common)
        return adaptive_certify(n0=self.n0, n_max=self.n, tolerance=self.tolerance, **common)

    def key_fields(self) -> dict[str, Any]:
        """Every field that determines the answer's distribution, the procedure constants included."""
        return {
            **{k: (float(v) if isinstance(v, float) else v) for k, v in asdict(self).items()},
            "procedure": PROCEDURE_VERSION,
            "constants": PROCEDURE_CONSTANTS,
        }


def api_question(
    mode: Literal["fixed", "adaptive"],
    *,
    sigma: float,
    alpha: float,
    n0: int,
    n: int,
    radius: float | None = None,
    tolerance: float | None = None,
) -> Question:
    """The API's certify modes as the procedure they ask for: 'fixed' → the paper's CERTIFY (a target
    radius is answered from the certificate and changes nothing); 'adaptive' with ``radius`` → the
    sequential radius decision; 'adaptive' without → the adaptive certificate at ``tolerance``."""
    if mode == "fixed":
        return Question("fixed", sigma, alpha, n, n0)
    if radius is not None:
        return Question("radius", sigma, alpha, n, n0, radius=radius)
    return Question("adaptive", sigma, alpha, n, n0, tolerance=DEFAULT_TOLERANCE if tolerance is None else tolerance)


def certificate_summary(result: Certificate | RadiusDecision | AdaptiveCertificate) -> dict[str, Any]:
    """Any certificate as one record (the API's answer fields, a job's row): the label when p̲A > 1/2,
    its radius, bound, counts and samples.

    A sequential radius decision also reports its target and verdict, and the radius its last
    bound certifies (valid like every look's bound).
    """
    certified = result.p_a_lower > 0.5
    fields = {
        "mode": "fixed" if isinstance(result, Certificate) else "adaptive",
        "label": result.top_class if certified else None,
        "p_a_lower": result.p_a_lower,
        "radius": certified_radius(result.p_a_lower, result.sigma),
        "top_class": result.top_class,
        "selection_counts": list(result.selection_counts),
        "estimation_counts": list(result.estimation_counts),
        "n0": result.n0 if result.samples else 0,
        "n": max(0, result.samples - result.n0),
        "n_max": result.n_max,
        "samples": result.samples,
        "alpha": result.alpha,
        "sigma": result.sigma,
    }
    if isinstance(result, RadiusDecision):
        fields |= {
            "target_radius": result.radius,
            "certified_at_radius": result.certified,
            "max_certifiable_radius": result.max_certifiable_radius,
        }
    return fields
