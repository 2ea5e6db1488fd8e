"""Noise streams and counting: counts add up, seeds survive batching, streams are what they claim."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable

import pytest
import torch
from scipy.stats import kstest
from torch import nn

from smoothing.sampling import (
    ESTIMATION_STAGE,
    NOISE_BLOCK,
    SELECTION_STAGE,
    Chunk,
    chunk_rows,
    count_chunks,
    derive_seed,
    model_device,
    new_seed,
    noisy_batch,
    sample_counts,
    stream_key,
    stream_noise,
)

CPU = torch.device("cpu")
NUM_CLASSES = 5
SHAPE = (1, 4, 4)


class BucketClassifier(nn.Module):
    """Class = the nearest of NUM_CLASSES evenly spaced centres to the input's mean pixel.

    Noisy copies of a mid-grey image spread over every class, so a count landing in the wrong
    class or the wrong chunk shows up. Records the batch size of every forward pass.
    """

    def __init__(self) -> None:
        super().__init__()
        self.centres = nn.Parameter(torch.linspace(0.3, 0.7, NUM_CLASSES))
        self.batch_sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batch_sizes.append(x.shape[0])
        mean = x.flatten(1).mean(dim=1, keepdim=True)  # (B, 1)
        return -((mean - self.centres) ** 2)  # (B, NUM_CLASSES)


@pytest.fixture()
def model() -> BucketClassifier:
    return BucketClassifier()


@pytest.fixture()
def grey() -> torch.Tensor:
    return torch.full(SHAPE, 0.5)


def counts_of(model: nn.Module, x: torch.Tensor, num: int, batch_size: int, seed: int = 7, **kw: int) -> torch.Tensor:
    return sample_counts(model, x, num, sigma=0.5, num_classes=NUM_CLASSES, batch_size=batch_size, seed=seed, **kw)


@pytest.mark.parametrize("batch_size", [1, 7, 32, 33, 100, 1000])
@pytest.mark.parametrize("num", [1, 31, 32, 33, 257])
def test_counts_sum_to_samples_asked_for(
    model: BucketClassifier, grey: torch.Tensor, num: int, batch_size: int
) -> None:
    counts = counts_of(model, grey, num, batch_size)
    assert counts.shape == (NUM_CLASSES,)
    assert counts.dtype == torch.long
    assert int(counts.sum()) == num
    # Batches never exceed batch_size and together cover exactly num samples.
    assert max(model.batch_sizes) <= batch_size
    assert sum(model.batch_sizes) == num
    assert len(model.batch_sizes) == math.ceil(num / batch_size)


def test_zero_samples_give_zero_counts(model: BucketClassifier, grey: torch.Tensor) -> None:
    assert counts_of(model, grey, 0, 32).tolist() == [0] * NUM_CLASSES
    assert model.batch_sizes == []


@pytest.mark.parametrize(("num", "batch_size"), [(-1, 32), (10, 0), (10, -5)])
def test_sample_counts_rejects_bad_sizes(
    model: BucketClassifier, grey: torch.Tensor, num: int, batch_size: int
) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        counts_of(model, grey, num, batch_size)


def test_noisy_inputs_spread_over_all_classes(model: BucketClassifier, grey: torch.Tensor) -> None:
    # Precondition of the counting tests below: every class row gets some counts.
    assert (counts_of(model, grey, 1000, 1000) > 0).all()


def test_same_seed_same_counts_for_every_batch_size(model: BucketClassifier, grey: torch.Tensor) -> None:
    runs = [counts_of(model, grey, 257, batch_size).tolist() for batch_size in (1, 7, 32, 100, 1000)]
    assert all(run == runs[0] for run in runs)
    assert counts_of(model, grey, 257, 32, seed=8).tolist() != runs[0]


def test_start_offset_continues_the_stream(model: BucketClassifier, grey: torch.Tensor) -> None:
    whole = counts_of(model, grey, 300, 64)
    head = counts_of(model, grey, 45, 64)
    tail = counts_of(model, grey, 255, 17, start=45)
    assert (head + tail).tolist() == whole.tolist()


def test_count_chunks_rows_match_each_chunk_counted_alone(model: BucketClassifier) -> None:
    dark, light = torch.full(SHAPE, 0.4), torch.full(SHAPE, 0.6)
    chunks = [
        Chunk(x=dark, sigma=0.5, key=stream_key(1, dark), stage=SELECTION_STAGE, start=0, stop=20),
        Chunk(x=light, sigma=0.25, key=stream_key(2, light), stage=ESTIMATION_STAGE, start=32, stop=129),
        Chunk(x=dark, sigma=0.5, key=stream_key(1, dark), stage=ESTIMATION_STAGE, start=5, stop=6),
        Chunk(x=light, sigma=1.0, key=stream_key(3, light), stage=ESTIMATION_STAGE, start=0, stop=64),
    ]
    seeds = {id(chunks[0]): 1, id(chunks[1]): 2, id(chunks[2]): 1, id(chunks[3]): 3}
    together = count_chunks(model, chunks, NUM_CLASSES)
    assert model.batch_sizes == [20 + 97 + 1 + 64]  # one forward pass for all chunks
    assert together.shape == (len(chunks), NUM_CLASSES)
    assert together.sum(dim=1).tolist() == [c.size for c in chunks]
    for row, chunk in zip(together, chunks, strict=True):
        assert row.tolist() == count_chunks(model, [chunk], NUM_CLASSES)[0].tolist()
        alone = sample_counts(
            model,
            chunk.x,
            chunk.size,
            sigma=chunk.sigma,
            num_classes=NUM_CLASSES,
            batch_size=13,
            seed=seeds[id(chunk)],
            stage=chunk.stage,
            start=chunk.start,
        )
        assert row.tolist() == alone.tolist()


def test_mixed_batch_of_two_inputs_equals_counting_each_alone(model: BucketClassifier) -> None:
    dark, light = torch.full(SHAPE, 0.35), torch.full(SHAPE, 0.65)
    first = Chunk(x=dark, sigma=0.5, key=stream_key(11, dark), stage=ESTIMATION_STAGE, start=0, stop=100)
    second = Chunk(x=light, sigma=0.5, key=stream_key(12, light), stage=ESTIMATION_STAGE, start=0, stop=100)
    mixed = count_chunks(model, [first, second], NUM_CLASSES)
    assert mixed[0].tolist() == counts_of(model, dark, 100, 7, seed=11).tolist()
    assert mixed[1].tolist() == counts_of(model, light, 100, 100, seed=12).tolist()
    # The two inputs really are told apart: their count rows differ.
    assert mixed[0].tolist() != mixed[1].tolist()


def test_count_chunks_with_empty_chunk(model: BucketClassifier, grey: torch.Tensor) -> None:
    chunks = [
        Chunk(x=grey, sigma=0.5, key=stream_key(1, grey), stage=ESTIMATION_STAGE, start=10, stop=10),
        Chunk(x=grey, sigma=0.5, key=stream_key(1, grey), stage=ESTIMATION_STAGE, start=10, stop=40),
    ]
    counts = count_chunks(model, chunks, NUM_CLASSES)
    assert counts.sum(dim=1).tolist() == [0, 30]


def test_count_chunks_rejects_model_with_more_classes_than_counted(model: BucketClassifier) -> None:
    chunk = Chunk(x=torch.full(SHAPE, 0.5), sigma=0.5, key=1, stage=ESTIMATION_STAGE, start=0, stop=8)
    with pytest.raises(ValueError, match="num_classes"):
        count_chunks(model, [chunk, chunk], NUM_CLASSES - 1)


class ParameterFree(nn.Module):
    """Class 1 iff the first pixel is positive; has no parameters and no buffers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.flatten(1)[:, 0]
        return torch.stack([-z, z], dim=1)


