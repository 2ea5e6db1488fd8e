"""Parsing of batch-job uploads: archives of images and .npz arrays, and every way they can be bad."""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
import tracemalloc
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from service.jobs.uploads import DecodeBudget, UploadError, parse_upload

SHAPE = (1, 28, 28)
LIMITS = dict(max_images=10, max_pixels=4096 * 4096, max_total_bytes=16 << 20)


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def gray_images(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(count)]


def make_zip(entries: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return buffer.getvalue()


def make_tar(entries: list[tuple[str, bytes]], mode: str = "w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def make_npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def parse(filename: str, data: bytes, shape: tuple[int, int, int] = SHAPE, **limits: int):
    return parse_upload(filename, data, input_shape=shape, **(LIMITS | limits))


def rejected(filename: str, data: bytes, shape: tuple[int, int, int] = SHAPE, **limits: int) -> UploadError:
    with pytest.raises(UploadError) as info:
        parse(filename, data, shape, **limits)
    return info.value


def as_uint8(images: torch.Tensor) -> np.ndarray:
    return images.mul(255).round().to(torch.uint8).numpy()


# -- archives of images -----------------------------------------------------------------------


def test_zip_of_pngs_decodes_every_image_in_name_order() -> None:
    pixels = gray_images(3)
    data = make_zip([("b.png", png(pixels[1])), ("a.png", png(pixels[0])), ("c.png", png(pixels[2]))])
    parsed = parse("set.zip", data)
    assert parsed.names == ["a.png", "b.png", "c.png"]
    assert parsed.labels is None
    assert parsed.images.shape == (3, *SHAPE) and parsed.images.dtype == torch.float32
    np.testing.assert_array_equal(as_uint8(parsed.images)[:, 0], np.stack(pixels))


@pytest.mark.parametrize("mode,filename", [("w:gz", "set.tar.gz"), ("w", "set.tar"), ("w:xz", "set.tar.xz")])
def test_tar_of_pngs(mode: str, filename: str) -> None:
    pixels = gray_images(2, seed=1)
    parsed = parse(filename, make_tar([("x/1.png", png(pixels[1])), ("x/0.png", png(pixels[0]))], mode))
    assert parsed.names == ["x/0.png", "x/1.png"]
    np.testing.assert_array_equal(as_uint8(parsed.images)[:, 0], np.stack(pixels))


def test_rgb_images_for_a_three_channel_model() -> None:
    rgb = np.random.default_rng(2).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    parsed = parse("rgb.zip", make_zip([("0.png", png(rgb))]), shape=(3, 8, 8))
    np.testing.assert_array_equal(as_uint8(parsed.images)[0], rgb.transpose(2, 0, 1))


def test_container_is_sniffed_when_the_name_says_nothing() -> None:
    pixels = gray_images(1)
    assert len(parse("upload", make_tar([("0.png", png(pixels[0]))])).images) == 1
    assert len(parse("upload", make_zip([("0.png", png(pixels[0]))])).images) == 1
    npz = make_npz(images=np.stack(pixels))
    assert len(parse("upload.bin", npz).images) == 1


def test_directories_and_macos_metadata_are_skipped() -> None:
    pixels = gray_images(1)
    data = make_zip(
        [
            ("imgs/", b""),
            ("imgs/0.png", png(pixels[0])),
            ("__MACOSX/imgs/._0.png", b"\0junk"),
            ("imgs/.DS_Store", b"junk"),
        ]
    )
    assert parse("set.zip", data).names == ["imgs/0.png"]


def test_path_traversal_names_are_only_labels(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    pixels = gray_images(3)
    names = ["../../evil.png", "/etc/evil.png", "a/../../b\nx.png"]
    parsed = parse("set.zip", make_zip(list(zip(names, map(png, pixels), strict=True))))
    assert sorted(parsed.names) == sorted(["../../evil.png", "/etc/evil.png", "a/../../b?x.png"])
    assert list(tmp_path.iterdir()) == [] and not (tmp_path.parent / "evil.png").exists()


def test_entry_that_is_not_an_image_is_named_in_a_415() -> None:
    error = rejected("set.zip", make_zip([("0.png", png(gray_images(1)[0])), ("notes.txt", b"hello")]))
    assert error.status_code == 415 and "notes.txt" in error.message


def test_image_of_the_wrong_size_is_a_422() -> None:
    small = np.zeros((20, 20), dtype=np.uint8)
    error = rejected("set.zip", make_zip([("small.png", png(small))]))
    assert error.status_code == 422 and "small.png" in error.message and "1×28×28" in error.message


def test_archive_without_images_is_a_422() -> None:
    assert rejected("set.zip", make_zip([("dir/", b"")])).status_code == 422


@pytest.mark.parametrize(
    "filename,data",
    [
        ("set.zip", b"PK\x03\x04 this is not really a zip"),
        ("set.zip", make_zip([("0.png", b"x" * 100)])[:60]),
        ("set.tar.gz", make_tar([("0.png", png(gray_images(1)[0]))])[:80]),
        ("set.tar.gz", b"\x1f\x8b not gzip at all"),
        ("set.tar", b"\0" * 100 + b"garbage" * 100),
        ("set.npz", b"PK\x03\x04 broken"),
        ("set.zip", b""),
    ],
)
def test_malformed_archives_are_a_400(filename: str, data: bytes) -> None:
    error = rejected(filename, data)
    assert error.status_code == 400 and error.message


def test_unknown_container_is_a_415() -> None:
    error = rejected("images.rar", b"Rar!\x1a\x07\x00 whatever")
    assert error.status_code == 415 and ".zip" in error.message


@pytest.mark.parametrize("build", [make_zip, make_tar])
def test_too_many_entries_is_a_413(build) -> None:
    entries = [(f"{i}.png", png(p)) for i, p in enumerate(gray_images(4))]
    error = rejected("set.zip" if build is make_zip else "set.tgz", build(entries), max_images=3)
    assert error.status_code == 413 and "3" in error.message


# -- archive bombs: refused without decompressing them ----------------------------------------


@pytest.fixture
def decompressed_bytes(monkeypatch) -> list[int]:
    """Counts every byte handed out by zip entries and gzip streams while parsing."""
    total = [0]
    for cls in (zipfile.ZipExtFile, gzip.GzipFile):
        original = cls.read

        def counting(self, size=-1, _original=original):
            data = _original(self, size)
            total[0] += len(data)
            return data

        monkeypatch.setattr(cls, "read", counting)
    return total


def zip_of_zeros(name: str, megabytes: int) -> bytes:
    """A zip with one deflated entry of ``megabytes`` MiB of zeros, built in 1 MiB writes (about 1000:1)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive, archive.open(name, "w") as entry:
        for _ in range(megabytes):
            entry.write(bytes(1 << 20))
    return buffer.getvalue()


def test_zip_bomb_is_refused_from_its_declared_size(decompressed_bytes) -> None:
    data = zip_of_zeros("bomb.png", 64)
    assert len(data) < 1 << 20
    error = rejected("bomb.zip", data, max_total_bytes=8 << 20)
    assert error.status_code == 413 and "8388608" in error.message
    assert decompressed_bytes[0] == 0


def test_zip_bomb_is_refused_for_its_ratio_below_the_size_limit(decompressed_bytes) -> None:
    error = rejected("bomb.zip", zip_of_zeros("bomb.png", 64), max_total_bytes=1 << 30)
    assert error.status_code == 413 and "bomb" in error.message
    assert decompressed_bytes[0] == 0


def test_zip_that_understates_its_size_stops_at_the_declared_size(decompressed_bytes) -> None:
    data = bytearray(zip_of_zeros("liar.png", 8))
    # Claim 1,000 uncompressed bytes in the local header (offset 22) and the central directory (offset 24).
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = data.find(signature)
        struct.pack_into("<I", data, at + offset, 1000)
    error = rejected("liar.zip", bytes(data))
    assert error.status_code in (400, 413)
    assert decompressed_bytes[0] <= 1001


def test_tar_bomb_is_refused_from_its_member_header(decompressed_bytes) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        info = tarfile.TarInfo("bomb.png")
        info.size = 64 << 20
        archive.addfile(info, io.BytesIO(bytes(64 << 20)))
    error = rejected("bomb.tar.gz", buffer.getvalue(), max_total_bytes=1 << 20)
    assert error.status_code == 413
    assert decompressed_bytes[0] < 2 << 20


def test_tar_header_bomb_stops_at_the_byte_limit(decompressed_bytes) -> None:
    # A pax header is read whole by tarfile itself: only counting the stream's bytes stops it.
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo("0.png")
        info.pax_headers = {"comment": "a" * (32 << 20)}
        archive.addfile(info, io.BytesIO(b""))
    error = rejected("bomb.tgz", buffer.getvalue(), max_total_bytes=1 << 20)
    assert error.status_code == 413
    assert decompressed_bytes[0] < 2 << 20


def test_pixel_bomb_inside_an_archive_is_a_413() -> None:
    big = png(np.zeros((300, 300), dtype=np.uint8))
    error = rejected("set.zip", make_zip([("big.png", big)]), max_pixels=100 * 100)
    assert error.status_code == 413 and "big.png" in error.message


# -- .npz arrays ------------------------------------------------------------------------------


def test_npz_uint8_with_labels() -> None:
    images = np.stack(gray_images(4))
    parsed = parse("set.npz", make_npz(images=images, labels=np.array([3, 1, 4, 1])))
    assert parsed.labels == [3, 1, 4, 1]
    assert parsed.names == ["0", "1", "2", "3"]
    assert parsed.images.shape == (4, *SHAPE)
    torch.testing.assert_close(parsed.images[:, 0], torch.from_numpy(images).float() / 255, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_npz_float_layouts(layout: str) -> None:
    images = np.random.default_rng(3).random((5, 3, 8, 8), dtype=np.float32)
    stored = images if layout == "NCHW" else images.transpose(0, 2, 3, 1)
    parsed = parse("set.npz", make_npz(images=stored), shape=(3, 8, 8))
    assert parsed.labels is None
    assert torch.equal(parsed.images, torch.from_numpy(images))


def test_npz_float64_is_accepted_as_float32() -> None:
    images = np.random.default_rng(4).random((2, 28, 28))
    parsed = parse("set.npz", make_npz(images=images))
    assert parsed.images.dtype == torch.float32
    torch.testing.assert_close(parsed.images[:, 0], torch.from_numpy(images).float())


@pytest.mark.parametrize("bad,fragment", [(np.nan, "NaN"), (np.inf, "NaN or infinite")])
def test_npz_nan_or_inf_is_a_422(bad: float, fragment: str) -> None:
    images = np.full((3, 28, 28), 0.5, dtype=np.float32)
    images[2, 4, 4] = bad
    error = rejected("set.npz", make_npz(images=images))
    assert error.status_code == 422 and fragment in error.message and "image 2" in error.message


@pytest.mark.parametrize("value", [1.5, -0.1, 255.0])
def test_npz_float_out_of_range_is_a_422(value: float) -> None:
    images = np.full((2, 28, 28), 0.5, dtype=np.float32)
    images[0, 0, 0] = value
    error = rejected("set.npz", make_npz(images=images))
    assert error.status_code == 422 and "[0, 1]" in error.message


@pytest.mark.parametrize("shape", [(2, 32, 32), (2, 3, 28, 28), (28, 28), (2, 1, 28, 28, 1)])
def test_npz_wrong_shape_is_a_422(shape: tuple[int, ...]) -> None:
    error = rejected("set.npz", make_npz(images=np.zeros(shape, dtype=np.uint8)))
    assert error.status_code == 422 and str(list(shape)) in error.message and "1×28×28" in error.message


def test_npz_other_dtypes_are_a_422() -> None:
    error = rejected("set.npz", make_npz(images=np.zeros((2, 28, 28), dtype=np.int64)))
    assert error.status_code == 422 and "int64" in error.message


def test_npz_object_array_is_refused_without_unpickling() -> None:
    images = np.empty(2, dtype=object)
    assert rejected("set.npz", make_npz(images=images)).status_code == 400


@pytest.mark.parametrize(
    "labels", [np.array([1, 2]), np.array([0.5, 1, 2]), np.array([[1, 2, 3]]), np.array([1, -1, 0])]
)
def test_npz_bad_labels_are_a_422(labels: np.ndarray) -> None:
    error = rejected("set.npz", make_npz(images=np.zeros((3, 28, 28), dtype=np.uint8), labels=labels))
    assert error.status_code == 422 and "labels" in error.message


def test_npz_without_images_is_a_422() -> None:
    error = rejected("set.npz", make_npz(x=np.zeros((3, 28, 28), dtype=np.uint8)))
    assert error.status_code == 422 and "'images'" in error.message and "x" in error.message


def test_npz_with_too_many_images_is_a_413() -> None:
    error = rejected("set.npz", make_npz(images=np.zeros((11, 28, 28), dtype=np.uint8)))
    assert error.status_code == 413


def test_npz_bomb_is_refused_from_its_declared_size(decompressed_bytes) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive, archive.open("images.npy", "w") as entry:
        np.lib.format.write_array_header_1_0(entry, {"descr": "|u1", "fortran_order": False, "shape": (40000, 28, 28)})
        for _ in range(30):
            entry.write(bytes(1 << 20))
    error = rejected("bomb.npz", buffer.getvalue(), max_total_bytes=4 << 20)
    assert error.status_code == 413
    assert decompressed_bytes[0] == 0


# -- memory: entry by entry, the archive's total ratio, a budget shared by concurrent uploads ------


def test_many_entries_each_just_at_the_ratio_floor_are_refused_by_their_total() -> None:
    zeros = bytes(1 << 20)  # exactly RATIO_FLOOR: the per-entry ratio test lets each through
    archive = make_zip([(f"{i:03}.png", zeros) for i in range(12)])
    error = rejected("bomb.zip", archive, max_images=100, max_total_bytes=64 << 20)
    assert error.status_code == 413 and "in all" in error.message, error.message


def test_entries_are_decoded_one_at_a_time_and_the_first_bad_one_ends_the_parse() -> None:
    noise = np.random.default_rng(0).bytes(1 << 20)  # incompressible, and no image
    archive = make_zip([(f"{i:02}.png", noise) for i in range(12)])
    tracemalloc.start()
    try:
        error = rejected("junk.zip", archive, max_images=100, max_total_bytes=64 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert error.status_code == 415 and "'00.png'" in error.message, error.message
    assert peak < 4 << 20, f"{peak} bytes held: more than one entry was read"


def test_concurrent_uploads_share_a_decoding_budget() -> None:
    budget = DecodeBudget(1 << 20)
    archive = make_zip([(f"{i}.png", png(image)) for i, image in enumerate(gray_images(3))])
    with budget.hold((1 << 20) - 100):  # another upload is being decompressed
        error = rejected("set.zip", archive, budget=budget)
        assert error.status_code == 503 and error.retry_after_s is not None, error.message
        npz = make_npz(images=np.zeros((3, 28, 28), dtype=np.uint8))
        assert rejected("set.npz", npz, budget=budget).status_code == 503
    assert budget.held == 0
    assert len(parse("set.zip", archive, budget=budget).images) == 3  # once it is free again
    assert budget.held == 0
