"""Turn request bytes into the model's input: a float32 tensor (C, H, W) in [0, 1] pixel space.

Two sources: an encoded image (PNG, JPEG, ... via Pillow) or a raw array of pixel values with
its shape. Every problem with the input raises ``DecodeError`` carrying the HTTP status and a
message that says what was wrong, so that bad input never turns into a 500.

Images are converted to the model's channel count (L for one channel, RGB for three; an alpha
channel is dropped). A height/width that differs from the model's is an error unless the caller
asked for resizing, in which case the image is resampled to the model's resolution (bilinear,
antialiased). Pixel counts are checked from the header, before any pixel is decoded, so a small
file claiming a huge image (a decompression bomb) costs nothing.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from service.messages import shown

# Status codes of the errors below (RFC 9110 names).
CONTENT_TOO_LARGE = 413
UNSUPPORTED_MEDIA_TYPE = 415
UNPROCESSABLE = 422
MAX_SIDE = 1 << 16  # largest size of one dimension of a raw array: bounded before any product is formed


class DecodeError(Exception):
    """The input cannot become a model input; ``status_code`` is the HTTP status to answer with."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message


def format_shape(shape: Sequence[int]) -> str:
    """(C, H, W) written as 'C×H×W' for messages."""
    return "×".join(str(d) for d in shape)


def decode_base64(text: str) -> bytes:
    """Bytes of a standard base64 string (a ``data:...;base64,`` prefix is allowed); 422 if invalid."""
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise DecodeError(UNPROCESSABLE, f"image_base64 is not valid base64: {e}") from None


def decode_image(data: bytes, *, input_shape: tuple[int, int, int], max_pixels: int, resize: bool) -> torch.Tensor:
    """Decode an encoded image (any format Pillow reads) into a float32 tensor ``input_shape`` in [0, 1].

    8-bit images map 0..255 to 0..1, 16-bit grayscale maps 0..65535 to 0..1. The first frame of
    an animated image is used. Raises DecodeError: 415 for bytes that are no image Pillow knows,
    413 for an image of more than ``max_pixels`` pixels, 422 for a corrupt or truncated image
    or (when ``resize`` is False) a height/width other than the model's.
    """
    if not data:
        raise DecodeError(UNPROCESSABLE, "the image is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except UnidentifiedImageError:
        raise DecodeError(
            UNSUPPORTED_MEDIA_TYPE, "the file is not an image format the service can read (send PNG, JPEG, ...)"
        ) from None
    except Image.DecompressionBombError as e:  # Pillow's own absolute limit, far above ours
        raise DecodeError(CONTENT_TOO_LARGE, f"image too large ({e}); the limit is {max_pixels} pixels") from None
    except (OSError, SyntaxError, ValueError) as e:  # a recognised header that is malformed
        raise DecodeError(UNPROCESSABLE, f"the image header is corrupt: {e}") from None
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise DecodeError(
                CONTENT_TOO_LARGE,
                f"image is {width}×{height} = {width * height} pixels; the limit is {max_pixels} pixels",
            )
        try:
            image.load()
            pixels = _pixels(image, channels=input_shape[0])
        except DecodeError:
            raise
        except Exception as e:  # Pillow's decoders raise OSError, SyntaxError, ValueError, struct.error, ...
            raise DecodeError(
                UNPROCESSABLE, f"the {image.format or 'image'} data is corrupt or truncated: {type(e).__name__}: {e}"
            ) from None
    return fit_to_shape(pixels, input_shape, resize=resize)


def _pixels(image: Image.Image, *, channels: int) -> torch.Tensor:
    """The image as float32 (channels, H, W) in [0, 1]."""
    if image.mode.startswith("I;16"):  # 16-bit grayscale: keep its precision instead of clipping to 8 bits
        gray = torch.from_numpy(np.asarray(image, dtype=np.float32) / 65535.0).unsqueeze(0)
        return gray.expand(channels, -1, -1).contiguous()
    if image.mode in ("I", "F"):  # 32-bit ints or floats: no agreed range to map onto [0, 1]
        raise DecodeError(
            UNSUPPORTED_MEDIA_TYPE,
            f"images with 32-bit pixels (mode {image.mode}) are not supported: send 8- or 16-bit images, "
            "or a raw array in [0, 1]",
        )
    if channels not in (1, 3):
        raise DecodeError(UNPROCESSABLE, f"the model takes {channels} channels; only 1 (L) or 3 (RGB) can be decoded")
    array = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)  # (H, W) or (H, W, 3)
    tensor = torch.from_numpy(array.copy()).to(torch.float32).div_(255.0)
    return tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1).contiguous()


