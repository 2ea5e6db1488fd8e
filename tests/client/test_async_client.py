"""``AsyncClient`` against the real server: concurrent calls, a job's life, errors and retries."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from client_helpers import API_KEY, black, gray, images_zip, png

from certserve_client import AsyncClient, InvalidRequest, NotFound, RetryPolicy, ServerBusy

pytestmark = pytest.mark.slow  # every test talks to a server process


class AsyncRecordingTransport(httpx.AsyncHTTPTransport):
    """The real async transport, remembering every answer's status."""

    def __init__(self) -> None:
        super().__init__()
        self.statuses: list[int] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        self.statuses.append(response.status_code)
        return response


def test_concurrent_calls(server: str) -> None:
    async def main() -> None:
        async with AsyncClient(server, api_key=API_KEY) as client:
            models, gray_answer, black_answer, certificate = await asyncio.gather(
                client.models(),
                client.predict(png(gray()), n=300, seed=7),
                client.predict(png(black()), n=256, seed=20190),
                client.certify(png(gray()), mode="adaptive", radius=0.01, n=3200, seed=5),
            )
            assert [m.id for m in models] == ["tiny"] and (await client.model("tiny")).id == "tiny"
            assert gray_answer.label == 0 and black_answer.abstained and black_answer.label is None
            assert certificate.certified_at_radius is True and certificate.mode == "adaptive"
            with pytest.raises(InvalidRequest, match="tolerance"):
                await client.certify(png(gray()), mode="adaptive", tolerance=-1.0)
            with pytest.raises(NotFound, match="no job 'missing'"):
                await client.job("missing")

    asyncio.run(main())


def test_a_job_from_submit_to_results(server: str, capsys: pytest.CaptureFixture[str]) -> None:
    async def main() -> None:
        async with AsyncClient(server, api_key=API_KEY) as client:
            created = await client.submit_job(images_zip(2), n0=16, n=64)
            status = await client.wait(created, progress=True, poll_s=0.1, timeout=120)
            assert status.state == "done" and status.done == 2
            assert [r.idx for r in (await client.results(created)).results] == [0, 1]
            assert (await client.results(created.id, "tsv")).startswith("idx\tlabel\tpredict\tradius")
            assert (await client.cancel(created)).cancelled is False

    asyncio.run(main())
    assert "2/2" in capsys.readouterr().err


def test_503_is_retried_then_given_up(tight_server: str) -> None:
    async def main() -> None:
        transport = AsyncRecordingTransport()
        retry = RetryPolicy(retries=2, backoff_s=0.01)
        async with AsyncClient(tight_server, transport=transport, retry=retry) as client:
            with pytest.raises(ServerBusy) as raised:  # more samples than the whole queue bound: never fits
                await client.certify(png(gray()), n=100_000)
        assert raised.value.retry_after_s >= 1 and transport.statuses == [503, 503, 503]

    asyncio.run(main())
