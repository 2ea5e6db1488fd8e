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


def test_an_item_alone_in_its_turn_gets_one_chunk_per_batch() -> None:
    scheduler = Scheduler(max_pending_samples=10**6, chunk_size=128)
    alone = item(10_000, Priority.CERTIFY, seed=1)
    scheduler.submit(alone)
    batch = batch_of(scheduler, 1024)
    assert [(c.start, c.stop) for c in batch.chunks] == [(0, 1024)] and batch.items == [alone]
    other = item(10_000, Priority.CERTIFY, seed=2)
    scheduler.submit(other)
    batch = batch_of(scheduler, 512)  # two items alternate: neighbours in the batch are never merged across items
    assert [(i.key, c.start, c.stop) for i, c in zip(batch.items, batch.chunks, strict=True)] == [
        (1, 1024, 1152),
        (2, 0, 128),
        (1, 1152, 1280),
        (2, 128, 256),
    ]


def test_completing_a_batch_resolves_finished_items_with_their_counts() -> None:
    scheduler = Scheduler(max_pending_samples=10**6)
    predict = item(100, Priority.PREDICT)
    future = scheduler.submit(predict)
    batch = batch_of(scheduler)
    counts = torch.tensor([[60, 40, 0]])
    scheduler.complete(batch, counts, service_seconds=0.01)
    assert future.result(timeout=1).tolist() == [60, 40, 0]
    assert scheduler.pending_samples == 0


def served_under_a_predict_flood(scheduler: Scheduler, batches: int = 1000) -> dict[Priority, int]:
    """Samples per class over ``batches`` batches while predictions never stop coming (20 always queued)."""
    scheduler.submit(item(10**7, Priority.CERTIFY, seed=1))
    scheduler.submit(item(10**7, Priority.JOB, seed=2))
    served = dict.fromkeys(Priority, 0)
    for step in range(batches):
        while sum(i.undispatched > 0 for i in scheduler._queues[Priority.PREDICT]) < 20:
            scheduler.submit(item(100, Priority.PREDICT, seed=100 + step))
        batch = batch_of(scheduler)
        for work, chunk in zip(batch.items, batch.chunks, strict=True):
            served[work.priority] += chunk.size
        scheduler.complete(batch, torch.zeros(len(batch.chunks), 3, dtype=torch.long), service_seconds=0.01)
    return served


def test_certify_and_jobs_keep_their_shares_under_a_predict_flood() -> None:
    scheduler = Scheduler(max_pending_samples=10**9)
    served = served_under_a_predict_flood(scheduler)
    total = sum(served.values())
    for priority, share in scheduler.shares.items():
        assert served[priority] >= 0.9 * share * total, (priority, served)
    assert served[Priority.PREDICT] > served[Priority.CERTIFY] > served[Priority.JOB]


def test_shares_are_settable_and_normalised() -> None:
    shares = {Priority.PREDICT: 1.0, Priority.CERTIFY: 1.0, Priority.JOB: 2.0}
    scheduler = Scheduler(max_pending_samples=10**9, shares=shares)
    assert scheduler.shares == {Priority.PREDICT: 0.25, Priority.CERTIFY: 0.25, Priority.JOB: 0.5}
    served = served_under_a_predict_flood(scheduler)
    total = sum(served.values())
    assert served[Priority.JOB] >= 0.9 * 0.5 * total, served


def test_a_sequential_predict_client_is_served_next_while_certify_saturates() -> None:
    scheduler = Scheduler(max_pending_samples=10**9)
    for seed in range(4):
        scheduler.submit(item(10**7, Priority.CERTIFY, seed=seed))
    for step in range(200):  # one prediction at a time, a certify batch in between: strict priority's latency
        scheduler.submit(item(100, Priority.PREDICT, seed=100 + step))
        assert {i.priority for i in batch_of(scheduler).items} == {Priority.PREDICT}
        assert {i.priority for i in batch_of(scheduler).items} == {Priority.CERTIFY}


def test_a_class_back_from_idle_leads_the_next_batch_without_saved_credit() -> None:
    scheduler = Scheduler(max_pending_samples=10**9)
    scheduler.submit(item(10**6, Priority.CERTIFY, seed=1))
    for _ in range(50):  # certify alone for a while: predictions were idle
        scheduler.complete(batch := batch_of(scheduler), torch.zeros(len(batch.chunks), 3, dtype=torch.long), 0.01)
    scheduler.submit(item(100, Priority.PREDICT, seed=2))
    assert {i.priority for i in batch_of(scheduler).items} == {Priority.PREDICT}  # served at once
    for step in range(300):  # then a predict flood: it leads at first (its burst), then certify gets its turns
        scheduler.submit(item(100, Priority.PREDICT, seed=3 + step))
    leads = [batch_of(scheduler).items[0].priority for _ in range(60)]
    assert leads[:5] == [Priority.PREDICT] * 5 and Priority.CERTIFY in leads, leads


def test_backlog_is_pending_samples_over_each_models_rate_and_sets_retry_after() -> None:
    scheduler = Scheduler(max_pending_samples=10_000, expected_rates={"a": 1000.0, "b": 250.0})
    scheduler.submit(item(4000, Priority.CERTIFY, model_id="a"))
    scheduler.submit(item(1000, Priority.JOB, model_id="b"))
    assert scheduler.backlog_seconds() == {"a": 4.0, "b": 4.0}
    # A full class asks the client to come back once the backlog of every model is cleared.
    with pytest.raises(QueueFull) as full:
        scheduler.submit(item(6001, Priority.CERTIFY, model_id="a"))
    assert full.value.retry_after_s == 8
    # Timed batches replace the expectation: model a runs 1024 samples in 0.256 s (4000 samples/s).
    batch = batch_of(scheduler)
    assert batch.model_id == "a" and batch.size == 1024
    scheduler.complete(batch, torch.zeros(len(batch.chunks), 3, dtype=torch.long), service_seconds=0.256)
    rate_a = 0.9 * 1000.0 + 0.1 * 4000.0
    assert scheduler.backlog_seconds() == pytest.approx({"a": (4000 - 1024) / rate_a, "b": 4.0})


def test_each_class_has_its_own_queue_bound() -> None:
    scheduler = Scheduler(max_pending_samples=1_000)
    scheduler.submit(item(900, Priority.JOB, seed=1))
    with pytest.raises(QueueFull, match="900 noise samples of job work already pending") as full:
        scheduler.submit(item(200, Priority.JOB, seed=2))
    assert full.value.retry_after_s >= 1
    scheduler.submit(item(1_000, Priority.PREDICT, seed=3))  # a full batch class leaves interactive work room
    scheduler.submit(item(1_000, Priority.CERTIFY, seed=4))
    assert scheduler.pending_samples == 2_900
    with pytest.raises(QueueFull, match="of predict work"):
        scheduler.submit(item(1, Priority.PREDICT, seed=5))
    batch = batch_of(scheduler)  # predictions first: their class's room comes back as they are counted
    scheduler.complete(batch, torch.zeros(len(batch.chunks), 3, dtype=torch.long), service_seconds=0.01)
    scheduler.submit(item(1, Priority.PREDICT, seed=5))
