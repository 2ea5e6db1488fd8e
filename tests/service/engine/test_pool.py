"""The pool: several executors on one scheduler, answers equal to the library's, failing devices taken out.

Two CPU executors stand in for two devices (CI has no GPU): they share one tuned copy of the tiny
model and each takes whichever batch is next. A failing device is the same model behind a
wrapper that raises on one executor's thread only.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
import torch
from fastapi.testclient import TestClient
from library_check import assert_same_answers, certify_concurrently, library_certificates
from tiny_model import TINY_ID
from torch import nn

from service.engine.pool import AUTO_CPU_EXECUTORS, Pool, Slot, load_settings_models, parse_devices, start_engine
from service.engine.scheduler import Priority, Scheduler, WorkItem
from service.http.app import create_app
from service.settings import Settings


class FailsOn(nn.Module):
    """``model``, except that a forward pass on the thread named ``thread`` raises ``error``."""

    def __init__(self, model: nn.Module, thread: str, error: type[BaseException]) -> None:
        super().__init__()
        self.model = model
        self.thread = thread
        self.error = error

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if threading.current_thread().name == self.thread:
            raise self.error(f"device on {self.thread} is gone")
        return self.model(x)


class DeviceLost(BaseException):
    """Not an Exception: nothing in the executor's forward-pass handling catches it, so its thread dies."""


def test_devices_name_the_executors() -> None:
    for spec in ("cpu*2", "cpu×2", "cpu:2", "CPU x 2"):
        assert parse_devices(spec, threads=4) == [
            Slot("cpu#0", torch.device("cpu"), 2),
            Slot("cpu#1", torch.device("cpu"), 2),
        ]
    assert parse_devices("cpu", threads=3) == [Slot("cpu", torch.device("cpu"), 3)]
    assert [s.threads for s in parse_devices("cpu*4", threads=2)] == [1, 1, 1, 1]
    if not torch.cuda.is_available():
        assert len(parse_devices("auto")) == AUTO_CPU_EXECUTORS
        with pytest.raises(ValueError, match="not visible"):
            parse_devices("cuda:0")
    for bad in ("", "tpu", "cpu*0", "cpu,cpu"):
        with pytest.raises(ValueError):
            parse_devices(bad)


def test_requeued_chunks_run_again_and_the_counts_add_up() -> None:
    scheduler = Scheduler(max_pending_samples=10**6, chunk_size=128)
    item = WorkItem("m", torch.zeros(1, 2, 2), 0.5, key=1, stage=1, num=300, num_classes=3, priority=Priority.CERTIFY)
    future = scheduler.submit(item)
    failed = scheduler.next_batch(lambda *_: 256, timeout=0.0)
    assert [(c.start, c.stop) for c in failed.chunks] == [(0, 256)]  # an item alone: its two chunks as one
    scheduler.requeue(failed, RuntimeError("device lost"))
    assert scheduler.pending_samples == 300 and not future.done()
    ranges = []
    while not future.done():
        batch = scheduler.next_batch(lambda *_: 256, timeout=0.0)
        ranges += [(c.start, c.stop) for c in batch.chunks]
        scheduler.complete(batch, torch.tensor([[c.size, 0, 0] for c in batch.chunks]), 0.01)
    assert sorted(ranges) == [(0, 256), (256, 300)]  # the returned range, then the rest, once each
    assert future.result().tolist() == [300, 0, 0] and scheduler.pending_samples == 0


def test_an_item_failing_on_every_device_fails_instead_of_circulating() -> None:
    scheduler = Scheduler(max_pending_samples=10**6)
    item = WorkItem("m", torch.zeros(1, 2, 2), 0.5, key=1, stage=1, num=100, num_classes=3, priority=Priority.CERTIFY)
    future = scheduler.submit(item)
    while not future.done():
        scheduler.requeue(scheduler.next_batch(lambda *_: 256, timeout=0.0), RuntimeError("bad input"))
    with pytest.raises(RuntimeError, match="bad input"):
        future.result()
    assert scheduler.pending_samples == 0


