"""Request and response bodies of the HTTP API (pydantic v2); their descriptions become the /docs page.

Parameters left out take the service's configured defaults (CERTSERVE_DEFAULT_*), and sample
counts are bounded by CERTSERVE_MAX_N; the numbers quoted below are the shipped defaults.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.decoding import MAX_SIDE

RADIUS_UNITS = (
    "Radii are ℓ2 distances in [0, 1] pixel space at the model's input resolution (C×H×W): the certificate "
    "holds for every perturbation δ of the decoded, possibly resized, input with ‖δ‖₂ < radius."
)

GUARANTEE = (
    "What the guarantee covers: one answer computed from fresh randomness is wrong with probability at most α. "
    "The best of k tries (k seeds, or k requests) is not: it can be wrong with probability up to k·α. Answers from "
    "server randomness are cached and shared (asking again returns the stored answer); answers from a client's "
    "seed are for reproducibility only and never cached."
)


class ErrorResponse(BaseModel):
    detail: str = Field(description="what was wrong, in one sentence")


# -- requests ------------------------------------------------------------------------------------


class CommonParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None,
        description="model id (see GET /v1/models); default: the service's default model (CERTSERVE_DEFAULT_MODEL)",
    )
    alpha: float | None = Field(
        None, gt=0, lt=0.5, description="failure probability α in (0, 0.5); default 0.001 (CERTSERVE_DEFAULT_ALPHA)"
    )
    seed: int | None = Field(
        None,
        ge=0,
        lt=2**63,
        description="seed of the noise, for reproducing an answer: the same seed and input give the same samples "
        "as the library's predict/certify. An answer from a client's seed is never cached nor taken from the cache "
        "(seed_source='client'). Its guarantee holds only if the seed was chosen before seeing any answer: the "
        "best of k tries with different seeds is wrong with probability up to k·α. Default: a fresh seed drawn by "
        "the server (seed_source='server'), returned in the answer",
    )
    resize: bool = Field(
        False, description="resample an image or array of another height/width to the model's (bilinear)"
    )
    priority: Literal["interactive", "batch"] = Field(
        "interactive",
        description="'interactive': served as the endpoint's own class (predictions first, then certifications); "
        "'batch': served with the batch jobs, and queued within their bound, so that it never delays or crowds "
        "out interactive work",
    )
    timeout_s: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="deadline in seconds; past it 504 and the remaining work is dropped. It may only shorten the "
        "server's CERTSERVE_REQUEST_TIMEOUT_S (default 300 s): a longer one is cut to it",
    )


class PredictParams(CommonParams):
    n: int | None = Field(
        None, ge=1, description="noise samples; default 1,000 (CERTSERVE_DEFAULT_PREDICT_N), at most CERTSERVE_MAX_N"
    )


class CertifyParams(CommonParams):
    n0: int | None = Field(
        None,
        ge=1,
        description="selection samples; default 100 (CERTSERVE_DEFAULT_N0), in mode 'radius' 16 "
        "(CERTSERVE_DEFAULT_RADIUS_N0); at most CERTSERVE_MAX_N",
    )
    n: int | None = Field(
        None,
        ge=1,
        description="estimation samples (fixed mode), or their most (adaptive mode); default 100,000 "
        "(CERTSERVE_DEFAULT_N), at most CERTSERVE_MAX_N",
    )
    mode: Literal["fixed", "adaptive"] = Field(
        "fixed",
        description="'fixed': the paper's CERTIFY with exactly n estimation samples. 'adaptive': samples in "
        "chunks up to n and stops early, with the same guarantee (an anytime-valid confidence sequence for p_A, "
        "checked after every chunk): without "
        "`radius`, once more samples could not raise the radius by more than `tolerance`; with `radius`, once it "
        "is decided whether the input is certified at that radius",
    )
    radius: float | None = Field(
        None,
        ge=0,
        allow_inf_nan=False,
        description="decision mode: is the input certified at this ℓ2 radius? The answer's certified_at_radius "
        "says; in adaptive mode sampling stops as soon as that is decided",
    )
    tolerance: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="adaptive mode without radius: stop once n samples could not "
        "raise the radius by more than this (ℓ2); default 0.02",
    )


class ImageInput(BaseModel):
    """The input in a JSON body: an encoded image, or raw pixel values with their shape."""

    image_base64: str | None = Field(None, description="an image file (PNG, JPEG, ...) encoded as base64")
    array: list[Any] | None = Field(
        None, description="pixel values in [0, 1], flat (row-major) or nested, matching `shape`"
    )
    shape: list[Annotated[int, Field(ge=1, le=MAX_SIDE)]] | None = Field(
        None,
        min_length=2,
        max_length=3,
        description=f"shape of `array`: [C, H, W], or [H, W] for one channel; each size from 1 to {MAX_SIDE}",
    )

    @model_validator(mode="after")
    def one_input(self) -> ImageInput:
        if (self.image_base64 is None) == (self.array is None):
            raise ValueError("give exactly one of image_base64 or array (with shape)")
        if self.array is not None and self.shape is None:
            raise ValueError("array needs its shape, e.g. [1, 28, 28]")
        return self


class PredictJson(ImageInput, PredictParams):
    """POST /v1/predict as application/json."""


class CertifyJson(ImageInput, CertifyParams):
    """POST /v1/certify as application/json."""


# -- answers -------------------------------------------------------------------------------------


class Answer(BaseModel):
    model: str = Field(description="id of the model that answered")
    checkpoint_sha256: str = Field(description="sha256 of the model's weights file")
    manifest_digest: str = Field(description="sha256 of the model's manifest content (weights' sha256 included)")
    precision: str = Field(description="arithmetic the base classifier ran in: float32, or the autocast dtype")
    procedure: str = Field(description="version of the server's procedure constants (changes when one changes)")
    input_digest: str = Field(description="sha256 of the decoded input's float32 pixels and shape")
    label: int | None = Field(description="predicted class index; null when the answer abstained")
    class_name: str | None = Field(description="name of the predicted class; null when abstained")
    abstained: bool
    alpha: float
    sigma: float = Field(description="σ of the Gaussian noise, in [0, 1] pixel units (the model's own)")
    seed: int = Field(description="seed whose noise samples produced this answer (on a cache hit: the original's)")
    seed_source: Literal["server", "client"] = Field(
        description="'server': fresh randomness drawn by the server (cacheable, shared); 'client': the request's seed "
        "(never cached)"
    )
    cached: bool = Field(description="true when the answer came from the certificate cache")
    queued_s: float = Field(description="seconds the request's samples waited for the device")
    compute_s: float = Field(description="seconds from the first forward pass to the last, summed over phases")


class PredictResponse(Answer):
    p_value: float = Field(description="two-sided binomial test of the top two counts; abstains when above α")
    counts: list[int] = Field(description="how often each class came up among the n noise samples")
    n: int


class CertifyResponse(Answer):
    mode: Literal["fixed", "adaptive"] = Field(description="which procedure ran")
    radius: float = Field(description="certified ℓ2 radius in [0, 1] pixel space at the model's input resolution")
    p_a_lower: float = Field(
        description="lower bound on the top class's probability at level 1 - α: one-sided Clopper-Pearson in "
        "fixed mode, the anytime-valid confidence sequence at the last chunk in adaptive mode"
    )
    top_class: int | None = Field(description="the class chosen from the selection samples (even when abstaining)")
    selection_counts: list[int] = Field(description="class counts of the n0 selection samples")
    estimation_counts: list[int] = Field(description="class counts of the estimation samples drawn")
    n0: int
    n: int = Field(description="estimation samples drawn")
    n_max: int = Field(description="estimation samples allowed (= n in fixed mode)")
    samples: int = Field(description="noise samples spent: selection + estimation")
    target_radius: float | None = Field(None, description="the radius asked about (decision mode)")
    certified_at_radius: bool | None = Field(
        None, description="decision mode: whether the label is certified at target_radius (with prob. ≥ 1 - α)"
    )
    max_certifiable_radius: float | None = Field(
        None, description="adaptive decision mode: the largest radius n_max samples could ever certify"
    )
    signed_at: str | None = Field(None, description="UTC time (ISO 8601) the certificate was computed and signed")
    signature: str | None = Field(
        None,
        description="base64 Ed25519 signature of the certificate's signed fields (service.signing.canonical_payload); "
        "null when the service has no signing key. Verify with GET /v1/signing-key's public key",
    )


class CertifiableRadius(BaseModel):
    radius: float = Field(
        description="the largest ℓ2 radius fixed-mode CERTIFY can certify with n estimation samples at level α: "
        "σ·Φ⁻¹(α^(1/n)), reached when all n samples agree"
    )
    n: int = Field(description="estimation samples (the query's n, default CERTSERVE_DEFAULT_N)")
    alpha: float = Field(description="α (the query's alpha, default CERTSERVE_DEFAULT_ALPHA)")


class ModelInfo(BaseModel):
    id: str
    dataset: str
    architecture: str
    sigma: float = Field(description="σ the model was trained with and is smoothed with")
    classes: list[str]
    input_shape: tuple[int, int, int] = Field(description="(C, H, W) of inputs")
    sha256: str = Field(description="sha256 of the weights file")
    device: str
    batch_size: int = Field(
        description="measured best number of noise samples per forward pass at load time; executors refine it "
        "while serving (the metric certserve_batch_size_samples has each one's current size)"
    )
    interactive_batch_size: int = Field(
        description="samples per forward pass for a second after a /v1/predict arrives: the smallest batch within "
        "5 % of the best throughput, so that predictions wait less for the batch in flight"
    )
    samples_per_second: float = Field(description="measured sampling throughput at that batch size")
    precision: str = Field(description="arithmetic of the base classifier: float32, or the autocast dtype")
    max_certifiable_radius: CertifiableRadius


class ModelList(BaseModel):
    models: list[ModelInfo]


class JobCreated(BaseModel):
    id: str = Field(description="unguessable job id")
    status_url: str
    results_url: str


class Health(BaseModel):
    status: str


class DeviceStatus(BaseModel):
    name: str = Field(description="the executor: 'cuda:0'; 'cpu', or 'cpu#k' for the k-th of several CPU executors")
    device: str
    alive: bool = Field(description="whether it serves; a failed device is out of the pool, the others serve on")
    threads: int = Field(description="intra-op CPU threads of its forward passes")
    error: str | None = Field(description="why it left the pool; null while it serves")


class Readiness(BaseModel):
    status: Literal["ready", "degraded", "not ready"] = Field(
        description="'degraded': ready, but a dependency that only some routes need is down (see `degraded`)"
    )
    checks: dict[str, bool] = Field(description="each condition and whether it holds (redis: informational)")
    degraded: list[str] = Field(default_factory=list, description="what does not work now, and what still does")
    devices: list[DeviceStatus] = Field(
        default_factory=list, description="each executor of the pool; ready while at least one is alive"
    )


class JobParams(BaseModel):
    """Form fields of POST /v1/jobs (beside the uploaded file)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None, description="model id; default: the service's default model (CERTSERVE_DEFAULT_MODEL)"
    )
    n0: int | None = Field(
        None,
        ge=1,
        description="selection samples per image; default 100 (16 in mode 'radius'), at most CERTSERVE_MAX_N",
    )
    n: int | None = Field(
        None, ge=1, description="estimation samples per image; default 100,000, at most CERTSERVE_MAX_N"
    )
    alpha: float | None = Field(None, gt=0, lt=0.5, description="failure probability per image; default 0.001")
    seed: int | None = Field(None, ge=0, lt=2**63, description="noise seed of the job; default: a fresh random one")
    mode: Literal["fixed", "adaptive"] = Field("fixed", description="as for POST /v1/certify, for every image")
    radius: float | None = Field(
        None, ge=0, allow_inf_nan=False, description="as for POST /v1/certify: each row gets certified_at_radius"
    )
    tolerance: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="as for POST /v1/certify (adaptive mode without radius)"
    )


class SigningKey(BaseModel):
    algorithm: str = Field(description="signature scheme: Ed25519 over service.signing.canonical_payload")
    key_id: str = Field(description="first 16 hex digits of the SHA-256 of the raw public key")
    public_key_pem: str = Field(description="the public key, SubjectPublicKeyInfo PEM")
