"""The benchmark reads the service's sample counter over every executor, not the first one it meets."""

import asyncio

import httpx

from bench.client import read_metrics

METRICS = """# TYPE certserve_noise_samples_total counter
certserve_noise_samples_total{executor="cpu#0",model="m"} 1000.0
certserve_noise_samples_total{executor="cpu#1",model="m"} 600.0
certserve_noise_samples_total{executor="cpu#0",model="other"} 5.0
# TYPE certserve_pending_samples gauge
certserve_pending_samples 7.0
"""


def test_noise_samples_are_summed_over_executors() -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(200, text=METRICS))

    async def read() -> dict[str, float]:
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
            return await read_metrics(client, "m")

    assert asyncio.run(read()) == {"noise_samples": 1600.0, "pending_samples": 7.0}
