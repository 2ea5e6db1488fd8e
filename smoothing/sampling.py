"""Monte Carlo sampling of the base classifier under Gaussian noise, and the procedure protocol.

Noise comes in fixed blocks of ``NOISE_BLOCK`` samples. A request's samples are keyed by a
128-bit *stream key* derived from its seed and the exact input (``stream_key``); block j of
stream ``stage`` is drawn from a generator keyed by (stream key, stage, j). The samples a request
receives are therefore the same whatever batch sizes were used and whoever else shared the
forward pass (the library and the service agree sample for sample), distinct (key, stage, block)
triples give distinct noise with 128 bits of key (no 32-bit seed truncation), and one seed reused
for different inputs still gives them independent noise (Appendix D's Theorem 6 needs that).

Procedures (PREDICT, CERTIFY, the sequential tests) are generators that yield ``SampleRequest``s
and receive the class counts of those samples; ``run`` drives one with a synchronous sampler
(the library) and the service drives the same generator with its asynchronous scheduler.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from torch import nn

NOISE_BLOCK = 128
"""Samples per independently keyed noise block (the scheduler's chunks are multiples of it)."""

SELECTION_STAGE = 0
"""Stream id of CERTIFY's n0 selection samples."""
ESTIMATION_STAGE = 1
"""Stream id of CERTIFY's (and PREDICT's) estimation samples; independent of the selection stream."""

NOISE_SCHEME = "mt19937-state-from-sfc64/cuda-philox"
"""Names the noise construction below; part of the procedure constants (a change changes cache keys)."""

R = TypeVar("R")


def new_seed() -> int:
    """A fresh random 63-bit seed from the OS's CSPRNG, for requests that did not give one."""
    return secrets.randbits(63)


def derive_seed(*parts: int | str, bits: int = 63) -> int:
    """A ``bits``-bit seed derived from ``parts`` (BLAKE2b of their text joined by ':').

    The one derivation of the project: noise block keys, a job's per-image seeds and the
    offline certify run's per-example seeds all come from it, so distinct parts give
    independent seeds (up to the hash) and the same parts always the same seed.
    """
    if not 1 <= bits <= 512:
        raise ValueError(f"bits must lie in [1, 512], got {bits}")
    text = ":".join(str(p) for p in parts).encode()
    digest = hashlib.blake2b(text, digest_size=(bits + 7) // 8).digest()
    return int.from_bytes(digest, "little") >> (8 * len(digest) - bits)


def input_digest(x: torch.Tensor) -> str:
    """SHA-256 (hex) of an input's exact pixels: contiguous float32 bytes on the CPU, with its shape.

    -0.0 is folded into 0.0, so equal pixels give equal digests on any device; two shapes with
    the same bytes do not collide.
    """
    pixels = x.detach().to(device="cpu", dtype=torch.float32).contiguous() + 0.0
    digest = hashlib.sha256(str(list(pixels.shape)).encode())
    digest.update(pixels.numpy().tobytes())
    return digest.hexdigest()


def stream_key(seed: int, x: torch.Tensor) -> int:
    """The 128-bit key of the noise streams of a request seeded with ``seed`` on input ``x``."""
    return derive_seed("stream", seed, input_digest(x), bits=128)


def _mt19937_template() -> np.ndarray:
    """The byte layout of PyTorch's CPU generator state (mt19937), checked once: a state seeded with 0.

    The state is 8 bytes of initial seed, int ``left``, int ``seeded``, 8 bytes ``next``, then the 624
    mt19937 words as uint64 from byte 24, then the cached normal samples. ``block_noise`` overwrites
    the 624 words; if a PyTorch release changes the layout this check fails loudly rather than
    letting a block's noise ignore its key.
    """
    generator = torch.Generator()
    generator.manual_seed(0)
    state = generator.get_state().numpy().copy()
    words = state[_MT_WORDS].view(np.uint64)
    # mt19937's seeding recurrence from 0: word 0 is 0, word 1 is 1812433253·0 + 1 = 1, word 2 = 1812433253·1 + 2.
    if state.size != 5056 or words[0] != 0 or words[1] != 1 or words[2] != 1812433255:
        raise RuntimeError(f"unexpected torch.Generator state layout (PyTorch {torch.__version__}); see block_noise")
    return state


_MT_WORDS = slice(24, 24 + 624 * 8)
_MT_LEFT = slice(8, 12)
_MT_TEMPLATE = _mt19937_template()


def block_generator(key: int, stage: int, block: int, device: torch.device) -> torch.Generator:
    """The generator of one noise block, keyed by 128 bits, ``derive_seed(key, stage, block)``.

    CPU: PyTorch's mt19937 generator, whose ``manual_seed`` keeps only 32 bits (two blocks of one
    request would collide with probability ≈ B²/2³³), so its whole 624-word state is filled instead
    from NumPy's SFC64 seeded by a SeedSequence of the 128-bit key, and torch.randn then draws as fast
    as ever (measured: NumPy's own normals, or Box–Muller in torch, cost twice as much). CUDA:
    PyTorch's Philox generator, which takes a full 64-bit seed.
    """
    block_key = derive_seed("block", key, stage, block, bits=128)
    generator = torch.Generator(device=device)
    if device.type == "cuda":
        generator.manual_seed(block_key >> 64)
    else:
        state = _MT_TEMPLATE.copy()
        words = np.random.SFC64(np.random.SeedSequence(block_key)).random_raw(624) & 0xFFFFFFFF
        state[_MT_WORDS].view(np.uint64)[:] = words
        state[_MT_LEFT].view(np.int32)[0] = 1  # the next draw regenerates (twists) the state first
        generator.set_state(torch.from_numpy(state))
    return generator


def block_noise(key: int, stage: int, block: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Standard normal noise of one block: float32 tensor (NOISE_BLOCK, *shape) on ``device``, drawn from
    ``block_generator(key, stage, block, device)``."""
    generator = block_generator(key, stage, block, device)
    return torch.randn((NOISE_BLOCK, *shape), generator=generator, device=device)


def stream_noise(
    shape: tuple[int, ...], key: int, stage: int, start: int, stop: int, device: torch.device
) -> torch.Tensor:
    """Standard normal noise for samples [start, stop) of a stream: tensor (stop - start, *shape) on ``device``.

    Needs 0 ≤ start ≤ stop; an empty range gives an empty tensor.
    """
    if not 0 <= start <= stop:
        raise ValueError(f"need 0 <= start <= stop, got start={start}, stop={stop}")
    if start == stop:
        return torch.empty((0, *shape), device=device)
    first, last = start // NOISE_BLOCK, (stop - 1) // NOISE_BLOCK
    blocks = [block_noise(key, stage, block, shape, device) for block in range(first, last + 1)]
    noise = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
    offset = first * NOISE_BLOCK
    return noise[start - offset : stop - offset]


@dataclass(frozen=True)
class Chunk:
    """Samples [start, stop) of one input's noise stream, to be classified in a shared batch."""

    x: torch.Tensor  # (C, H, W), in [0, 1] pixel space, on the model's device
    sigma: float
    key: int  # the request's stream key (``stream_key``)
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


def noisy_batch(chunks: list[Chunk], device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """Concatenate x + σ·ε for every chunk: tensor (Σ sizes, C, H, W) on ``device``.

    ε is ``stream_noise`` of the chunk's range, sample for sample. A piece that covers a whole block
    is drawn straight into the batch (no temporary, no copy), then x + σ·ε is formed in place, one
    operation per chunk (measured: noise construction ~20 % cheaper than a temporary and an add per
    block, ``python -m bench.noise_ab``). The values do not depend on the memory format.
    """
    shape = tuple(chunks[0].x.shape)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    batch = torch.empty((sum(c.size for c in chunks), *shape), device=device, memory_format=memory_format)
    for c, block, lo, hi, row in _noise_pieces(chunks):
        rows = batch[row : row + hi - lo]
        if hi - lo == NOISE_BLOCK and rows.is_contiguous():  # a whole block (pieces never cross a block boundary)
            generator = block_generator(c.key, c.stage, block, device)
            torch.randn((NOISE_BLOCK, *shape), generator=generator, device=device, out=rows)
        else:  # part of a block, or rows laid out channels-last: drawn whole, the piece copied
            offset = block * NOISE_BLOCK
            rows.copy_(block_noise(c.key, c.stage, block, shape, device)[lo - offset : hi - offset])
    row = 0
    for c in (c for c in chunks if c.size > 0):
        rows = batch[row : row + c.size]
        torch.add(c.x.to(device), rows, alpha=c.sigma, out=rows)
        row += c.size
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
    equal the chunk sizes. Counting is one ``scatter_add_`` on the model's device, no loop per sample,
    and nothing is read back from the device before the counts.
    Raises ValueError if the model emits more than ``num_classes`` logits.
    """
    device = model_device(model)
    segment = chunk_rows(chunks, device)  # (B,): queued first, so its copy overlaps the noise and forward pass
    batch = noisy_batch(chunks, device, channels_last)
    logits = model(batch)  # (B, classes)
    # A class index ≥ num_classes would land in the next chunk's row of the flat counts.
    if logits.shape[1] > num_classes:
        raise ValueError(f"model gives {logits.shape[1]} logits but num_classes is {num_classes}")
    predictions = logits.argmax(dim=1)  # (B,)
    # scatter_add_, not bincount: bincount reads its input's min and max back to size its output (two syncs).
    cells = segment * num_classes + predictions
    flat = torch.zeros(len(chunks) * num_classes, dtype=torch.long, device=device)
    flat.scatter_add_(0, cells, torch.ones_like(cells))
    return flat.view(len(chunks), num_classes).cpu()  # the batch's one device-to-host copy


def chunk_rows(chunks: list[Chunk], device: torch.device) -> torch.Tensor:
    """Which chunk each row of the batch belongs to: int64 tensor (Σ sizes,) on ``device``.

    Built on the host and copied without waiting: on a GPU, ``repeat_interleave`` with device-side
    repeats must read their sum back before it can size its output (a stream synchronization per
    batch), and a copy from pageable memory waits for the work queued before it.
    """
    rows = torch.from_numpy(np.repeat(np.arange(len(chunks), dtype=np.int64), [c.size for c in chunks]))
    if device.type == "cuda":
        rows = rows.pin_memory()
    return rows.to(device, non_blocking=True)


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
    (``stream_key(seed, x)``, stage), in batches of at most ``batch_size``. Returns int64 counts (num_classes,) that
    sum to ``num``. Raises ValueError if num < 0 or batch_size < 1.
    """
    if num < 0 or batch_size < 1:
        raise ValueError(f"need num >= 0 and batch_size >= 1, got num={num}, batch_size={batch_size}")
    key, x = stream_key(seed, x), x.to(model_device(model))
    return _count_stream(model, x, key, stage, start, start + num, sigma, num_classes, batch_size, channels_last)


def _count_stream(
    model: nn.Module,
    x: torch.Tensor,
    key: int,
    stage: int,
    start: int,
    stop: int,
    sigma: float,
    num_classes: int,
    batch_size: int,
    channels_last: bool,
) -> torch.Tensor:
    """Counts of samples [start, stop) of stream (key, stage) around x (on the model's device), batch by batch."""
    counts = torch.zeros(num_classes, dtype=torch.long)
    for lo in range(start, stop, batch_size):
        chunk = Chunk(x=x, sigma=sigma, key=key, stage=stage, start=lo, stop=min(lo + batch_size, stop))
        counts += count_chunks(model, [chunk], num_classes, channels_last)[0]
    return counts


@dataclass(frozen=True)
class SampleRequest:
    """Count the base classifier on samples [start, stop) of noise stream ``stage``."""

    stage: int
    start: int
    stop: int


Procedure = Generator[SampleRequest, torch.Tensor, R]
"""A procedure yields sample requests, receives their class counts (int64, (num_classes,)) and returns its answer."""


def run(procedure: Procedure[R], sample: Callable[[SampleRequest], torch.Tensor]) -> R:
    """Drive a procedure with a synchronous sampler that returns class counts for a request."""
    try:
        request = next(procedure)
        while True:
            request = procedure.send(sample(request))
    except StopIteration as finished:
        return finished.value


def model_sampler(
    model: nn.Module,
    x: torch.Tensor,
    *,
    sigma: float,
    num_classes: int,
    batch_size: int,
    seed: int,
    channels_last: bool = False,
) -> Callable[[SampleRequest], torch.Tensor]:
    """A sampler for ``run`` that counts ``model`` on x + N(0, σ²I) from the seeded noise streams.

    The stream key (a hash of the input) is computed once, not once per sample request: a sequential
    procedure asks for dozens of chunks.
    """
    if batch_size < 1:
        raise ValueError(f"need batch_size >= 1, got {batch_size}")
    key = stream_key(seed, x)
    x = x.to(model_device(model))

    def sample(request: SampleRequest) -> torch.Tensor:
        if not 0 <= request.start <= request.stop:
            raise ValueError(f"need 0 <= start <= stop, got {request}")
        return _count_stream(
            model, x, key, request.stage, request.start, request.stop, sigma, num_classes, batch_size, channels_last
        )

    return sample
