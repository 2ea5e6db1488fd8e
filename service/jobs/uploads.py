"""Parse a batch job's upload into model inputs: a zip or tar of images, or an .npz of arrays.

Nothing is ever written to disk: entries are read into memory one at a time and decoded at once
(the first bad one ends the parse), so names such as ``../../etc/passwd`` or ``/abs/x.png`` are
just labels and at most one entry's bytes are held per upload. Archive bombs are stopped before
they cost memory: entry counts and declared sizes are checked first, an entry or a whole archive
that claims to compress more than ``MAX_RATIO``:1 is refused, and every decompressed byte is
counted as it is read, so an archive that lies about its sizes stops at ``max_total_bytes`` too.
Across concurrent uploads, the bytes being decompressed at once are bounded by a shared
``DecodeBudget``: beyond it an upload is answered 503 with Retry-After.

Every problem raises ``UploadError`` with the HTTP status to answer with: 400 for a malformed
archive, 413 for one that is too large or has too many entries, 415 for an unknown container
or an entry that is no image, 422 for arrays of the wrong shape, type or values, 503 while
other uploads use the decoding budget.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import math
import tarfile
import threading
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import torch

from service.decoding import DecodeError, decode_image, format_shape
from service.messages import shown

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
    """The upload cannot become a job; ``status_code`` is the HTTP status to answer with
    (``retry_after_s`` set for a 503)."""

    def __init__(self, status_code: int, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.retry_after_s = retry_after_s


DECODE_RETRY_S = 2


class DecodeBudget:
    """Bytes being decompressed at once across every upload of the process (threads share it)."""

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError(f"limit must be > 0, got {limit}")
        self.limit = limit
        self._held = 0
        self._lock = threading.Lock()

    @property
    def held(self) -> int:
        return self._held

    @contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        """Hold ``nbytes`` of the budget while the block runs; 413 if more than the whole budget, 503 if
        other uploads hold too much now (never waits: a waiting upload would hold a worker thread)."""
        if nbytes > self.limit:
            raise UploadError(413, f"an entry of {nbytes} bytes is more than the {self.limit} decoded at once")
        with self._lock:
            if self._held + nbytes > self.limit:
                raise UploadError(
                    503,
                    f"the server is decoding other uploads ({self._held} of {self.limit} bytes); "
                    f"retry in {DECODE_RETRY_S} s",
                    retry_after_s=DECODE_RETRY_S,
                )
            self._held += nbytes
        try:
            yield
        finally:
            with self._lock:
                self._held -= nbytes


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
    budget: DecodeBudget | None = None,
) -> ParsedUpload:
    """Decode an uploaded set of images for a model taking ``input_shape`` (C, H, W).

    Accepted: ``.zip`` or ``.tar[.gz|.bz2|.xz]`` of image files (decoded with Pillow, no
    resizing; images in name order, directories and macOS metadata skipped), or ``.npz`` with
    ``images`` of shape (N, C, H, W), (N, H, W, C) or, for one channel, (N, H, W), either uint8
    (0-255) or float in [0, 1], and optional integer ``labels`` (N,). The container is known by
    the file name, else sniffed. At most ``max_images`` images and ``max_total_bytes``
    decompressed bytes; images of at most ``max_pixels`` pixels; the bytes decompressed at once
    count against ``budget`` (shared by concurrent uploads; None = this call's own, of
    ``max_total_bytes``). CPU-bound: call it in a thread. Raises UploadError.
    """
    if not data:
        raise UploadError(400, "the upload is empty (0 bytes)")
    budget = budget or DecodeBudget(max_total_bytes)
    name = filename.lower()
    npz = {"max_images": max_images, "max_total_bytes": max_total_bytes, "input_shape": input_shape, "budget": budget}
    if name.endswith(".npz"):
        return _parse_npz(_open_zip(data), **npz)
    if name.endswith(".zip") or (not name.endswith(TAR_SUFFIXES) and data.startswith(b"PK\x03\x04")):
        archive = _open_zip(data)
        if "images.npy" in archive.namelist():  # an .npz under another name
            return _parse_npz(archive, **npz)
        entries = _zip_entries(archive, max_images=max_images, max_total_bytes=max_total_bytes, budget=budget)
    elif name.endswith(TAR_SUFFIXES) or _looks_like_tar(data):
        entries = _tar_entries(data, max_images=max_images, max_total_bytes=max_total_bytes, budget=budget)
    else:
        raise UploadError(415, f"cannot tell what {shown(filename)} is: send a .zip or .tar(.gz) of images, or an .npz")
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


def _zip_entries(
    archive: zipfile.ZipFile, *, max_images: int, max_total_bytes: int, budget: DecodeBudget
) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each image entry in name order, one at a time: each holds its share of ``budget``
    until the consumer asks for the next."""
    with archive:
        infos = [i for i in archive.infolist() if not i.is_dir() and not _is_skipped(i.filename)]
        _check_count(len(infos), max_images)
        _check_declared(infos, max_total_bytes)
        used = 0
        for info in sorted(infos, key=lambda i: i.filename):
            with budget.hold(info.file_size):  # zipfile never returns more than the declared size
                try:
                    with archive.open(info) as f:
                        blob = _read_at_most(f, max_total_bytes - used, max_total_bytes)
                except _ARCHIVE_ERRORS as e:
                    raise UploadError(400, f"zip entry {shown(info.filename)} cannot be read: {e}") from None
                used += len(blob)
                yield info.filename, blob


