"""The scheduler alone (no model, no HTTP): which work goes into each batch."""

from __future__ import annotations

import pytest
import torch

from service.engine.scheduler import Priority, QueueFull, Scheduler, WorkItem

MODEL = "m"


def item(num: int, priority: Priority, seed: int = 0, model_id: str = MODEL) -> WorkItem:
    return WorkItem(
        model_id=model_id,
        x=torch.zeros(1, 2, 2),
        sigma=0.5,
        key=seed,
        stage=1,
        num=num,
        num_classes=3,
        priority=priority,
    )


def batch_of(scheduler: Scheduler, size: int = 1024):
    batch = scheduler.next_batch(lambda _, interactive: size // 4 if interactive else size, timeout=0.0)
    assert batch is not None
    return batch


def test_a_batch_led_by_predict_work_holds_predict_work_only() -> None:
    scheduler = Scheduler(max_pending_samples=10**6)
    certify = item(10_000, Priority.CERTIFY, seed=1)
    scheduler.submit(certify)
    predict = item(100, Priority.PREDICT, seed=2)
    scheduler.submit(predict)
    first = batch_of(scheduler)
    assert set(first.items) == {predict} and first.size == 100
    second = batch_of(scheduler)
    # Predictions are recent: certification batches take the interactive size (here a quarter), not the full one.
    assert set(second.items) == {certify} and second.size == 256


def test_batches_are_full_size_until_predict_work_arrives() -> None:
    scheduler = Scheduler(max_pending_samples=10**6)
    scheduler.submit(item(10_000, Priority.CERTIFY, seed=1))
    assert batch_of(scheduler).size == 1024
    scheduler.submit(item(100, Priority.PREDICT, seed=2))
    assert batch_of(scheduler).size == 100
    assert batch_of(scheduler).size == 256


def test_certify_led_batches_fill_up_round_robin_across_items() -> None:
    scheduler = Scheduler(max_pending_samples=10**6, chunk_size=128)
    items = [item(1000, Priority.CERTIFY, seed=i) for i in range(3)]
    for i in items:
        scheduler.submit(i)
    batch = batch_of(scheduler, 768)
    assert batch.size == 768
    assert [batch.items.count(i) for i in items] == [2, 2, 2]  # one chunk each per turn


def test_completing_a_batch_resolves_finished_items_with_their_counts() -> None:
    scheduler = Scheduler(max_pending_samples=10**6)
    predict = item(100, Priority.PREDICT)
    future = scheduler.submit(predict)
    batch = batch_of(scheduler)
    counts = torch.tensor([[60, 40, 0]])
    scheduler.complete(batch, counts, service_seconds=0.01)
    assert future.result(timeout=1).tolist() == [60, 40, 0]
    assert scheduler.pending_samples == 0


def test_backlog_is_pending_samples_over_each_models_rate_and_sets_retry_after() -> None:
    scheduler = Scheduler(max_pending_samples=10_000, expected_rates={"a": 1000.0, "b": 250.0})
    scheduler.submit(item(4000, Priority.CERTIFY, model_id="a"))
    scheduler.submit(item(1000, Priority.JOB, model_id="b"))
    assert scheduler.backlog_seconds() == {"a": 4.0, "b": 4.0}
    # A full queue asks the client to come back once the backlog of every model is cleared.
    with pytest.raises(QueueFull) as full:
        scheduler.submit(item(6000, Priority.PREDICT, model_id="a"))
    assert full.value.retry_after_s == 8
    # Timed batches replace the expectation: model a runs 1024 samples in 0.256 s (4000 samples/s).
    batch = batch_of(scheduler)
    assert batch.model_id == "a" and batch.size == 1024
    scheduler.complete(batch, torch.zeros(len(batch.chunks), 3, dtype=torch.long), service_seconds=0.256)
    rate_a = 0.9 * 1000.0 + 0.1 * 4000.0
    assert scheduler.backlog_seconds() == pytest.approx({"a": (4000 - 1024) / rate_a, "b": 4.0})
