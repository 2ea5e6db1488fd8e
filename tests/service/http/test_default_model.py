"""Which model answers a request that names none."""

from types import SimpleNamespace

import pytest

from service.http.state import pick_default_model
from service.settings import Settings


def loaded(**kinds: str) -> dict:
    return {model_id: SimpleNamespace(manifest=SimpleNamespace(kind=kind)) for model_id, kind in kinds.items()}


MODELS = loaded(**{"fmnist-denoised": "composed", "fmnist-resnet": "classifier", "fmnist-wide": "classifier"})


def test_first_plain_classifier_rather_than_a_composed_model() -> None:
    # A composed model (denoiser + classifier) costs several forward passes a sample: not a default to fall into.
    assert pick_default_model(Settings(), MODELS) == "fmnist-resnet"
    assert pick_default_model(Settings(), loaded(a="composed")) == "a"


def test_the_setting_and_the_model_list_decide_first() -> None:
    assert pick_default_model(Settings(default_model="fmnist-wide"), MODELS) == "fmnist-wide"
    assert pick_default_model(Settings(models=["fmnist-denoised", "fmnist-resnet"]), MODELS) == "fmnist-denoised"
    with pytest.raises(RuntimeError, match="not among the loaded models"):
        pick_default_model(Settings(default_model="missing"), MODELS)
