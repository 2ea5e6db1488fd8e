"""Typed answers of the certserve API, mirroring the server's response schemas (service/http/schemas.py).

Every model accepts fields it does not know (``extra="allow"``): a newer server that adds a
field does not break an older client; the field is readable as an attribute all the same.
Radii are ℓ2 distances in [0, 1] pixel space at the model's input resolution, in σ's units.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from certserve_client.signatures import verify_answer

JOB_FINAL_STATES = ("done", "cancelled", "failed")


class ServerModel(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class Answer(ServerModel):
    """What PREDICT and CERTIFY answers share. ``label`` is None when the answer abstained."""

    model: str
    checkpoint_sha256: str
    label: int | None
    class_name: str | None
    abstained: bool
    alpha: float
    sigma: float
    seed: int | None = None
    seed_source: Literal["server", "client"] | str | None = None
    manifest_digest: str | None = None
    precision: str | None = None
    procedure: str | None = None
    input_digest: str | None = None
    cached: bool = False
    queued_s: float = 0.0
    compute_s: float = 0.0
    _raw: dict[str, Any] = PrivateAttr(default_factory=dict)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Answer:
        """The answer as parsed from the server's JSON, keeping that JSON (the signature covers it)."""
        answer = cls.model_validate(body)
        answer._raw = dict(body)
        return answer

    @property
    def raw(self) -> dict[str, Any]:
        """The answer exactly as the server sent it."""
        return dict(self._raw)


class Prediction(Answer):
    """PREDICT: the smoothed classifier's label with probability ≥ 1 − α, or an abstention."""

    p_value: float
    counts: list[int]
    n: int


class Certificate(Answer):
    """CERTIFY: a label constant within ``radius`` of the input with probability ≥ 1 − α, or an abstention."""

    mode: Literal["fixed", "adaptive"] | str
    radius: float
    p_a_lower: float
    top_class: int | None = None
    selection_counts: list[int]
    estimation_counts: list[int]
    n0: int
    n: int
    n_max: int
    samples: int
    target_radius: float | None = None
    certified_at_radius: bool | None = None
    max_certifiable_radius: float | None = None
    signed_at: str | None = None
    signature: str | None = Field(None, description="base64 Ed25519 signature; None when the server signs nothing")

    def verify(self, public_key_pem: bytes | str) -> bool:
        """Whether the server's ``signature`` covers this certificate as it arrived (needs ``cryptography``)."""
        return verify_answer(self._raw, public_key_pem)

    @property
    def certified(self) -> bool:
        """Whether the answer certifies anything: a label, and in decision mode certified at ``target_radius``."""
        if self.abstained:
            return False
        return self.certified_at_radius is not False


class ModelInfo(ServerModel):
    id: str
    dataset: str
    architecture: str
    sigma: float
    classes: list[str]
    input_shape: tuple[int, int, int]
    sha256: str
    device: str
    batch_size: int
    samples_per_second: float
    precision: str


class SigningKey(ServerModel):
    """GET /v1/signing-key: the public key certificates are signed with."""

    algorithm: str
    key_id: str
    public_key_pem: str


class JobCreated(ServerModel):
    id: str
    status_url: str
    results_url: str


class JobStatus(ServerModel):
    """A batch job's state and progress; ``eta_s`` is None until the first image finished."""

    id: str
    state: str
    done: int
    total: int
    abstentions: int = 0
    eta_s: float | None = None
    model_id: str | None = None
    params: dict[str, Any] = {}
    error: str | None = None
    cancelled: bool | None = None  # set in the answer of a cancel: whether that call cancelled anything

    @property
    def finished(self) -> bool:
        return self.state in JOB_FINAL_STATES


class JobRow(ServerModel):
    """One image's certificate in a job: ``predict`` None = abstained; ``label``/``correct`` None without labels."""

    idx: int
    name: str | None = None
    label: int | None = None
    predict: int | None
    radius: float
    correct: bool | None = None
    time: float
    abstained: bool
    p_a_lower: float | None = None


class JobResults(ServerModel):
    id: str
    state: str
    results: list[JobRow]