@pytest.fixture
def two_cpus(make_settings: Callable[..., Settings]) -> Iterator[tuple[Settings, list[Slot], dict]]:
    settings = make_settings(devices="cpu*2", threads=2)
    slots = parse_devices(settings.devices, settings.threads)
    with ThreadPoolExecutor(1) as loader:  # a passing thread, as the service loads (its OpenMP team goes with it)
        models = loader.submit(load_settings_models, settings, slots).result()
    yield settings, slots, models


def test_two_cpu_executors_share_the_work_and_answer_as_the_library(two_cpus) -> None:
    settings, slots, models = two_cpus
    ran_on: list[str] = []
    record = lambda batch, seconds: ran_on.append(threading.current_thread().name)  # noqa: E731
    engine, pool = start_engine(settings, slots, models, on_batch=record)
    try:
        assert [e.threads for e in pool.executors] == [1, 1]
        assert pool.executors[0].models[TINY_ID] is pool.executors[1].models[TINY_ID]  # loaded and tuned once
        service = certify_concurrently(engine)
    finally:
        pool.stop()
    assert set(ran_on) == {"cpu#0", "cpu#1"}  # both devices ran batches of the same requests
    assert_same_answers(service, library_certificates(models["cpu#0"][TINY_ID]))


@pytest.mark.parametrize("error", [RuntimeError, DeviceLost], ids=["forward-pass-raises", "thread-dies"])
def test_a_failing_device_leaves_the_pool_and_its_work_runs_on_the_other(two_cpus, error) -> None:
    settings, slots, models = two_cpus
    healthy = models["cpu#0"][TINY_ID]
    failing = replace(healthy, plan=replace(healthy.plan, model=FailsOn(healthy.plan.model, "cpu#1", error)))
    models = {"cpu#0": models["cpu#0"], "cpu#1": {TINY_ID: failing}}
    engine, pool = start_engine(settings, slots, models)
    try:
        service = certify_concurrently(engine)
        devices = {d["name"]: d for d in pool.devices()}
        assert pool.alive and devices["cpu#0"]["alive"] and devices["cpu#0"]["error"] is None
        assert not devices["cpu#1"]["alive"]
        assert "device on cpu#1 is gone" in devices["cpu#1"]["error"]
        assert engine.scheduler.pending_samples == 0
    finally:
        pool.stop()
    assert_same_answers(service, library_certificates(healthy))


def test_readiness_lists_the_devices_and_stays_ready_without_the_failed_one(
    make_settings: Callable[..., Settings],
) -> None:
    with TestClient(create_app(make_settings(devices="cpu*2", threads=2))) as client:
        pool: Pool = client.app.state.services.pool
        second = pool.executors[1]
        loaded = second.models[TINY_ID]
        broken = replace(loaded, plan=replace(loaded.plan, model=FailsOn(loaded.plan.model, "cpu#1", RuntimeError)))
        second.models = {TINY_ID: broken}
        for k in range(20):  # until the broken device has failed three batches in a row
            body = {"array": [0.4 + k / 100] * 784, "shape": [1, 28, 28], "n0": 64, "n": 2048, "seed": k}
            answer = client.post("/v1/certify", json=body)  # a new input each time: never a cache hit
            assert answer.status_code == 200, answer.text
            if not second.alive:
                break
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        devices = {d["name"]: d for d in ready.json()["devices"]}
        assert devices["cpu#0"]["alive"] and devices["cpu#0"]["error"] is None
        assert not devices["cpu#1"]["alive"] and "3 forward passes in a row failed" in devices["cpu#1"]["error"]


def test_one_executor_shortens_its_batches_for_predictions_and_another_takes_over_when_it_dies(two_cpus) -> None:
    settings, slots, models = two_cpus
    engine, pool = start_engine(settings, slots, models)
    first, second = pool.executors
    try:
        assert first.shortens(first) and not second.shortens(second)
        plan = first.models[TINY_ID].plan
        assert first._batch_size_for(TINY_ID, True) == min(plan.interactive_batch_size, first.batch_size(TINY_ID))
        first.stop()
        assert not first.alive and second.shortens(second)  # the pool still has a short-batch executor
    finally:
        pool.stop()
