"""Parse a batch job's upload into model inputs: a zip or tar of images, or an .npz of arrays.

Nothing is ever written to disk: entries are read into memory one by one, so names such as
``../../etc/passwd`` or ``/abs/x.png`` are just labels. Archive bombs are stopped before they
cost memory: entry counts and declared sizes are checked first, an entry that claims to
compress more than ``MAX_RATIO``:1 is refused, and every decompressed byte is counted as it is
read, so an archive that lies about its sizes stops at ``max_total_bytes`` too.

Every problem raises ``UploadError`` with the HTTP status to answer with: 400 for a malformed
archive, 413 for one that is too large or has too many entries, 415 for an unknown container
or an entry that is no image, 422 for arrays of the wrong shape, type or values.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import torch

from service.decoding import DecodeError, decode_image, format_shape

MAX_RATIO = 200
"""Largest compression ratio accepted for an entry over ``RATIO_FLOOR`` bytes (images barely compress)."""
RATIO_FLOOR = 1 << 20
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
# Each opener decompresses lazily, as the stream is read.
_DECOMPRESSORS: dict[bytes, Callable[..., BinaryIO]] = {
    b"\x1f\x8b": gzip.open,
    b"BZh": bz2.open,
    b"\xfd7zXZ\x00": lzma.open,
}
# What a broken archive or compressed stream raises while being read.
_ARCHIVE_ERRORS = (
    zipfile.BadZipFile,
    tarfile.TarError,
    zlib.error,
    lzma.LZMAError,
    EOFError,
    OSError,
    NotImplementedError,
    RuntimeError,
    ValueError,
)


class UploadError(Exception):
    """The upload cannot become a job; ``status_code`` is the HTTP status to answer with."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message


@dataclass(frozen=True)
class ParsedUpload:
    """A job's inputs: ``images`` (N, C, H, W) float32 in [0, 1], optional true labels, one name per image."""

    images: torch.Tensor
    labels: list[int] | None
    names: list[str]


def parse_upload(
    filename: str,
    data: bytes,
    *,
    input_shape: tuple[int, int, int],
    max_images: int,
    max_pixels: int,
    max_total_bytes: int,
) -> ParsedUpload:
    """Decode an uploaded set of images for a model taking ``input_shape`` (C, H, W).

    Accepted: ``.zip`` or ``.tar[.gz|.bz2|.xz]`` of image files (decoded with Pillow, no
    resizing; images in name order, directories and macOS metadata skipped), or ``.npz`` with
    ``images`` of shape (N, C, H, W), (N, H, W, C) or, for one channel, (N, H, W), either uint8
    (0-255) or float in [0, 1], and optional integer ``labels`` (N,). The container is known by
    the file name, else sniffed. At most ``max_images`` images and ``max_total_bytes``
    decompressed bytes; images of at most ``max_pixels`` pixels. CPU-bound: call it in a thread.
    Raises UploadError.
    """
    if not data:
        raise UploadError(400, "the upload is empty (0 bytes)")
    name = filename.lower()
    if name.endswith(".npz"):
        return _parse_npz(
            _open_zip(data), max_images=max_images, max_total_bytes=max_total_bytes, input_shape=input_shape
        )
    if name.endswith(".zip") or (not name.endswith(TAR_SUFFIXES) and data.startswith(b"PK\x03\x04")):
        archive = _open_zip(data)
        if "images.npy" in archive.namelist():  # an .npz under another name
            return _parse_npz(archive, max_images=max_images, max_total_bytes=max_total_bytes, input_shape=input_shape)
        entries = _zip_entries(archive, max_images=max_images, max_total_bytes=max_total_bytes)
    elif name.endswith(TAR_SUFFIXES) or _looks_like_tar(data):
        entries = _tar_entries(data, max_images=max_images, max_total_bytes=max_total_bytes)
    else:
        raise UploadError(415, f"cannot tell what {filename!r} is: send a .zip or .tar(.gz) of images, or an .npz")
    return _decode_entries(entries, input_shape=input_shape, max_pixels=max_pixels)


# -- archives of image files -----------------------------------------------------------------


def _is_skipped(path: str) -> bool:
    """Directories' metadata that archivers add beside the images (macOS resource forks, dotfiles)."""
    parts = path.replace("\\", "/").split("/")
    return "__MACOSX" in parts or parts[-1].startswith(".") or parts[-1] == ""


