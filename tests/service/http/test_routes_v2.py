"""The Open Inference Protocol (/v2) against the real server, spoken by a client nobody here wrote: tritonclient."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from live_server import running_server
from payloads import encode_image
from tiny_model import TINY_CLASSES, TINY_ID, TINY_SHAPE
from tritonclient.utils import InferenceServerException

from service.signing import new_key, verify

pytestmark = pytest.mark.slow  # a server process

GRAY = np.full(TINY_SHAPE, 128 / 255, dtype=np.float32)  # exactly what a PNG of gray 128 decodes to
BLACK = np.zeros(TINY_SHAPE, dtype=np.float32)


@pytest.fixture(scope="module")
def server(tiny_registry: Path, tuning_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("v2")
    new_key(folder / "signing.pem")
    env = {
        "CERTSERVE_SIGNING_KEY_FILE": str(folder / "signing.pem"),
        "CERTSERVE_MODEL_DIR": str(tiny_registry),
        "CERTSERVE_TUNING_CACHE": str(tuning_cache),
        "CERTSERVE_JOB_DB": str(folder / "jobs.sqlite3"),
        "CERTSERVE_DEVICE": "cpu",
        "CERTSERVE_PRECISION": "float32",
    }
    with running_server(env, folder / "server.log") as base:
        yield base


@pytest.fixture
def client(server: str) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(url=server.removeprefix("http://"), network_timeout=120.0)
    yield c
    c.close()


def tensor(pixels: np.ndarray, binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("input", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels, binary_data=binary)
    return tensor


def test_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata()["name"] == "certserve"
    assert client.is_model_ready(TINY_ID) and not client.is_model_ready("nope")
    metadata = client.get_model_metadata(TINY_ID)
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": list(TINY_SHAPE)}]
    outputs = {o["name"]: o for o in metadata["outputs"]}
    assert outputs["label"]["datatype"] == "INT64" and outputs["radius"]["datatype"] == "FP64"
    assert outputs["estimation_counts"]["shape"] == [-1, len(TINY_CLASSES)] and outputs["answer"]["datatype"] == "BYTES"
    assert client.get_model_metadata(TINY_ID, model_version=metadata["versions"][0])["name"] == TINY_ID
    with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
        client.get_model_metadata("nope")


def test_certify_with_binary_tensors_shares_the_v1_cache(client: triton.InferenceServerClient, server: str) -> None:
    settings = {"n0": 64, "n": 401}  # server randomness: the answer is shared through the cache
    result = client.infer(TINY_ID, [tensor(GRAY[None])], parameters=settings)  # binary in, binary out
    label, radius = result.as_numpy("label"), result.as_numpy("radius")
    assert label.tolist() == [0] and radius.shape == (1,) and radius[0] > 0
    assert result.as_numpy("abstained").tolist() == [False] and result.as_numpy("p_a_lower")[0] > 0.5
    counts = result.as_numpy("estimation_counts")
    assert counts.shape == (1, len(TINY_CLASSES)) and counts.sum() == 401
    (answer,) = [json.loads(a) for a in result.as_numpy("answer")]
    assert answer["radius"] == radius[0] and answer["estimation_counts"] == counts[0].tolist()
    assert answer["mode"] == "fixed" and answer["seed_source"] == "server" and not answer["cached"]
    public_key = httpx.get(f"{server}/v1/signing-key").json()["public_key_pem"]
    assert verify(answer, public_key)  # a /v2 certificate is signed like a /v1 one
    # The same question over /v1 (a PNG of the same pixels) is answered from the same cache.
    png = encode_image(np.full(TINY_SHAPE[1:], 128, dtype=np.uint8))
    v1 = httpx.post(f"{server}/v1/certify", files={"file": ("g.png", png)}, data={"n0": 64, "n": 401}, timeout=60)
    assert v1.json()["cached"] is True and v1.json()["estimation_counts"] == answer["estimation_counts"]


def test_predict_a_batch_as_json(client: triton.InferenceServerClient) -> None:
    batch = np.stack([GRAY, BLACK])  # [2, 1, 28, 28]
    wanted = [triton.InferRequestedOutput(name, binary_data=False) for name in ("label", "abstained", "counts")]
    result = client.infer(
        TINY_ID, [tensor(batch, binary=False)], outputs=wanted, parameters={"mode": "predict", "n": 256, "seed": 20190}
    )
    assert result.as_numpy("label").tolist() == [0, -1]  # the black image is a near-tie: PREDICT abstains
    assert result.as_numpy("abstained").tolist() == [False, True]
    assert result.as_numpy("counts").sum(axis=1).tolist() == [256, 256]
    assert {o["name"] for o in result.get_response()["outputs"]} == {"label", "abstained", "counts"}


def test_adaptive_radius_decision(client: triton.InferenceServerClient) -> None:
    settings = {"mode": "adaptive", "radius": 0.01, "n": 3200, "seed": 5}
    result = client.infer(TINY_ID, [tensor(GRAY)], parameters=settings)  # [C, H, W]: one input
    assert result.as_numpy("certified_at_radius").tolist() == [True]
    assert result.as_numpy("samples")[0] < 100 + 3200


@pytest.mark.parametrize(
    ("pixels", "datatype", "settings", "message"),
    [
        (np.zeros((1, 5, 5), np.float32), "FP32", {}, "does not match the model's 1×28×28"),
        (GRAY.astype(np.float64), "FP64", {}, "datatype must be FP32"),
        (GRAY + 1.0, "FP32", {}, r"must lie in \[0, 1\]"),
        (GRAY, "FP32", {"alpha": 0.7}, "alpha: Input should be less than 0.5"),
        (GRAY, "FP32", {"mode": "guess"}, "mode must be one of predict, fixed, adaptive"),
        (GRAY, "FP32", {"lucky": 1}, "lucky: Extra inputs are not permitted"),
    ],
)
def test_bad_requests_are_422_with_the_reason(
    client: triton.InferenceServerClient, pixels: np.ndarray, datatype: str, settings: dict, message: str
) -> None:
    tensor = triton.InferInput("input", list(pixels.shape), datatype)
    tensor.set_data_from_numpy(pixels)
    with pytest.raises(InferenceServerException, match=message) as raised:
        client.infer(TINY_ID, [tensor], parameters=settings)
    assert raised.value.status() == "422"


def test_errors_use_the_protocols_shape(server: str) -> None:
    missing = httpx.get(f"{server}/v2/models/nope/ready")
    assert missing.status_code == 404 and "unknown model" in missing.json()["error"]
    assert httpx.get(f"{server}/v2/no/such/route").json() == {"error": "Not Found"}
    assert "detail" in httpx.get(f"{server}/v1/models/nope").json()  # /v1 keeps its own shape
    body = {"inputs": [{"name": "input", "shape": [1, 28, 28], "datatype": "FP32"}]}
    no_data = httpx.post(f"{server}/v2/models/{TINY_ID}/infer", json=body)
    assert no_data.status_code == 422 and "needs its values" in no_data.json()["error"]


def test_tritons_priority_and_timeout(client: triton.InferenceServerClient, server: str) -> None:
    batch = client.infer(TINY_ID, [tensor(GRAY)], parameters={"mode": "predict", "n": 128}, priority=2)
    assert json.loads(batch.as_numpy("answer")[0])["n"] == 128
    with pytest.raises(InferenceServerException, match="remaining work was dropped") as raised:
        client.infer(TINY_ID, [tensor(GRAY)], parameters={"n": 100_000}, timeout=300_000)  # µs: 0.3 s
    assert raised.value.status() == "504"
    body = {
        "parameters": {"priority": "urgent"},
        "inputs": [{"name": "input", "shape": [1, 28, 28], "datatype": "FP32", "data": GRAY.ravel().tolist()}],
    }
    refused = httpx.post(f"{server}/v2/models/{TINY_ID}/infer", json=body)
    assert refused.status_code == 422 and "priority" in refused.json()["error"]