def test_parameter_free_model_counts_on_cpu() -> None:
    assert model_device(ParameterFree()) == CPU
    x = torch.zeros(SHAPE)
    counts = sample_counts(ParameterFree(), x, 2000, sigma=1.0, num_classes=2, batch_size=500, seed=3)
    assert int(counts.sum()) == 2000
    # P(class 1) = 1/2 at the boundary: 2000 samples land within 5 standard deviations (±112) of 1000.
    assert abs(int(counts[1]) - 1000) < 112


@pytest.mark.parametrize(("start", "stop"), [(0, 1), (5, 31), (31, 33), (32, 64), (30, 100), (64, 65), (0, 200)])
def test_stream_noise_range_equals_slice_of_prefix(start: int, stop: int) -> None:
    prefix = stream_noise(SHAPE, 5, ESTIMATION_STAGE, 0, 200, CPU)
    part = stream_noise(SHAPE, 5, ESTIMATION_STAGE, start, stop, CPU)
    assert part.shape == (stop - start, *SHAPE)
    assert torch.equal(part, prefix[start:stop])


def test_stream_noise_empty_and_invalid_ranges() -> None:
    assert stream_noise(SHAPE, 5, ESTIMATION_STAGE, 40, 40, CPU).shape == (0, *SHAPE)
    for start, stop in [(10, 9), (-1, 5)]:
        with pytest.raises(ValueError, match="start"):
            stream_noise(SHAPE, 5, ESTIMATION_STAGE, start, stop, CPU)


