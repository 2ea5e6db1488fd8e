"""Composed checkpoints served by the app: a denoiser in front of a noise-free classifier, and an ensemble.

The registry is built here: two σ = 0.25 classifiers, a denoiser and a classifier trained without
noise (untrained weights: the answers mean nothing, the plumbing is what is tested). The app
serves the servable models (the classifiers with σ > 0 and the two composed models, not the
parts on their own), and a certificate from a composed model equals the library's on the
composed module, which equals running its parts in sequence.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from tiny_model import TINY_CLASSES, TINY_SHAPE

from models.architectures import build_model
from models.checkpoint import save_checkpoint
from models.composed import save_composed
from models.registry import load_model
from service.http.app import create_app
from service.settings import Settings
from smoothing.core import certify
from smoothing.tuning import prepare_for_inference

SIGMA = 0.25
BATCH = 128
SEED = 7


def save_part(root: Path, model_id: str, arch: str, sigma: float, seed: int, kind: str = "classifier") -> None:
    torch.manual_seed(seed)
    pixel_space = kind == "denoiser"
    mean, std = ([0.0], [1.0]) if pixel_space else ([0.286], [0.353])
    model = build_model(arch, len(TINY_CLASSES), mean, std).eval()
    with torch.no_grad():
        if pixel_space:
            torch.nn.init.normal_(model[1].body[-2].weight, std=0.05)  # not the identity it starts as
        else:
            model[1].fc.weight.normal_(0, 1)  # logits that move with the input: counts spread over classes
    save_checkpoint(
        model,
        root / model_id,
        id=model_id,
        kind=kind,
        architecture=arch,
        dataset="fashion-mnist",
        classes=TINY_CLASSES,
        input_shape=TINY_SHAPE,
        sigma=sigma,
        normalization={"mean": mean, "std": std},
    )


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(registry root, tuning cache answering every servable model's sweep with BATCH)."""
    root = tmp_path_factory.mktemp("composed-registry")
    save_part(root, "a-sigma0.25", "fmnist_resnet", SIGMA, 1)
    save_part(root, "b-sigma0.25", "fmnist_resnet", SIGMA, 2)
    save_part(root, "dncnn-sigma0.25", "fmnist_dncnn", SIGMA, 3, kind="denoiser")
    save_part(root, "clean", "fmnist_resnet", 0.0, 4)
    save_composed(root, "denoised-sigma0.25", "sequential", [("dncnn-sigma0.25", "denoiser"), ("clean", "classifier")])
    save_composed(root, "ensemble-sigma0.25", "mean_softmax", [("a-sigma0.25", "member"), ("b-sigma0.25", "member")])
    cache = tmp_path_factory.mktemp("composed-tuning") / "tuning.json"
    for model_id in ("a-sigma0.25", "b-sigma0.25", "denoised-sigma0.25", "ensemble-sigma0.25"):
        model, manifest = load_model(root, model_id)
        prepare_for_inference(
            model, TINY_SHAPE, "cpu", cache_key=manifest.sha256, cache_file=cache, candidates=(BATCH,)
        )
    return root, cache


@pytest.fixture(scope="module")
def client(make_settings: Callable[..., Settings], registry: tuple[Path, Path]) -> Iterator[TestClient]:
    root, cache = registry
    with TestClient(create_app(make_settings(model_dir=root, models=[], tuning_cache=cache))) as c:
        yield c


def test_the_app_serves_composed_models_but_not_their_parts_alone(client: TestClient) -> None:
    models = {m["id"]: m for m in client.get("/v1/models").json()["models"]}
    assert sorted(models) == ["a-sigma0.25", "b-sigma0.25", "denoised-sigma0.25", "ensemble-sigma0.25"]
    assert models["denoised-sigma0.25"]["sigma"] == SIGMA
    assert models["denoised-sigma0.25"]["architecture"] == "sequential(fmnist_dncnn+fmnist_resnet)"


@pytest.mark.parametrize("model_id", ["denoised-sigma0.25", "ensemble-sigma0.25"])
def test_a_composed_model_certifies_through_the_service_as_in_the_library(
    client: TestClient, registry: tuple[Path, Path], model_id: str
) -> None:
    root, _ = registry
    pixels = np.random.default_rng(0).random(TINY_SHAPE, dtype=np.float32)
    x = torch.from_numpy(pixels)
    body = {"model": model_id, "array": pixels.ravel().tolist(), "shape": list(TINY_SHAPE), "n0": 64, "n": 512}
    response = client.post("/v1/certify", json=body | {"seed": SEED})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model"] == model_id and answer["sigma"] == SIGMA

    model, manifest = load_model(root, model_id)
    assert answer["checkpoint_sha256"] == manifest.sha256
    plan = client.app.state.services.engine.model(model_id).plan
    with torch.no_grad():  # the tuned module the service runs computes the composition of the parts
        if model_id.startswith("denoised"):
            denoiser, _ = load_model(root, "dncnn-sigma0.25")
            classifier, _ = load_model(root, "clean")
            expected = classifier(denoiser(x[None]))
        else:
            expected = model(x[None])
        torch.testing.assert_close(plan.model(x[None]), expected, atol=1e-4, rtol=1e-4)
    library = certify(
        plan.model,
        x,
        sigma=SIGMA,
        num_classes=len(TINY_CLASSES),
        n0=64,
        n=512,
        alpha=0.001,
        batch_size=plan.batch_size,
        seed=SEED,
        channels_last=plan.channels_last,
    )
    moved = sum(abs(a - b) for a, b in zip(answer["estimation_counts"], library.estimation_counts, strict=True)) // 2
    assert sum(answer["estimation_counts"]) == 512 and moved <= 2  # float rounding across batch compositions
