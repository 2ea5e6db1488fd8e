"""bench.paper_server: the paper's loop behind HTTP gives, for a seed, the answer the loop gives in process."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from fastapi.testclient import TestClient

from bench.baseline import paper_answer
from bench.client import image_body
from bench.inputs import pixels_to_tensor
from bench.paper_server import create_paper_app
from models.architectures import build_model
from models.checkpoint import save_checkpoint
from models.registry import load_model

MODEL_ID = "paper-tiny"
SIGMA = 0.25
ALPHA = 0.001


def save_spread_model(root: Path) -> None:
    """An untrained fmnist_resnet whose biases are shifted so that noisy copies of mid-gray split over the classes
    (a fresh network gives one class to nearly every sample, and every seed the same counts)."""
    torch.manual_seed(0)
    model = build_model("fmnist_resnet", 10, (0.286,), (0.353,)).eval()
    noise = torch.randn((256, 1, 28, 28), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model[1].fc.bias -= model(0.5 + SIGMA * noise).mean(dim=0)
    save_checkpoint(
        model,
        root / MODEL_ID,
        id=MODEL_ID,
        architecture="fmnist_resnet",
        dataset="fashion-mnist",
        classes=[str(i) for i in range(10)],
        input_shape=(1, 28, 28),
        sigma=SIGMA,
        normalization={"mean": [0.286], "std": [0.353]},
    )


def as_json(value: object) -> object:
    return json.loads(json.dumps(value))


def test_each_mode_answers_as_the_paper_loop_for_the_same_seed(tmp_path: Path) -> None:
    save_spread_model(tmp_path)
    pixels = np.full((1, 28, 28), 128, dtype=np.uint8)
    with TestClient(create_paper_app(tmp_path, MODEL_ID, torch.device("cpu"))) as client:
        predict = client.post("/predict", json=image_body(pixels, MODEL_ID, 7, n=1_200, alpha=ALPHA))
        certify = client.post("/certify", json=image_body(pixels, MODEL_ID, 8, n0=100, n=1_500, alpha=ALPHA))
        other_seed = client.post("/predict", json=image_body(pixels, MODEL_ID, 9, n=1_200, alpha=ALPHA))
    assert predict.status_code == certify.status_code == other_seed.status_code == 200

    model, manifest = load_model(tmp_path, MODEL_ID)
    x = pixels_to_tensor(pixels)  # what the server decodes from the PNG, exactly
    common = dict(alpha=ALPHA)
    expected_predict = paper_answer(model, manifest, x, kind="predict", n0=0, n=1_200, seed=7, **common)
    expected_certify = paper_answer(model, manifest, x, kind="certify", n0=100, n=1_500, seed=8, **common)
    assert predict.json() == as_json(asdict(expected_predict))
    assert certify.json() == as_json(asdict(expected_certify))
    # The counts are not degenerate (several classes) and follow the seed: a match means the same samples.
    counts = predict.json()["counts"]
    assert sum(counts) == 1_200 and sum(c > 0 for c in counts) >= 3
    assert other_seed.json()["counts"] != counts
    assert sum(certify.json()["selection_counts"]) == 100 and sum(certify.json()["estimation_counts"]) == 1_500


def test_the_noop_endpoint_reads_the_body_and_answers_empty(tmp_path: Path) -> None:
    save_spread_model(tmp_path)
    with TestClient(create_paper_app(tmp_path, MODEL_ID, torch.device("cpu"))) as client:
        assert client.post("/noop", json={"anything": [1, 2, 3]}).json() == {}
        assert client.get("/healthz").json() == {"status": "ok"}