def test_streams_differ_by_seed_stage_and_block() -> None:
    def noise(seed: int, stage: int) -> torch.Tensor:
        return stream_noise(SHAPE, seed, stage, 0, 2 * NOISE_BLOCK, CPU)

    base = noise(9, ESTIMATION_STAGE)
    assert torch.equal(base, noise(9, ESTIMATION_STAGE))
    assert not torch.equal(base, noise(10, ESTIMATION_STAGE))
    selection = noise(9, SELECTION_STAGE)
    assert SELECTION_STAGE != ESTIMATION_STAGE
    assert not torch.equal(base, selection)
    # Not shifted copies either: no selection sample equals any estimation sample.
    assert not (selection.flatten(1)[:, None, :] == base.flatten(1)[None, :, :]).all(dim=2).any()
    assert not torch.equal(base[:NOISE_BLOCK], base[NOISE_BLOCK:])


def test_stream_noise_is_standard_normal_and_streams_uncorrelated() -> None:
    estimation = stream_noise((4,), 21, ESTIMATION_STAGE, 0, 8192, CPU).flatten().double()
    selection = stream_noise((4,), 21, SELECTION_STAGE, 0, 8192, CPU).flatten().double()
    # Fixed seeds make this deterministic; a broken generator fails by a wide margin.
    assert kstest(estimation.numpy(), "norm").pvalue > 1e-4
    assert kstest(selection.numpy(), "norm").pvalue > 1e-4
    correlation = torch.corrcoef(torch.stack([estimation, selection]))[0, 1]
    assert abs(float(correlation)) < 5 / math.sqrt(estimation.numel())


def test_noisy_batch_is_x_plus_sigma_noise() -> None:
    x = torch.rand(SHAPE, generator=torch.Generator().manual_seed(0))
    chunks = [
        Chunk(x=x, sigma=0.25, key=stream_key(4, x), stage=ESTIMATION_STAGE, start=3, stop=40),
        Chunk(x=1 - x, sigma=0.5, key=stream_key(5, 1 - x), stage=SELECTION_STAGE, start=0, stop=2),
    ]
    batch = noisy_batch(chunks, CPU)
    expected = torch.cat(
        [
            x + 0.25 * stream_noise(SHAPE, stream_key(4, x), ESTIMATION_STAGE, 3, 40, CPU),
            (1 - x) + 0.5 * stream_noise(SHAPE, stream_key(5, 1 - x), SELECTION_STAGE, 0, 2, CPU),
        ]
    )
    torch.testing.assert_close(batch, expected, rtol=0, atol=1e-6)
    assert x.equal(torch.rand(SHAPE, generator=torch.Generator().manual_seed(0)))  # input untouched
    channels_last = noisy_batch(chunks, CPU, channels_last=True)
    assert channels_last.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(channels_last, batch)


def test_noisy_batch_of_whole_blocks_is_the_same_in_every_memory_format() -> None:
    """Whole blocks are drawn straight into the batch: the values must be those of stream_noise, in either
    memory format (3 channels, where channels-last rows are not contiguous in the standard layout), and in
    inference mode as count_chunks runs it."""
    shape = (3, 5, 4)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    chunks = [
        Chunk(x=x, sigma=0.25, key=stream_key(4, x), stage=ESTIMATION_STAGE, start=0, stop=3 * NOISE_BLOCK),
        Chunk(x=1 - x, sigma=0.5, key=stream_key(5, 1 - x), stage=SELECTION_STAGE, start=100, stop=2 * NOISE_BLOCK + 7),
    ]
    expected = torch.cat(
        [
            x + 0.25 * stream_noise(shape, stream_key(4, x), ESTIMATION_STAGE, 0, 3 * NOISE_BLOCK, CPU),
            (1 - x) + 0.5 * stream_noise(shape, stream_key(5, 1 - x), SELECTION_STAGE, 100, 2 * NOISE_BLOCK + 7, CPU),
        ]
    )
    batch = noisy_batch(chunks, CPU)
    torch.testing.assert_close(batch, expected, rtol=0, atol=1e-6)
    channels_last = noisy_batch(chunks, CPU, channels_last=True)
    assert channels_last.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(channels_last, batch)
    with torch.inference_mode():
        assert torch.equal(noisy_batch(chunks, CPU), batch)


def test_derived_seeds_are_distinct_values_of_the_asked_width() -> None:
    seeds = {derive_seed(seed, stage, block) for seed in (0, 1, 2**62) for stage in (0, 1) for block in range(50)}
    assert len(seeds) == 3 * 2 * 50
    assert all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(1, 0, 0) == derive_seed(1, 0, 0)
    wide = {derive_seed("k", i, bits=128) for i in range(100)}
    assert len(wide) == 100 and all(0 <= k < 2**128 for k in wide) and max(wide) >= 2**120


