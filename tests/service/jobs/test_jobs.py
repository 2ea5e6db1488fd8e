"""Batch jobs: the stores (SQLite and the real Redis), the runner on a real engine, resume, cancel, progress."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest
import redis
import torch
from prometheus_client import REGISTRY
from torch import nn

from models.architectures import build_model
from models.checkpoint import Manifest
from service.engine.engine import Engine, UnknownModel
from service.engine.executor import Executor
from service.engine.models import LoadedModel
from service.engine.scheduler import Scheduler
from service.jobs.runner import JobRunner, certify_image, image_seed, owner_hash, results_tsv
from service.jobs.store import JobRecord, JobStore, RedisJobStore, SqliteJobStore, decode_inputs, encode_inputs
from service.jobs.uploads import ParsedUpload
from smoothing.core import certify
from smoothing.procedures import api_question, certificate_summary
from smoothing.runtime import fold_batchnorm
from smoothing.sampling import model_sampler, run
from smoothing.tuning import InferencePlan

REDIS_URL = "redis://127.0.0.1:6379/14"
SEED = 1234
SHAPE = (1, 28, 28)


class Brightness(nn.Module):
    """Class 1 when the mean pixel is above 1/2, else class 0: mean 1/2 splits the noise evenly (abstain)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        margin = 50.0 * (x.mean(dim=(1, 2, 3)) - 0.5)
        return torch.stack([-margin, margin], dim=1)


def loaded(model: nn.Module, model_id: str, classes: int) -> LoadedModel:
    manifest = Manifest(
        id=model_id,
        architecture="fmnist_resnet",
        dataset="fashion-mnist",
        classes=[f"c{i}" for i in range(classes)],
        input_shape=SHAPE,
        sigma=0.25,
        normalization={"mean": [0.286], "std": [0.353]},
        sha256="0" * 64,
    )
    plan = InferencePlan(fold_batchnorm(model), batch_size=64, channels_last=False, samples_per_second=1000.0)
    return LoadedModel(manifest, plan, torch.device("cpu"))


@pytest.fixture(scope="module")
def engine() -> Engine:
    torch.manual_seed(0)
    models = {
        "tiny": loaded(build_model("fmnist_resnet", 10, (0.286,), (0.353,)), "tiny", 10),
        "bright": loaded(Brightness(), "bright", 2),
    }
    scheduler = Scheduler(max_pending_samples=50_000_000)
    executor = Executor(scheduler, models)
    executor.start()
    yield Engine(scheduler, models, timeout_s=60.0)
    executor.stop()


@pytest.fixture
def redis_url() -> str:
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield REDIS_URL
    client.flushdb()
    client.close()


@pytest.fixture(params=["sqlite", "redis"])
def make_store(request, tmp_path) -> Callable[[], JobStore]:
    """A factory, so that a test can 'restart' with a fresh store on the same data."""
    if request.param == "sqlite":
        return lambda: SqliteJobStore(tmp_path / "state" / "jobs.sqlite3")
    url = request.getfixturevalue("redis_url")
    return lambda: RedisJobStore(url)


@pytest.fixture
def sqlite_store(tmp_path) -> Callable[[], JobStore]:
    return lambda: SqliteJobStore(tmp_path / "jobs.sqlite3")


class GatedEngine:
    """The real engine, recording every image's seed; images whose gate is closed wait until it opens."""

    def __init__(self, engine: Engine, closed: set[int] = frozenset()) -> None:
        self.engine = engine
        self.gates = {image_seed(SEED, idx): asyncio.Event() for idx in closed}
        self.seeds: list[int] = []
        self.waiting = 0
        self.cancelled = 0

    def model(self, model_id: str) -> LoadedModel:
        return self.engine.model(model_id)

    def open(self, *indices: int) -> None:
        for idx in indices:
            self.gates[image_seed(SEED, idx)].set()

    def indices(self, total: int) -> list[int]:
        by_seed = {image_seed(SEED, idx): idx for idx in range(total)}
        return [by_seed[s] for s in self.seeds]

    async def run(self, model_id: str, x: torch.Tensor, procedure, **kwargs):
        self.seeds.append(kwargs["seed"])
        gate = self.gates.get(kwargs["seed"])
        if gate is not None and not gate.is_set():
            self.waiting += 1
            try:
                await gate.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
            finally:
                self.waiting -= 1
        return await self.engine.run(model_id, x, procedure, **kwargs)