def decode_array(
    values: Sequence, shape: Sequence[int], *, input_shape: tuple[int, int, int], resize: bool
) -> torch.Tensor:
    """A raw pixel array into a float32 tensor ``input_shape``.

    ``values`` is flat (row-major) or nested; ``shape`` is (C, H, W), or (H, W) for one channel.
    Values must be finite numbers in [0, 1]. Raises DecodeError (422) naming the problem: a bad
    shape, a value count that does not match it, non-numbers, NaN/inf, values out of range, a
    channel count other than the model's, or (when ``resize`` is False) another height/width.
    """
    shape = tuple(shape)
    if len(shape) not in (2, 3) or any(not 0 < d <= MAX_SIDE for d in shape):
        raise DecodeError(
            UNPROCESSABLE,
            f"shape must be (C, H, W) or (H, W) with positive sizes of at most {MAX_SIDE}, got {shown(list(shape))}",
        )
    try:
        array = np.asarray(values)
    except (ValueError, TypeError):  # ragged nesting
        array = None
    if array is None or array.dtype.kind not in "iuf":  # strings, null, booleans, objects
        raise DecodeError(UNPROCESSABLE, "array must hold only numbers, flat or nested in equal-length rows")
    array = array.astype(np.float64)
    expected = math.prod(shape)
    if array.size != expected:
        raise DecodeError(UNPROCESSABLE, f"array has {array.size} values but shape {list(shape)} needs {expected}")
    bad = ~np.isfinite(array)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise DecodeError(
            UNPROCESSABLE, f"array holds {int(bad.sum())} NaN or infinite values (first at flat index {first})"
        )
    low, high = float(array.min()), float(array.max())
    if low < 0.0 or high > 1.0:
        raise DecodeError(
            UNPROCESSABLE, f"array values must lie in [0, 1] (pixel intensities); found min {low:g}, max {high:g}"
        )
    tensor = torch.from_numpy(array.reshape(shape).astype(np.float32))
    if tensor.ndim == 2:
        tensor = tensor.unsqueeze(0)
    if tensor.shape[0] != input_shape[0]:
        raise DecodeError(
            UNPROCESSABLE,
            f"input shape {format_shape(tensor.shape)} does not match the model's {format_shape(input_shape)} "
            f"(C×H×W): it has {tensor.shape[0]} channels, the model takes {input_shape[0]}",
        )
    return fit_to_shape(tensor, input_shape, resize=resize)


def fit_to_shape(x: torch.Tensor, input_shape: tuple[int, int, int], *, resize: bool) -> torch.Tensor:
    """x (C, H, W) with the model's channels, resampled to the model's H×W when ``resize`` is True.

    A different H×W without ``resize`` raises DecodeError (422) naming both shapes.
    """
    if tuple(x.shape) == tuple(input_shape):
        return x.contiguous()
    if not resize:
        raise DecodeError(
            UNPROCESSABLE,
            f"input shape {format_shape(x.shape)} does not match the model's {format_shape(input_shape)} (C×H×W); "
            "send an image of the model's size or set resize=true",
        )
    # Bilinear with antialiasing averages over the source pixels when shrinking (no aliasing).
    resized = F.interpolate(
        x.unsqueeze(0), size=tuple(input_shape[1:]), mode="bilinear", antialias=True, align_corners=False
    )
    return resized.squeeze(0).clamp_(0.0, 1.0).contiguous()