def _check_count(count: int, max_images: int) -> None:
    if count > max_images:
        raise UploadError(413, f"the archive has more than {max_images} entries (the limit of images per job)")


def _too_large(max_total_bytes: int) -> UploadError:
    return UploadError(413, f"the upload decompresses to more than {max_total_bytes} bytes (the limit)")


def _read_at_most(f: BinaryIO, limit: int, max_total_bytes: int) -> bytes:
    """Read f to its end, but never more than ``limit`` bytes (413 beyond)."""
    data = f.read(limit + 1)
    if len(data) > limit:
        raise _too_large(max_total_bytes)
    return data


def _open_zip(data: bytes) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise UploadError(400, f"not a valid zip archive: {e}") from None


def _zip_entries(archive: zipfile.ZipFile, *, max_images: int, max_total_bytes: int) -> list[tuple[str, bytes]]:
    with archive:
        infos = [i for i in archive.infolist() if not i.is_dir() and not _is_skipped(i.filename)]
        _check_count(len(infos), max_images)
        _check_declared(infos, max_total_bytes)
        entries, used = [], 0
        for info in sorted(infos, key=lambda i: i.filename):
            try:
                with archive.open(info) as f:
                    blob = _read_at_most(f, max_total_bytes - used, max_total_bytes)
            except _ARCHIVE_ERRORS as e:
                raise UploadError(400, f"zip entry {info.filename!r} cannot be read: {e}") from None
            used += len(blob)
            entries.append((info.filename, blob))
    return entries


def _check_declared(infos: list[zipfile.ZipInfo], max_total_bytes: int) -> None:
    """Refuse from the central directory alone: total declared size, and suspicious ratios."""
    if sum(i.file_size for i in infos) > max_total_bytes:
        raise UploadError(413, f"the archive declares more than {max_total_bytes} uncompressed bytes (the limit)")
    for info in infos:
        if info.file_size > RATIO_FLOOR and info.file_size > MAX_RATIO * max(info.compress_size, 1):
            raise UploadError(
                413,
                f"zip entry {info.filename!r} compresses {info.file_size}:{info.compress_size}, "
                f"beyond {MAX_RATIO}:1 (an archive bomb?)",
            )


def _looks_like_tar(data: bytes) -> bool:
    return data[257:262] == b"ustar" or any(data.startswith(magic) for magic in _DECOMPRESSORS)


class _CountingReader:
    """A read-only stream that raises 413 once more than ``limit`` bytes came through it."""

    def __init__(self, raw: BinaryIO, limit: int, max_total_bytes: int) -> None:
        self.raw, self.limit, self.max_total_bytes, self.count = raw, limit, max_total_bytes, 0

    def read(self, size: int = -1) -> bytes:
        room = self.limit - self.count + 1  # one byte more than allowed reveals the overflow
        chunk = self.raw.read(room if size < 0 else min(size, room))
        self.count += len(chunk)
        if self.count > self.limit:
            raise _too_large(self.max_total_bytes)
        return chunk


def _tar_entries(data: bytes, *, max_images: int, max_total_bytes: int) -> list[tuple[str, bytes]]:
    """Regular files of a (compressed) tar, read as a stream with every decompressed byte counted."""
    raw: BinaryIO = io.BytesIO(data)
    for magic, open_decompressed in _DECOMPRESSORS.items():
        if data.startswith(magic):
            raw = open_decompressed(raw, "rb")
    # Headers and padding take up to 1 KiB per entry, plus the end-of-archive record.
    stream = _CountingReader(raw, max_total_bytes + 1024 * (max_images + 16) + 20480, max_total_bytes)
    entries, used, count = [], 0, 0
    try:
        with tarfile.open(fileobj=stream, mode="r|") as archive:  # type: ignore[call-overload]
            for member in archive:
                if not member.isfile() or _is_skipped(member.name):
                    continue  # directories and links carry no image; nothing is extracted anyway
                count += 1
                _check_count(count, max_images)
                if member.size > max_total_bytes - used:
                    raise _too_large(max_total_bytes)
                f = archive.extractfile(member)
                blob = _read_at_most(f, member.size, max_total_bytes) if f is not None else b""
                used += len(blob)
                entries.append((member.name, blob))
    except _ARCHIVE_ERRORS as e:
        raise UploadError(400, f"not a valid tar archive: {type(e).__name__}: {e}") from None
    return sorted(entries, key=lambda entry: entry[0])