async def until(predicate: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


async def state_is(runner: JobRunner, job_id: str, state: str) -> bool:
    return (await runner.status(job_id, None))["state"] == state


def random_upload(count: int, seed: int = 0) -> ParsedUpload:
    images = torch.rand((count, *SHAPE), generator=torch.Generator().manual_seed(seed))
    return ParsedUpload(images, [i % 10 for i in range(count)], [f"img{i}.png" for i in range(count)])


def brightness_upload(means: list[float]) -> ParsedUpload:
    images = torch.stack([torch.full(SHAPE, m) for m in means])
    return ParsedUpload(images, [int(m > 0.5) for m in means], [f"m{m}" for m in means])


# -- stores ------------------------------------------------------------------------------------


def test_inputs_round_trip_bit_for_bit() -> None:
    eight_bit = ParsedUpload(torch.randint(0, 256, (3, *SHAPE)).float() / 255, [1, 2, 3], ["a", "b/../c", "é"])
    floats = ParsedUpload(torch.rand((3, *SHAPE)), None, ["0", "1", "2"])
    for inputs in (eight_bit, floats):
        back = decode_inputs(encode_inputs(inputs))
        assert torch.equal(back.images, inputs.images) and back.images.dtype == torch.float32
        assert back.labels == inputs.labels and back.names == inputs.names
    # Decoded 8-bit images are stored as bytes, not floats.
    assert len(encode_inputs(eight_bit)) < len(encode_inputs(floats)) / 2


def test_store_contract(make_store) -> None:
    async def scenario() -> None:
        store = make_store()
        job = JobRecord(
            id="job-1",
            owner=None,
            model_id="tiny",
            n0=16,
            n=64,
            alpha=0.001,
            seed=2**62 + 5,
            total=3,
            created=100.0,
            updated=100.0,
        )
        inputs = random_upload(3)
        await store.create(job, inputs)
        assert await store.get("job-1") == job and await store.get("nope") is None
        assert torch.equal((await store.inputs("job-1")).images, inputs.images)
        assert await store.unfinished() == ["job-1"]
        assert await store.set_state("job-1", "running")
        row = {"idx": 1, "abstained": True, "time": 0.5, "name": "first"}
        assert await store.put_result("job-1", row)
        assert not await store.put_result("job-1", row | {"name": "second", "time": 9.0})  # idempotent
        assert await store.put_result("job-1", {"idx": 0, "abstained": False, "time": 0.25})
        assert [r["idx"] for r in await store.results("job-1")] == [0, 1]
        assert (await store.results("job-1"))[1]["name"] == "first"
        assert await store.done_indices("job-1") == {0, 1}
        summary = await store.summary("job-1")
        assert (summary.done, summary.abstentions, summary.seconds) == (2, 1, 0.75)
        assert await store.set_state("job-1", "done")
        assert not await store.set_state("job-1", "cancelled")  # a finished job stays finished
        finished = await store.get("job-1")
        assert finished.state == "done" and finished.updated > 100.0
        assert await store.inputs("job-1") is None  # dropped once finished
        assert await store.unfinished() == []
        counts = await store.count_by_state()
        assert counts["done"] == 1 and counts["queued"] == counts["running"] == 0
        assert not await store.set_state("nope", "running")
        await store.close()

        reopened = make_store()  # what a restart sees
        assert (await reopened.get("job-1")).state == "done"
        assert len(await reopened.results("job-1")) == 2
        await reopened.close()

    asyncio.run(scenario())


def test_recent_lists_an_owners_jobs_newest_first(make_store) -> None:
    async def scenario() -> None:
        store = make_store()
        owners = [owner_hash("a"), owner_hash("b"), owner_hash("a"), None, owner_hash("a")]
        for i, owner in enumerate(owners):
            job = JobRecord(
                id=f"job-{i}", owner=owner, model_id="tiny", n0=1, n=1, alpha=0.01, seed=i, total=1, created=100.0 + i
            )
            await store.create(job, random_upload(1))
        await store.set_state("job-2", "done")
        mine = await store.recent(owner_hash("a"), 10)
        assert [job.id for job in mine] == ["job-4", "job-2", "job-0"] and mine[1].state == "done"
        assert [job.id for job in await store.recent(owner_hash("a"), 2)] == ["job-4", "job-2"]
        assert [job.id for job in await store.recent(None, 10)] == ["job-3"]
        assert await store.recent(owner_hash("nobody"), 10) == []
        await store.close()

    asyncio.run(scenario())


def test_redis_keys_carry_the_prefix(redis_url) -> None:
    async def scenario() -> None:
        store = RedisJobStore(redis_url)
        job = JobRecord(id="abc", owner=owner_hash("k"), model_id="tiny", n0=1, n=1, alpha=0.01, seed=1, total=1)
        await store.create(job, random_upload(1))
        await store.put_result("abc", {"idx": 0, "abstained": False, "time": 0.1})
        await store.close()

    asyncio.run(scenario())
    keys = {k.decode() for k in redis.Redis.from_url(redis_url).keys("*")}
    assert keys and all(k.startswith("certserve:job:") for k in keys)


# -- the runner on a real engine --------------------------------------------------------------


def test_job_runs_to_completion_and_matches_the_library(engine, sqlite_store) -> None:
    upload = random_upload(6)

    async def scenario() -> tuple[str, dict, list[dict]]:
        runner = JobRunner(sqlite_store(), engine, concurrency=3)
        await runner.start()
        job_id = await runner.create(None, upload, "tiny", n0=16, n=64, alpha=0.001, seed=SEED)
        await until(lambda: state_is(runner, job_id, "done"))
        status, rows = await runner.status(job_id, None), await runner.results(job_id, None)
        await runner.stop()
        return job_id, status, rows

    job_id, status, rows = asyncio.run(scenario())
    assert len(job_id) >= 22
    assert status["done"] == status["total"] == 6 and status["eta_s"] == 0.0
    assert status["params"] == {
        "n0": 16,
        "n": 64,
        "alpha": 0.001,
        "seed": SEED,
        "mode": "fixed",
        "radius": None,
        "tolerance": None,
    }
    assert [r["idx"] for r in rows] == list(range(6))
    assert [r["name"] for r in rows] == upload.names and [r["label"] for r in rows] == upload.labels
    plan = engine.model("tiny").plan
    for row in rows[:3]:
        expected = certify(
            plan.model,
            upload.images[row["idx"]],
            sigma=0.25,
            num_classes=10,
            n0=16,
            n=64,
            alpha=0.001,
            batch_size=64,
            seed=image_seed(SEED, row["idx"]),
        )
        assert row["predict"] == expected.label
        # Same samples; only a near-tie argmax could flip in another batch composition.
        assert abs(row["count_a"] - expected.n_a) <= 2
        assert row["correct"] == (expected.label == row["label"])
    assert status["abstentions"] == sum(r["abstained"] for r in rows)


def test_restart_resumes_without_repeating_or_losing_images(engine, make_store) -> None:
    total = 8
    upload = random_upload(total, seed=1)

    async def scenario() -> None:
        # First life: images 0-2 finish, 3 and 4 are in flight (held) when the runner stops.
        first = GatedEngine(engine, closed=set(range(3, total)))
        runner = JobRunner(make_store(), first, concurrency=2)
        job_id = await runner.create(None, upload, "tiny", n0=16, n=64, alpha=0.001, seed=SEED)
        await until(lambda: _ready(first, 2))
        await runner.stop()
        assert first.cancelled == 2
        status = await runner.status(job_id, None)
        assert status["state"] == "running" and status["done"] == 3
        finished_before = await runner.store.done_indices(job_id)
        rows_before = {r["idx"]: r for r in await runner.results(job_id, None)}
        await runner.store.close()

        # Second life: a new store on the same data and a new runner.
        second = GatedEngine(engine)
        runner = JobRunner(make_store(), second, concurrency=2)
        await runner.start()
        await until(lambda: state_is(runner, job_id, "done"))
        rows = await runner.results(job_id, None)
        assert [r["idx"] for r in rows] == list(range(total))  # each image exactly once
        assert finished_before == {0, 1, 2}
        assert sorted(second.indices(total)) == list(range(3, total))  # nothing recomputed, nothing lost
        assert all(rows[i] == rows_before[i] for i in finished_before)
        assert (await runner.status(job_id, None))["done"] == total
        await runner.stop()
        await runner.store.close()

    async def _ready(gated: GatedEngine, waiting: int) -> bool:
        return gated.waiting == waiting

    asyncio.run(scenario())


def test_cancel_stops_remaining_and_in_flight_images(engine, sqlite_store) -> None:
    async def scenario() -> None:
        gated = GatedEngine(engine, closed=set(range(2, 10)))
        runner = JobRunner(sqlite_store(), gated, concurrency=3)
        job_id = await runner.create(None, random_upload(10), "tiny", n0=16, n=64, alpha=0.001, seed=SEED)
        await until(lambda: _waiting(gated, 3))
        assert await runner.cancel(job_id, None)
        assert gated.cancelled == 3 and gated.waiting == 0
        status = await runner.status(job_id, None)
        assert status["state"] == "cancelled" and status["eta_s"] is None
        await asyncio.sleep(0.2)
        assert len(gated.seeds) == 5  # images 0, 1 and the three in flight; nothing after
        assert [r["idx"] for r in await runner.results(job_id, None)] == [0, 1]
        assert await runner.cancel(job_id, None)  # again: still there, still cancelled
        await runner.stop()

        restarted = GatedEngine(engine)
        runner = JobRunner(sqlite_store(), restarted, concurrency=3)
        await runner.start()
        await asyncio.sleep(0.2)
        assert restarted.seeds == [] and await state_is(runner, job_id, "cancelled")
        await runner.stop()

    async def _waiting(gated: GatedEngine, count: int) -> bool:
        return gated.waiting == count

    asyncio.run(scenario())


def test_cancel_drops_the_in_flight_samples_from_the_scheduler(engine, sqlite_store) -> None:
    scheduler = engine.scheduler

    async def scenario() -> None:
        runner = JobRunner(sqlite_store(), engine, concurrency=2)
        job_id = await runner.create(None, random_upload(4), "tiny", n0=16, n=5_000_000, alpha=0.001, seed=SEED)
        await until(lambda: _true(scheduler.pending_samples > 5_000_000))
        assert await runner.cancel(job_id, None)
        # Nothing of the job is left for the executor (asking for a batch here would steal one if there were).
        await until(lambda: _true(scheduler.next_batch(lambda *_: 64, timeout=0.0) is None), timeout=5.0)
        assert scheduler.pending_samples < 5_000_000
        assert (await runner.status(job_id, None))["done"] == 0
        await runner.stop()

    async def _true(value: bool) -> bool:
        return value

    asyncio.run(scenario())


def test_progress_counts_abstentions_and_estimates_time_left(engine, sqlite_store) -> None:
    # Means 0.2 and 0.8 are certain; 0.5 splits the noise evenly and abstains.
    upload = brightness_upload([0.2, 0.5, 0.8, 0.5, 0.2, 0.8])

    async def scenario() -> None:
        gated = GatedEngine(engine, closed=set(range(6)))
        runner = JobRunner(sqlite_store(), gated, concurrency=2)
        job_id = await runner.create(None, upload, "bright", n0=16, n=64, alpha=0.001, seed=SEED)
        await until(lambda: _waiting(gated, 2))
        status = await runner.status(job_id, None)
        assert (status["state"], status["done"], status["total"], status["eta_s"]) == ("running", 0, 6, None)

        gated.open(0, 1)
        await until(lambda: _done(runner, job_id, 2))
        await until(lambda: _waiting(gated, 2))
        status = await runner.status(job_id, None)
        times = [r["time"] for r in await runner.results(job_id, None)]
        assert status["abstentions"] == 1
        assert status["eta_s"] == pytest.approx(sum(times) / 2 * 4 / 2)

        gated.open(2, 3, 4, 5)
        await until(lambda: state_is(runner, job_id, "done"))
        status = await runner.status(job_id, None)
        rows = await runner.results(job_id, None)
        assert (status["done"], status["abstentions"], status["eta_s"]) == (6, 2, 0.0)
        assert [r["predict"] for r in rows] == [0, None, 1, None, 0, 1]
        assert [r["correct"] for r in rows] == [True, False, True, False, True, True]
        # The jobs gauge follows the store once the runner has published the final state.
        await until(lambda: _gauge_is({"done": 1.0, "running": 0.0, "queued": 0.0}))
        await runner.stop()

    async def _gauge_is(expected: dict[str, float]) -> bool:
        return all(REGISTRY.get_sample_value("certserve_jobs", {"state": k}) == v for k, v in expected.items())

    async def _waiting(gated: GatedEngine, count: int) -> bool:
        return gated.waiting == count

    async def _done(runner: JobRunner, job_id: str, count: int) -> bool:
        return (await runner.status(job_id, None))["done"] == count

    asyncio.run(scenario())


def test_a_job_is_visible_only_to_its_owner(engine, sqlite_store) -> None:
    async def scenario() -> None:
        gated = GatedEngine(engine, closed=set(range(2)))
        runner = JobRunner(sqlite_store(), gated, concurrency=2)
        mine = await runner.create("key-a", random_upload(2), "tiny", n0=16, n=64, alpha=0.001, seed=SEED)
        open_job = await runner.create(None, random_upload(2), "tiny", n0=16, n=64, alpha=0.001, seed=SEED)
        assert mine != open_job
        assert (await runner.status(mine, "key-a"))["id"] == mine
        for other in ("key-b", None):
            assert await runner.status(mine, other) is None
            assert await runner.results(mine, other) is None
            assert not await runner.cancel(mine, other)
        assert await runner.status(open_job, "key-a") is None
        assert await runner.status("no-such-job", None) is None
        assert (await runner.store.get(mine)).owner == owner_hash("key-a") != "key-a"
        assert await runner.cancel(mine, "key-a")
        await runner.stop()

    asyncio.run(scenario())


def test_a_job_whose_model_is_gone_fails_with_a_reason(engine, sqlite_store) -> None:
    async def scenario() -> None:
        store = sqlite_store()
        job = JobRecord(
            id="orphan",
            owner=None,
            model_id="gone",
            n0=16,
            n=64,
            alpha=0.001,
            seed=1,
            total=2,
            created=time.time(),
            updated=time.time(),
        )
        await store.create(job, random_upload(2))
        runner = JobRunner(store, engine)
        await runner.start()
        await until(lambda: state_is(runner, "orphan", "failed"))
        status = await runner.status("orphan", None)
        assert "gone" in status["error"] and status["eta_s"] is None
        await runner.stop()

    asyncio.run(scenario())


def test_create_checks_the_model_and_the_input_shape(engine, sqlite_store) -> None:
    async def scenario() -> None:
        runner = JobRunner(sqlite_store(), engine)
        with pytest.raises(UnknownModel):
            await runner.create(None, random_upload(1), "nope", n0=16, n=64, alpha=0.001)
        wrong = ParsedUpload(torch.rand(2, 3, 28, 28), None, ["a", "b"])
        with pytest.raises(ValueError, match="do not fit"):
            await runner.create(None, wrong, "tiny", n0=16, n=64, alpha=0.001)
        with pytest.raises(ValueError, match="alpha"):
            await runner.create(None, random_upload(1), "tiny", n0=16, n=64, alpha=0.5)
        assert await runner.store.unfinished() == []

    asyncio.run(scenario())


def test_certify_image_writes_once_and_skips_finished_jobs(engine, sqlite_store) -> None:
    async def scenario() -> None:
        store = sqlite_store()
        upload = random_upload(2)
        job = JobRecord(
            id="j",
            owner=None,
            model_id="tiny",
            n0=16,
            n=64,
            alpha=0.001,
            seed=SEED,
            total=2,
            created=time.time(),
            updated=time.time(),
        )
        await store.create(job, upload)
        first = await certify_image(store, engine, "j", 1, upload)
        again = await certify_image(store, engine, "j", 1, upload)
        assert first["idx"] == again["idx"] == 1 and first["predict"] == again["predict"]
        assert (await store.summary("j")).done == 1
        assert (await store.results("j"))[0]["time"] == first["time"]  # the first write stays
        await store.set_state("j", "cancelled")
        assert await certify_image(store, engine, "j", 0, upload) is None
        assert await store.done_indices("j") == {1}

    asyncio.run(scenario())


def test_results_tsv_is_the_papers_format() -> None:
    rows = [
        {"idx": 0, "label": 3, "predict": 3, "radius": 0.51234, "correct": True, "time": 1.5, "samples": 10100},
        {"idx": 1, "label": 2, "predict": None, "radius": 0.0, "correct": False, "time": 0.25, "samples": 300},
        {"idx": 2, "label": None, "predict": 7, "radius": 1.0, "correct": None, "time": 0.125, "samples": 100100},
    ]
    lines = results_tsv(rows).splitlines()
    assert lines[0].split("\t") == ["idx", "label", "predict", "radius", "correct", "time", "samples"]
    assert lines[1].split("\t") == ["0", "3", "3", "0.5123", "1", "1.5000", "10100"]
    assert lines[2].split("\t") == ["1", "2", "-1", "0.0000", "0", "0.2500", "300"]
    assert lines[3].split("\t") == ["2", "-1", "7", "1.0000", "0", "0.1250", "100100"]


@pytest.mark.parametrize(
    ("mode", "radius", "tolerance"), [("adaptive", 0.05, None), ("adaptive", None, 0.5), ("fixed", 0.05, None)]
)
def test_jobs_run_every_mode_like_certify(engine, sqlite_store, mode, radius, tolerance) -> None:
    """The job's rows are what /v1/certify's procedure gives each image, with the samples it spent."""
    upload = random_upload(3)

    async def scenario() -> tuple[dict, list[dict]]:
        runner = JobRunner(sqlite_store(), engine, concurrency=3)
        await runner.start()
        job_id = await runner.create(
            None, upload, "tiny", n0=16, n=800, alpha=0.001, seed=SEED, mode=mode, radius=radius, tolerance=tolerance
        )
        await until(lambda: state_is(runner, job_id, "done"))
        status, rows = await runner.status(job_id, None), await runner.results(job_id, None)
        await runner.stop()
        return status, rows

    status, rows = asyncio.run(scenario())
    assert status["params"]["mode"] == mode and status["params"]["radius"] == radius
    plan = engine.model("tiny").plan
    question = api_question(mode, sigma=0.25, alpha=0.001, n0=16, n=800, radius=radius, tolerance=tolerance)
    for row in rows:
        sampler = model_sampler(
            plan.model,
            upload.images[row["idx"]],
            sigma=0.25,
            num_classes=10,
            batch_size=64,
            seed=image_seed(SEED, row["idx"]),
        )
        expected = certificate_summary(run(question.procedure(), sampler))
        assert row["samples"] == expected["samples"] and row["predict"] == expected["label"]
        if radius is not None:
            assert row["certified_at_radius"] == (
                expected["certified_at_radius"]
                if mode == "adaptive"
                else (not row["abstained"] and row["radius"] >= radius)
            )
    if mode == "fixed":
        assert all(r["samples"] == 816 for r in rows)


def test_a_job_with_bad_mode_parameters_is_refused(engine, sqlite_store) -> None:
    async def scenario() -> None:
        runner = JobRunner(sqlite_store(), engine)
        with pytest.raises(ValueError, match="alpha"):
            await runner.create(None, random_upload(1), "tiny", n0=16, n=64, alpha=0.7)

    asyncio.run(scenario())
