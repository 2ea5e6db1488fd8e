"""The benchmark's one compute thread: every in-process forward pass runs there, as the service's run on its executor.

Why it matters: libgomp (PyTorch's OpenMP) keeps a team of worker threads for every thread that
ever ran a parallel operation, and when a process holds more such threads than there are CPUs it
stops spinning at barriers and puts its workers to sleep between operations. The service keeps
one team (its executor's; every other thread computes on one core, see service.engine.executor), so the
benchmark does the same: ``start_compute_thread`` sets up the compute thread with PyTorch's
default thread count, then limits the calling (main) thread and every later one to one. Measured
on a 2-core machine, a second team cost the forward passes about a quarter of their throughput.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import ParamSpec, TypeVar

import torch

from smoothing.runtime import claim_threads

P = ParamSpec("P")
R = TypeVar("R")

THREAD_NAME = "bench-compute"
_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=THREAD_NAME)


def start_compute_thread() -> int:
    """Give the compute thread PyTorch's default thread count and every other thread one; returns the count."""
    threads = _executor.submit(claim_threads, torch.get_num_threads()).result()
    torch.set_num_threads(1)
    return threads


def on_compute_thread(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """``fn(*args, **kwargs)`` on the compute thread, waiting for it (directly when already there)."""
    if threading.current_thread().name.startswith(THREAD_NAME):
        return fn(*args, **kwargs)
    return _executor.submit(fn, *args, **kwargs).result()


def submit_to_compute_thread(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> Future[R]:
    """Queue ``fn(*args, **kwargs)`` on the compute thread without waiting: calls run one at a time, in the
    order they were submitted (first in, first out)."""
    return _executor.submit(fn, *args, **kwargs)
