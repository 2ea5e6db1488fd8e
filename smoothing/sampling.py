"""Monte Carlo sampling of the base classifier under Gaussian noise.

Noise is drawn in fixed blocks of ``NOISE_BLOCK`` samples; block j of stream ``stage`` for a
request seeded with ``seed`` always comes from a generator seeded by (seed, stage, j). The
samples a request receives are therefore the same whatever batch sizes were used and whoever
else shared the forward pass: the library and the service agree sample for sample.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, replace

import torch
from torch import nn

NOISE_BLOCK = 32
"""Samples per independently seeded noise block."""

SELECTION_STAGE = 0
"""Stream id of CERTIFY's n0 selection samples."""
ESTIMATION_STAGE = 1
"""Stream id of CERTIFY's (and PREDICT's) estimation samples; independent of the selection stream."""


def new_seed() -> int:
    """A fresh random 63-bit seed, for requests that did not give one."""
    return secrets.randbits(63)


def block_seed(seed: int, stage: int, block: int) -> int:
    """63-bit seed of noise block ``block`` of stream ``stage`` for a request seeded with ``seed``."""
    digest = hashlib.blake2b(f"{seed}:{stage}:{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def stream_noise(
    shape: tuple[int, ...], seed: int, stage: int, start: int, stop: int, device: torch.device
) -> torch.Tensor:
    """Standard normal noise for samples [start, stop) of a stream: tensor (stop - start, *shape) on ``device``.

    Needs 0 ≤ start ≤ stop; an empty range gives an empty tensor.
    """
    if not 0 <= start <= stop:
        raise ValueError(f"need 0 <= start <= stop, got start={start}, stop={stop}")
    if start == stop:
        return torch.empty((0, *shape), device=device)
    first, last = start // NOISE_BLOCK, (stop - 1) // NOISE_BLOCK
    generator = torch.Generator(device=device)
    blocks = []
    for block in range(first, last + 1):
        generator.manual_seed(block_seed(seed, stage, block))
        blocks.append(torch.randn((NOISE_BLOCK, *shape), generator=generator, device=device))
    noise = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
    offset = first * NOISE_BLOCK
    return noise[start - offset : stop - offset]


@dataclass(frozen=True)
class Chunk:
    """Samples [start, stop) of one input's noise stream, to be classified in a shared batch."""

    x: torch.Tensor  # (C, H, W), in [0, 1] pixel space, on the model's device
    sigma: float
    seed: int
    stage: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def _noise_pieces(chunks: list[Chunk]) -> list[tuple[Chunk, int, int, int, int]]:
    """The batch cut at noise-block boundaries: (chunk, block, first sample, stop sample, row of the batch)."""
    pieces, row = [], 0
    for c in (c for c in chunks if c.size > 0):
        for block in range(c.start // NOISE_BLOCK, (c.stop - 1) // NOISE_BLOCK + 1):
            lo, hi = max(c.start, block * NOISE_BLOCK), min(c.stop, (block + 1) * NOISE_BLOCK)
            pieces.append((c, block, lo, hi, row))
            row += hi - lo
    return pieces


def _fill_noisy(batch: torch.Tensor, pieces: list[tuple[Chunk, int, int, int, int]]) -> None:
    """Write x + σ·ε into the batch rows of each piece (ε: the piece's block of its stream)."""
    generator = torch.Generator(device=batch.device)
    for c, block, lo, hi, row in pieces:
        generator.manual_seed(block_seed(c.seed, c.stage, block))
        noise = torch.randn((NOISE_BLOCK, *c.x.shape), generator=generator, device=batch.device)
        offset = block * NOISE_BLOCK
        torch.add(c.x, noise[lo - offset : hi - offset], alpha=c.sigma, out=batch[row : row + hi - lo])


def noisy_batch(chunks: list[Chunk], device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """Concatenate x + σ·ε for every chunk: tensor (Σ sizes, C, H, W) on ``device``.

    ε is ``stream_noise`` of the chunk's range, sample for sample, drawn block by block straight
    into the batch (no intermediate copies).
    """
    shape = tuple(chunks[0].x.shape)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    batch = torch.empty((sum(c.size for c in chunks), *shape), device=device, memory_format=memory_format)
    chunks = [replace(c, x=c.x.to(device)) for c in chunks]
    _fill_noisy(batch, _noise_pieces(chunks))
    return batch


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer; CPU for a model that has neither."""
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return torch.device("cpu") if tensor is None else tensor.device


@torch.inference_mode()
def count_chunks(model: nn.Module, chunks: list[Chunk], num_classes: int, channels_last: bool = False) -> torch.Tensor:
    """Classify every chunk's noisy samples in one forward pass; return counts (len(chunks), num_classes).

    Row i holds how often the base classifier gave each class on chunk i's samples; row sums
    equal the chunk sizes. Counting is one ``bincount`` on the model's device, no loop per sample.
    Raises ValueError if the model emits more than ``num_classes`` logits.
    """
    device = model_device(model)
    batch = noisy_batch(chunks, device, channels_last)
    logits = model(batch)  # (B, classes)
    # A class index ≥ num_classes would land in the next chunk's row of the flat bincount.
    if logits.shape[1] > num_classes:
        raise ValueError(f"model gives {logits.shape[1]} logits but num_classes is {num_classes}")
    predictions = logits.argmax(dim=1)  # (B,)
    sizes = torch.tensor([c.size for c in chunks], device=device)
    segment = torch.repeat_interleave(torch.arange(len(chunks), device=device), sizes)  # (B,)
    flat = torch.bincount(segment * num_classes + predictions, minlength=len(chunks) * num_classes)
    return flat.view(len(chunks), num_classes).cpu()


def sample_counts(
    model: nn.Module,
    x: torch.Tensor,
    num: int,
    *,
    sigma: float,
    num_classes: int,
    batch_size: int,
    seed: int,
    stage: int = ESTIMATION_STAGE,
    start: int = 0,
    channels_last: bool = False,
) -> torch.Tensor:
    """Class counts of the base classifier on ``num`` noisy copies x + N(0, σ²I).

    x: (C, H, W) in [0, 1] pixel space. Uses samples [start, start + num) of the stream
    (seed, stage), in batches of at most ``batch_size``. Returns int64 counts (num_classes,) that
    sum to ``num``. Raises ValueError if num < 0 or batch_size < 1.
    """
    if num < 0 or batch_size < 1:
        raise ValueError(f"need num >= 0 and batch_size >= 1, got num={num}, batch_size={batch_size}")
    device = model_device(model)
    x = x.to(device)
    counts = torch.zeros(num_classes, dtype=torch.long)
    for lo in range(start, start + num, batch_size):
        hi = min(lo + batch_size, start + num)
        chunk = Chunk(x=x, sigma=sigma, seed=seed, stage=stage, start=lo, stop=hi)
        counts += count_chunks(model, [chunk], num_classes, channels_last)[0]
    return counts