def _decode_entries(
    entries: list[tuple[str, bytes]], *, input_shape: tuple[int, int, int], max_pixels: int
) -> ParsedUpload:
    if not entries:
        raise UploadError(422, "the archive holds no images")
    images = []
    for name, blob in entries:
        try:
            images.append(decode_image(blob, input_shape=input_shape, max_pixels=max_pixels, resize=False))
        except DecodeError as e:
            raise UploadError(e.status_code, f"entry {name!r}: {e.message}") from None
    return ParsedUpload(torch.stack(images), None, [_printable(name) for name, _ in entries])


def _printable(name: str) -> str:
    """The entry name without control characters, so it is safe to show in logs and results."""
    return "".join(c if c.isprintable() else "?" for c in name)


# -- .npz arrays -----------------------------------------------------------------------------


def _parse_npz(
    archive: zipfile.ZipFile, *, max_images: int, max_total_bytes: int, input_shape: tuple[int, int, int]
) -> ParsedUpload:
    with archive:
        members = {info.filename: info for info in archive.infolist()}
        if "images.npy" not in members:
            found = sorted(name.removesuffix(".npy") for name in members)
            raise UploadError(422, f"the .npz needs an array named 'images'; it holds {found}")
        wanted = [members[name] for name in ("images.npy", "labels.npy") if name in members]
        _check_declared(wanted, max_total_bytes)
        arrays = {info.filename.removesuffix(".npy"): _read_npy(archive, info, max_total_bytes) for info in wanted}
    images = _images_tensor(arrays["images"], input_shape, max_images)
    labels = _labels_list(arrays["labels"], len(images)) if "labels" in arrays else None
    return ParsedUpload(images, labels, [str(i) for i in range(len(images))])


def _read_npy(archive: zipfile.ZipFile, info: zipfile.ZipInfo, max_total_bytes: int) -> np.ndarray:
    name = info.filename.removesuffix(".npy")
    try:
        with archive.open(info) as f:
            blob = _read_at_most(f, max_total_bytes, max_total_bytes)
        return np.lib.format.read_array(io.BytesIO(blob), allow_pickle=False)
    except _ARCHIVE_ERRORS as e:  # ValueError also covers object arrays, which would need pickle
        raise UploadError(400, f"array {name!r} of the .npz cannot be read: {e}") from None


def _images_tensor(array: np.ndarray, input_shape: tuple[int, int, int], max_images: int) -> torch.Tensor:
    """(N, C, H, W) float32 in [0, 1] from any accepted layout and dtype; 413/422 otherwise."""
    c, h, w = input_shape
    if array.ndim == 3 and c == 1 and array.shape[1:] == (h, w):
        array = array[:, None]
    elif array.ndim == 4 and array.shape[1:] == (c, h, w):
        pass
    elif array.ndim == 4 and array.shape[1:] == (h, w, c):
        array = array.transpose(0, 3, 1, 2)
    else:
        layouts = "(N, C, H, W) or (N, H, W, C)" + (" or (N, H, W)" if c == 1 else "")
        raise UploadError(
            422,
            f"'images' has shape {list(array.shape)} but the model takes {format_shape(input_shape)} "
            f"(C×H×W) inputs: send {layouts}",
        )
    if len(array) == 0:
        raise UploadError(422, "'images' holds no images")
    if len(array) > max_images:
        raise UploadError(413, f"'images' holds {len(array)} images; the limit per job is {max_images}")
    if array.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(array)).to(torch.float32).div_(255.0)
    if array.dtype.kind != "f":
        raise UploadError(422, f"'images' has dtype {array.dtype}: send uint8 (0-255) or float (0-1)")
    bad = ~np.isfinite(array)
    if bad.any():
        first = int(np.argwhere(bad)[0][0])
        raise UploadError(422, f"'images' holds {int(bad.sum())} NaN or infinite values (first in image {first})")
    low, high = float(array.min()), float(array.max())
    if low < 0.0 or high > 1.0:
        raise UploadError(
            422, f"float 'images' must lie in [0, 1]; found min {low:g}, max {high:g} (send uint8 for 0-255)"
        )
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _labels_list(array: np.ndarray, count: int) -> list[int]:
    if array.shape != (count,) or array.dtype.kind not in "iu":
        raise UploadError(
            422,
            f"'labels' must be {count} integers (one per image); got dtype {array.dtype}, shape {list(array.shape)}",
        )
    if count and int(array.min()) < 0:
        raise UploadError(422, "'labels' must be class indices ≥ 0")
    return [int(v) for v in array]
