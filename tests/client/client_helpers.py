"""Inputs and observers shared by the client tests."""

from __future__ import annotations

import io
import time
import zipfile

import httpx
import numpy as np
from payloads import encode_image

API_KEY = "client-test-key"
OTHER_KEY = "client-test-other-key"
TIGHT_PENDING_SAMPLES = 4_000  # the tight server's queue bound
SHORT_TIMEOUT_S = 0.3  # the deadline server's request deadline


def gray() -> np.ndarray:
    """Mid-gray: the tiny model's noisy counts favour class 0 (certifies at small radii)."""
    return np.full((28, 28), 128, dtype=np.uint8)


def near_gray() -> np.ndarray:
    """Mid-gray with a fresh ±2 speckle: certifies like gray, and no earlier test cached its certificate."""
    return (128 + np.random.default_rng().integers(-2, 3, (28, 28))).astype(np.uint8)


def black() -> np.ndarray:
    """All black: a near-tie between two classes under noise (PREDICT abstains at n = 256)."""
    return np.zeros((28, 28), dtype=np.uint8)


def png(pixels: np.ndarray) -> bytes:
    return encode_image(pixels)


def images_zip(count: int) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(count):
            pixels = np.clip(128 + np.random.default_rng(i).integers(-30, 31, (28, 28)), 0, 255).astype(np.uint8)
            archive.writestr(f"image-{i}.png", encode_image(pixels))
    return buffer.getvalue()


class RecordingTransport(httpx.HTTPTransport):
    """The real HTTP transport, remembering the status of every answer (to see the client's retries)."""

    def __init__(self) -> None:
        super().__init__()
        self.statuses: list[int] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        self.statuses.append(response.status_code)
        return response


def pending_samples(base: str) -> float:
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith("certserve_pending_samples "):
            return float(line.split()[1])
    raise AssertionError("no certserve_pending_samples in /metrics")


def wait_for_pending(base: str, at_least: float, timeout_s: float = 10.0) -> None:
    """Return once the server holds at least ``at_least`` pending samples."""
    deadline = time.monotonic() + timeout_s
    while pending_samples(base) < at_least:
        assert time.monotonic() < deadline, "the server never queued the work"
        time.sleep(0.02)


def wait_until_idle(base: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while pending_samples(base) > 0:
        assert time.monotonic() < deadline, "work still pending"
        time.sleep(0.05)