def _check_declared(infos: list[zipfile.ZipInfo], max_total_bytes: int) -> None:
    """Refuse from the central directory alone: total declared size, and suspicious ratios of each entry
    and of the whole (many entries each just under the per-entry floor)."""
    declared = sum(i.file_size for i in infos)
    if declared > max_total_bytes:
        raise UploadError(413, f"the archive declares more than {max_total_bytes} uncompressed bytes (the limit)")
    compressed = sum(i.compress_size for i in infos)
    if declared > RATIO_FLOOR and declared > MAX_RATIO * max(compressed, 1):
        raise UploadError(
            413,
            f"the archive's entries compress {declared}:{compressed} in all, beyond {MAX_RATIO}:1 (an archive bomb?)",
        )
    for info in infos:
        if info.file_size > RATIO_FLOOR and info.file_size > MAX_RATIO * max(info.compress_size, 1):
            raise UploadError(
                413,
                f"zip entry {shown(info.filename)} compresses {info.file_size}:{info.compress_size}, "
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


def _tar_entries(
    data: bytes, *, max_images: int, max_total_bytes: int, budget: DecodeBudget
) -> Iterator[tuple[str, bytes]]:
    """Regular files of a (compressed) tar in archive order, read as a stream with every decompressed byte
    counted; each holds its share of ``budget`` until the consumer asks for the next."""
    raw: BinaryIO = io.BytesIO(data)
    for magic, open_decompressed in _DECOMPRESSORS.items():
        if data.startswith(magic):
            raw = open_decompressed(raw, "rb")
    # Headers and padding take up to 1 KiB per entry, plus the end-of-archive record.
    stream = _CountingReader(raw, max_total_bytes + 1024 * (max_images + 16) + 20480, max_total_bytes)
    used, count = 0, 0
    try:
        with tarfile.open(fileobj=stream, mode="r|") as archive:  # type: ignore[call-overload]
            for member in archive:
                if not member.isfile() or _is_skipped(member.name):
                    continue  # directories and links carry no image; nothing is extracted anyway
                count += 1
                _check_count(count, max_images)
                if member.size > max_total_bytes - used:
                    raise _too_large(max_total_bytes)
                with budget.hold(member.size):
                    f = archive.extractfile(member)
                    blob = _read_at_most(f, member.size, max_total_bytes) if f is not None else b""
                    used += len(blob)
                    yield member.name, blob
    except _ARCHIVE_ERRORS as e:
        raise UploadError(400, f"not a valid tar archive: {type(e).__name__}: {e}") from None


def _decode_entries(
    entries: Iterator[tuple[str, bytes]], *, input_shape: tuple[int, int, int], max_pixels: int
) -> ParsedUpload:
    """Decode each entry as it comes (the first that is no image ends it); images in name order."""
    decoded = []
    for name, blob in entries:
        try:
            decoded.append((name, decode_image(blob, input_shape=input_shape, max_pixels=max_pixels, resize=False)))
        except DecodeError as e:
            raise UploadError(e.status_code, f"entry {shown(name)}: {e.message}") from None
    if not decoded:
        raise UploadError(422, "the archive holds no images")
    decoded.sort(key=lambda entry: entry[0])
    return ParsedUpload(torch.stack([x for _, x in decoded]), None, [_printable(name) for name, _ in decoded])


def _printable(name: str) -> str:
    """The entry name without control characters, so it is safe to show in logs and results."""
    return "".join(c if c.isprintable() else "?" for c in name)


# -- .npz arrays -----------------------------------------------------------------------------


def _parse_npz(
    archive: zipfile.ZipFile,
    *,
    max_images: int,
    max_total_bytes: int,
    input_shape: tuple[int, int, int],
    budget: DecodeBudget,
) -> ParsedUpload:
    with archive:
        members = {info.filename: info for info in archive.infolist()}
        if "images.npy" not in members:
            found = sorted(name.removesuffix(".npy") for name in members)
            raise UploadError(422, f"the .npz needs an array named 'images'; it holds {shown(found)}")
        wanted = [members[name] for name in ("images.npy", "labels.npy") if name in members]
        _check_declared(wanted, max_total_bytes)
        with budget.hold(sum(info.file_size for info in wanted)):
            return _arrays_to_upload(archive, wanted, max_images, max_total_bytes, input_shape)


def _arrays_to_upload(
    archive: zipfile.ZipFile,
    wanted: list[zipfile.ZipInfo],
    max_images: int,
    max_total_bytes: int,
    input_shape: tuple[int, int, int],
) -> ParsedUpload:
    """The upload from the .npz's arrays (called while their bytes hold the decoding budget)."""
    arrays = {info.filename.removesuffix(".npy"): _read_npy(archive, info, max_total_bytes) for info in wanted}
    images = _images_tensor(arrays["images"], input_shape, max_images)
    labels = _labels_list(arrays["labels"], len(images)) if "labels" in arrays else None
    return ParsedUpload(images, labels, [str(i) for i in range(len(images))])


_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _read_npy(archive: zipfile.ZipFile, info: zipfile.ZipInfo, max_total_bytes: int) -> np.ndarray:
    """One array of the .npz. Its header is checked before any array is made: no object dtype, and exactly
    the bytes its shape and dtype need present (numpy's own reader allocates what the header claims, so a
    2 KB file could ask for gigabytes)."""
    name = info.filename.removesuffix(".npy")
    try:
        with archive.open(info) as f:
            blob = _read_at_most(f, max_total_bytes, max_total_bytes)
        stream = io.BytesIO(blob)
        version = np.lib.format.read_magic(stream)
        if version not in _NPY_HEADERS:
            raise ValueError(f"unsupported .npy format version {version}")
        shape, fortran_order, dtype = _NPY_HEADERS[version](stream)
    except _ARCHIVE_ERRORS as e:
        raise UploadError(400, f"array {shown(name)} of the .npz cannot be read: {e}") from None
    if dtype.hasobject:
        raise UploadError(400, f"array {shown(name)} holds Python objects: send numbers (uint8, float or int)")
    count = math.prod(shape)
    present = len(blob) - stream.tell()
    if count * dtype.itemsize != present:
        raise UploadError(
            400,
            f"array {shown(name)} declares shape {shown(list(shape))} of {dtype} ({count * dtype.itemsize} bytes) "
            f"but holds {present} bytes",
        )
    flat = np.frombuffer(blob, dtype=dtype, count=count, offset=stream.tell())
    return flat.reshape(shape, order="F" if fortran_order else "C").copy()  # own, writable, C-ordered memory


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
