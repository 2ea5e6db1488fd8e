"""The benchmark's one compute thread: every in-process forward pass runs there, as the service's run on its executor.

Why it matters: libgomp (PyTorch's OpenMP) lets a waiting thread spin for long at a barrier when
it manages no more threads than there are CPUs, and yields the CPU quickly when it manages more.
The service process holds two OpenMP teams (its model-loading thread's and its executor's), so
it yields. A benchmark computing on its main thread alone held one team and spun: on this shared
2-core machine that measured L at 2-3× fewer samples per CPU-second than the same code on a
second thread, and the service then ran "faster than L". The benchmark therefore mirrors the
service: ``open_main_team`` gives the main thread a team, and the forward passes run on a
second thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

import torch

P = ParamSpec("P")
R = TypeVar("R")

THREAD_NAME = "bench-compute"
_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=THREAD_NAME)


def open_main_team() -> None:
    """Run one parallel operation on the calling thread, so that it holds an OpenMP team as the service's
    loading thread does (4M elements: well above ATen's grain size of 32,768 per thread)."""
    torch.rand(1 << 22).exp_().sum()


def on_compute_thread(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """``fn(*args, **kwargs)`` on the compute thread, waiting for it (directly when already there)."""
    if threading.current_thread().name.startswith(THREAD_NAME):
        return fn(*args, **kwargs)
    return _executor.submit(fn, *args, **kwargs).result()
