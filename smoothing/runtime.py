"""How a model runs fast on a device: the process's memory and thread settings, reduced precision and
BatchNorm folding. ``smoothing.tuning`` measures which of them pay off; this module only applies them."""

from __future__ import annotations

import ctypes
import logging

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

log = logging.getLogger(__name__)

PRECISIONS: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The precisions a model may run at: float32 as trained, or under autocast to a reduced dtype."""


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit systems
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the kernel.

    Every forward pass frees and re-allocates the same multi-megabyte activation buffers. By
    default glibc serves them with fresh pages (mmap, or a heap it trimmed after the last batch),
    which the kernel must fault in and zero again: the shipped fmnist-resnet (bfloat16, batch
    1,024) ran at 50,000 samples/s instead of 80,000 on a 2-core CPU. The price: the process's
    resident memory stays near its peak. Process-wide; returns False where the C library is not glibc.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def claim_threads(threads: int) -> int:
    """Make the calling thread compute on ``threads`` intra-op threads, whatever the process-wide count later
    becomes; returns the count now in effect.

    ``torch.set_num_threads`` sets the calling thread's count and the process-wide one that threads take at
    their first parallel operation. Reading the count back completes that per-thread set-up at once, so a
    later ``torch.set_num_threads(1)`` on another thread no longer reaches this one.
    """
    torch.set_num_threads(threads)
    return torch.get_num_threads()


class Autocast(nn.Module):
    """Runs ``model`` under ``torch.autocast`` to ``dtype`` and returns float32 logits.

    The smoothed classifier is then that of the reduced-precision base classifier: its
    certificates hold for the classifier actually run.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype, device_type: str) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype
        self.device_type = device_type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.model(x).float()


def with_precision(model: nn.Module, precision: str, device: torch.device) -> nn.Module:
    """``model`` itself for float32, else wrapped to run under autocast to ``precision``."""
    dtype = PRECISIONS[precision]
    return model if dtype is None else Autocast(model, dtype, device.type)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy with every Conv→BatchNorm pair folded into the convolution.

    Outputs equal the original's up to float rounding. Models that torch.fx cannot trace are
    returned unchanged (in eval mode).
    """
    model = model.eval()
    try:
        return fuse(model, inplace=False)
    except Exception as e:  # fx tracing fails on data-dependent control flow; folding is only a speed-up
        log.warning("BatchNorm folding skipped (%s: %s)", type(e).__name__, e)
        return model