def test_seeds_differing_only_in_high_bits_give_different_noise() -> None:
    """PyTorch's CPU generator keeps only 32 bits of a seed: blocks must not be seeded through it."""
    x = torch.zeros(SHAPE)
    low = stream_noise(SHAPE, stream_key(5, x), ESTIMATION_STAGE, 0, NOISE_BLOCK, CPU)
    for high in (2**32 + 5, 2**40 + 5, 2**62 + 5):
        assert not torch.equal(low, stream_noise(SHAPE, stream_key(high, x), ESTIMATION_STAGE, 0, NOISE_BLOCK, CPU))
    # Keys differing only in their top 64 bits give different noise too.
    assert not torch.equal(
        stream_noise(SHAPE, 7, ESTIMATION_STAGE, 0, NOISE_BLOCK, CPU),
        stream_noise(SHAPE, 7 + 2**100, ESTIMATION_STAGE, 0, NOISE_BLOCK, CPU),
    )


def test_no_two_blocks_of_a_long_stream_coincide() -> None:
    """1,000 blocks of one stream (128,000 samples): all distinct (32-bit seeds collided at ~B²/2³³)."""
    firsts = {
        tuple(stream_noise((2,), 1002, ESTIMATION_STAGE, b * NOISE_BLOCK, b * NOISE_BLOCK + 1, CPU)[0].tolist())
        for b in range(1000)
    }
    assert len(firsts) == 1000


def test_one_seed_on_different_inputs_gives_independent_noise(model: BucketClassifier) -> None:
    """A client reusing seed 0 over a test set must not give every example the same noise."""
    a, b = torch.full(SHAPE, 0.5), torch.full(SHAPE, 0.5 + 1e-7)
    assert stream_key(0, a) != stream_key(0, b)
    noise_a = noisy_batch([Chunk(a, 0.5, stream_key(0, a), ESTIMATION_STAGE, 0, 64)], CPU) - a
    noise_b = noisy_batch([Chunk(b, 0.5, stream_key(0, b), ESTIMATION_STAGE, 0, 64)], CPU) - b
    assert (noise_a - noise_b).abs().max() > 0.1


def test_new_seed_is_fresh_63_bit_value() -> None:
    seeds = [new_seed() for _ in range(20)]
    assert all(isinstance(s, int) and 0 <= s < 2**63 for s in seeds)
    assert len(set(seeds)) == len(seeds)


def aten_ops(fn: Callable[[], object]) -> Counter[str]:
    """How often each aten operator ran during ``fn()`` (torch.profiler on the CPU; nested calls counted too).

    On a GPU every computing operator is at least one kernel launch, so these counts are what a batch
    costs in launches, and an operator that reads a device value back (``item``, ``nonzero``) is a sync."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        fn()
    return Counter(event.name for event in profile.events())


def test_noise_costs_one_draw_per_block_and_one_add_per_chunk(grey: torch.Tensor) -> None:
    key = stream_key(5, grey)
    whole = [
        Chunk(x=grey, sigma=0.5, key=key, stage=ESTIMATION_STAGE, start=i * 256, stop=(i + 1) * 256) for i in range(4)
    ]
    ops = aten_ops(lambda: noisy_batch(whole, CPU))
    assert ops["aten::normal_"] == 4 * 256 // NOISE_BLOCK  # 1,024 samples: 8 draws, whatever the batch size
    assert ops["aten::add"] == 4 and ops["aten::copy_"] == 0  # whole blocks are drawn in place
    partial = [Chunk(x=grey, sigma=0.5, key=key, stage=ESTIMATION_STAGE, start=10, stop=10 + NOISE_BLOCK)]
    ops = aten_ops(lambda: noisy_batch(partial, CPU))
    assert ops["aten::normal_"] == 2 and ops["aten::copy_"] == 2  # straddles two blocks: each drawn, its piece copied


def test_count_chunks_reads_nothing_back_but_the_counts(model: BucketClassifier, grey: torch.Tensor) -> None:
    chunks = [
        Chunk(x=grey, sigma=0.5, key=stream_key(s, grey), stage=ESTIMATION_STAGE, start=0, stop=NOISE_BLOCK)
        for s in range(3)
    ]
    ops = aten_ops(lambda: count_chunks(model, chunks, NUM_CLASSES))
    # Each would wait for the device on a GPU: a scalar read back, or an output sized by device values.
    syncing = {"aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::unique", "aten::masked_select"}
    assert not syncing & set(ops), ops
    assert ops["aten::scatter_add_"] == 1 and ops["aten::normal_"] == 3


def test_chunk_rows_name_each_rows_chunk() -> None:
    x = torch.zeros(SHAPE)
    chunks = [Chunk(x=x, sigma=0.5, key=1, stage=0, start=a, stop=b) for a, b in [(0, 3), (7, 7), (0, 2)]]
    assert chunk_rows(chunks, CPU).tolist() == [0, 0, 0, 2, 2]
