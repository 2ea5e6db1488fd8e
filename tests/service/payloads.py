"""Request payloads for the service tests: encoded images, crafted bad files."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def encode_image(pixels: np.ndarray, image_format: str = "PNG") -> bytes:
    """uint8 pixels (H, W) or (H, W, 3) encoded as an image file."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, image_format)
    return buffer.getvalue()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width``×``height`` 8-bit gray pixels (a decompression bomb's shape)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data = zlib.compress(b"\x00" * 64)  # far fewer rows than claimed: decoding it would fail, if ever tried
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")
