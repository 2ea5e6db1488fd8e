"""Bodies of the Open Inference Protocol (KServe v2 REST) as this service speaks it (service/http/routes_v2.py).

The protocol's own shapes: tensors are ``{name, shape, datatype, data | parameters.binary_data_size}``.
Randomized smoothing's settings travel in the request's ``parameters``; every per-input answer
field the protocol has no tensor for travels whole in the BYTES output ``answer`` (the /v1 JSON).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

INPUT_NAME = "input"
INPUT_DATATYPE = "FP32"


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 for a dimension of any size (the batch)")


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str] = Field(description="the checkpoint's sha256")
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any] = Field(default_factory=dict, description="σ, classes and the smoothing defaults")


class ModelReady(BaseModel):
    name: str
    ready: bool


class InferInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    shape: list[int] = Field(description="[C, H, W] of the model, or [N, C, H, W] for N inputs")
    datatype: str = Field(description="FP32: pixel values in [0, 1]")
    parameters: dict[str, Any] | None = Field(None, description="binary_data_size: the tensor follows the JSON")
    data: list[Any] | None = Field(None, description="the values, flat (row-major) or nested")


class RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    parameters: dict[str, Any] | None = Field(None, description="binary_data: true for raw bytes after the JSON")


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    parameters: dict[str, Any] | None = Field(
        None,
        description="mode (predict | fixed | adaptive; default fixed), n0, n, alpha, radius, tolerance, seed, as in "
        "/v1; priority (interactive | batch, or Triton's integer level: 2 and above = batch), timeout_s (or "
        "Triton's timeout in microseconds); binary_data_output",
    )
    inputs: list[InferInput]
    outputs: list[RequestedOutput] | None = Field(None, description="the outputs wanted; default: all of the mode's")


class InferOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[InferOutput]


class ErrorV2(BaseModel):
    error: str = Field(description="what was wrong, in one sentence")
