"""Decoding request bytes into model inputs: exact pixel values, shape rules, and every bad input's error."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from payloads import bomb_png, encode_image
from PIL import Image

from service.decoding import DecodeError, decode_array, decode_base64, decode_image

GRAY = (1, 28, 28)
RGB = (3, 8, 8)
MAX_PIXELS = 4096 * 4096


def decode(data: bytes, shape: tuple[int, int, int] = GRAY, resize: bool = False) -> torch.Tensor:
    return decode_image(data, input_shape=shape, max_pixels=MAX_PIXELS, resize=resize)


def error_of(call, *args, **kwargs) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        call(*args, **kwargs)
    return info.value


def test_png_gray_pixels_map_to_unit_interval_exactly() -> None:
    pixels = np.arange(28 * 28, dtype=np.uint16).reshape(28, 28) % 256
    x = decode(encode_image(pixels.astype(np.uint8)))
    assert x.dtype == torch.float32 and tuple(x.shape) == GRAY
    assert torch.equal(x[0], torch.from_numpy(pixels.astype(np.float32)) / 255.0)


def test_rgb_png_keeps_channel_order() -> None:
    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    pixels[..., 0], pixels[..., 1], pixels[..., 2] = 255, 128, 0
    x = decode(encode_image(pixels), RGB)
    assert x[0].eq(1.0).all() and x[1].eq(128 / 255).all() and x[2].eq(0.0).all()


def test_color_image_is_converted_to_the_models_channels() -> None:
    rgb = np.full((28, 28, 3), 200, dtype=np.uint8)
    x = decode(encode_image(rgb))
    assert tuple(x.shape) == GRAY
    assert torch.allclose(x, torch.full(GRAY, 200 / 255))  # gray stays gray under L conversion
    gray = decode(encode_image(np.full((8, 8), 51, dtype=np.uint8)), RGB)
    assert tuple(gray.shape) == RGB and torch.allclose(gray, torch.full(RGB, 0.2))


def test_jpeg_decodes() -> None:
    x = decode(encode_image(np.full((28, 28), 128, dtype=np.uint8), "JPEG"))
    assert tuple(x.shape) == GRAY and (x - 128 / 255).abs().max() < 0.02


def test_sixteen_bit_png_keeps_its_precision() -> None:
    pixels = (np.arange(28 * 28).reshape(28, 28) * 80).astype(np.uint16)
    image = Image.fromarray(pixels)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    x = decode(buffer.getvalue())
    assert torch.allclose(x[0], torch.from_numpy(pixels.astype(np.float32) / 65535.0))


def test_wrong_size_is_422_naming_both_shapes() -> None:
    error = error_of(decode, encode_image(np.zeros((32, 30), dtype=np.uint8)))
    assert error.status_code == 422
    assert "1×32×30" in error.message and "1×28×28" in error.message and "resize=true" in error.message


def test_resize_brings_any_size_to_the_models() -> None:
    x = decode(encode_image(np.full((56, 70), 255, dtype=np.uint8)), resize=True)
    assert tuple(x.shape) == GRAY and torch.allclose(x, torch.ones(GRAY))


def test_not_an_image_is_415() -> None:
    error = error_of(decode, b"hello, this is text")
    assert error.status_code == 415 and "not an image format" in error.message


def test_empty_file_is_422() -> None:
    error = error_of(decode, b"")
    assert error.status_code == 422 and "empty" in error.message


def test_truncated_png_is_422() -> None:
    data = encode_image(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8))
    error = error_of(decode, data[: len(data) // 2])
    assert error.status_code == 422 and "corrupt or truncated" in error.message


def test_pixel_bomb_is_refused_from_the_header() -> None:
    error = error_of(decode, bomb_png(5000, 5000))  # 25 M pixels claimed in a few dozen bytes
    assert error.status_code == 413 and "5000×5000" in error.message and str(MAX_PIXELS) in error.message
    huge = error_of(decode, bomb_png(100_000, 100_000))  # beyond even Pillow's own limit
    assert huge.status_code == 413 and "10000000000 pixels" in huge.message and str(MAX_PIXELS) in huge.message


def test_base64_roundtrip_and_data_url() -> None:
    data = encode_image(np.zeros((28, 28), dtype=np.uint8))
    assert decode_base64(base64.b64encode(data).decode()) == data
    assert decode_base64("data:image/png;base64," + base64.b64encode(data).decode()) == data
    error = error_of(decode_base64, "not base64!!")
    assert error.status_code == 422 and "base64" in error.message


def test_array_flat_and_nested_agree() -> None:
    values = np.random.default_rng(1).random(GRAY)
    flat = decode_array(values.ravel().tolist(), [1, 28, 28], input_shape=GRAY, resize=False)
    nested = decode_array(values.tolist(), [1, 28, 28], input_shape=GRAY, resize=False)
    two_d = decode_array(values[0].tolist(), [28, 28], input_shape=GRAY, resize=False)
    assert torch.equal(flat, nested) and torch.equal(flat, two_d)
    assert torch.equal(flat, torch.from_numpy(values.astype(np.float32)))


@pytest.mark.parametrize(
    ("values", "shape", "needle"),
    [
        ([0.5] * 10, [1, 28, 28], "has 10 values but shape [1, 28, 28] needs 784"),
        ([float("nan")] + [0.5] * 783, [1, 28, 28], "NaN or infinite"),
        ([0.5] * 783 + [float("inf")], [1, 28, 28], "first at flat index 783"),
        ([1.5] + [0.5] * 783, [1, 28, 28], "must lie in [0, 1]"),
        ([-0.1] + [0.5] * 783, [1, 28, 28], "min -0.1"),
        (["a"] * 784, [1, 28, 28], "only numbers"),
        ([None] * 784, [1, 28, 28], "only numbers"),
        ([[0.5, 0.5], [0.5]], [2, 2], "only numbers"),
        ([0.5] * 784, [1, 1, 28, 28], "shape must be (C, H, W) or (H, W)"),
        ([0.5] * 784, [-1, 28, 28], "positive sizes"),
        ([0.5] * 3 * 784, [3, 28, 28], "3 channels, the model takes 1"),
        ([0.5] * 900, [1, 30, 30], "1×30×30 does not match the model's 1×28×28"),
    ],
)
def test_bad_arrays_are_422_with_a_reason(values: list, shape: list[int], needle: str) -> None:
    error = error_of(decode_array, values, shape, input_shape=GRAY, resize=False)
    assert error.status_code == 422 and needle in error.message


def test_array_resize_changes_height_and_width_only() -> None:
    x = decode_array([0.25] * 900, [1, 30, 30], input_shape=GRAY, resize=True)
    assert tuple(x.shape) == GRAY and torch.allclose(x, torch.full(GRAY, 0.25))
    error = error_of(decode_array, [0.5] * 3 * 900, [3, 30, 30], input_shape=GRAY, resize=True)
    assert "channels" in error.message
