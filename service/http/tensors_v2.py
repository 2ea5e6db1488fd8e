"""Tensors of the Open Inference Protocol: the input tensor as model inputs, answers as output tensors.

JSON ``data`` is flat (row-major) or nested; binary data (the protocol's binary tensor extension)
is little-endian, BYTES elements each prefixed by their length as a little-endian uint32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from service.decoding import UNPROCESSABLE, DecodeError, decode_array
from service.http.schemas import CertifyResponse, PredictResponse
from service.http.schemas_v2 import INPUT_DATATYPE, INPUT_NAME, InferOutput, InferRequest

Answer = PredictResponse | CertifyResponse


@dataclass(frozen=True)
class OutputSpec:
    """One output tensor: its datatype, and a row of it from one input's answer (a scalar or a per-class list)."""

    datatype: str
    row: Callable[[Any], Any]
    per_class: bool = False


def _label(answer: Answer) -> int:
    return -1 if answer.label is None else answer.label


ANSWER = OutputSpec("BYTES", lambda a: a.model_dump_json())
PREDICT_OUTPUTS = {
    "label": OutputSpec("INT64", _label),
    "abstained": OutputSpec("BOOL", lambda a: a.abstained),
    "p_value": OutputSpec("FP64", lambda a: a.p_value),
    "counts": OutputSpec("INT64", lambda a: a.counts, per_class=True),
    "answer": ANSWER,
}
CERTIFY_OUTPUTS = {
    "label": OutputSpec("INT64", _label),
    "radius": OutputSpec("FP64", lambda a: a.radius),
    "p_a_lower": OutputSpec("FP64", lambda a: a.p_a_lower),
    "abstained": OutputSpec("BOOL", lambda a: a.abstained),
    "certified_at_radius": OutputSpec("BOOL", lambda a: bool(a.certified_at_radius)),
    "selection_counts": OutputSpec("INT64", lambda a: a.selection_counts, per_class=True),
    "estimation_counts": OutputSpec("INT64", lambda a: a.estimation_counts, per_class=True),
    "samples": OutputSpec("INT64", lambda a: a.samples),
    "answer": ANSWER,
}
NUMPY_TYPES = {"INT64": "<i8", "FP64": "<f8", "BOOL": "?"}


def input_tensors(
    body: InferRequest, binary: bytes, input_shape: tuple[int, int, int], resize: bool
) -> list[torch.Tensor]:
    """One tensor (C, H, W) per input row; DecodeError (422) naming what is wrong with the tensor."""
    if len(body.inputs) != 1:
        raise DecodeError(UNPROCESSABLE, f"give exactly one input tensor ({INPUT_NAME!r}), got {len(body.inputs)}")
    tensor = body.inputs[0]
    if tensor.datatype != INPUT_DATATYPE:
        raise DecodeError(UNPROCESSABLE, f"input datatype must be {INPUT_DATATYPE}, got {tensor.datatype!r}")
    shape = tensor.shape
    if len(shape) not in (3, 4) or any(d <= 0 for d in shape):
        raise DecodeError(UNPROCESSABLE, f"input shape must be [C, H, W] or [N, C, H, W], got {shape}")
    binary_size = (tensor.parameters or {}).get("binary_data_size")
    if binary_size is not None:
        expected = 4 * math.prod(shape)
        if tensor.data is not None or binary_size != expected or len(binary) != expected:
            raise DecodeError(
                UNPROCESSABLE,
                f"binary input of shape {shape} needs {expected} bytes (FP32) and no data; binary_data_size is "
                f"{binary_size}, {len(binary)} bytes follow the JSON",
            )
        values: Any = np.frombuffer(binary, dtype="<f4")
    elif tensor.data is None or binary:
        raise DecodeError(UNPROCESSABLE, "the input needs its values: data, or binary_data_size and the bytes")
    else:
        try:
            values = np.asarray(tensor.data)
        except (ValueError, TypeError):
            raise DecodeError(UNPROCESSABLE, "input data must hold only numbers, in equal-length rows") from None
    if values.size != math.prod(shape):
        raise DecodeError(UNPROCESSABLE, f"input has {values.size} values but shape {shape} needs {math.prod(shape)}")
    image_shape = shape[-3:]
    rows = values.reshape(shape[0] if len(shape) == 4 else 1, -1)
    return [decode_array(row, image_shape, input_shape=input_shape, resize=resize) for row in rows]


def output_tensor(name: str, spec: OutputSpec, answers: list[Answer], binary: bool) -> tuple[InferOutput, bytes | None]:
    rows = [spec.row(a) for a in answers]
    shape = [len(rows), len(rows[0])] if spec.per_class else [len(rows)]
    flat = [v for row in rows for v in row] if spec.per_class else rows
    if not binary:
        return InferOutput(name=name, shape=shape, datatype=spec.datatype, data=flat), None
    if spec.datatype == "BYTES":  # each element: its length (uint32, little-endian), then its bytes
        encoded = [s.encode() for s in flat]
        blob = b"".join(len(e).to_bytes(4, "little") + e for e in encoded)
    else:
        blob = np.asarray(flat, dtype=NUMPY_TYPES[spec.datatype]).tobytes()
    output = InferOutput(name=name, shape=shape, datatype=spec.datatype, parameters={"binary_data_size": len(blob)})
    return output, blob
