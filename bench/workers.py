"""Images/s of one batch job: Dramatiq worker processes (1 and 2, one core each) against the in-process runner.

    python -m bench.workers          # ~3 minutes on 2 cores; needs the Redis at 127.0.0.1:6379 (uses database 5)

Each configuration is run as a user deploys it: ``python -m service`` (CERTSERVE_JOB_BACKEND=dramatiq,
or the in-process default) plus ``python -m service.jobs.worker`` processes pinned to a core each
(``taskset``, CERTSERVE_THREADS=1). One job of ``--images`` images is posted over HTTP and timed
from the first finished image to the last (start-up and the first message excluded), so the figure
is the steady rate. Configurations alternate within each round; the median round is reported.
Writes ``bench/results/workers/cpu.json`` and ``report.md`` beside it, which BENCHMARKS.md includes.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import redis
import torch

from bench.machine import describe_machine

REPO = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent / "results" / "workers"
REDIS_URL = "redis://127.0.0.1:6379/5"
CONFIGS = ("in-process", "1 worker", "2 workers")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not up within {timeout_s} s")


def upload(count: int) -> dict:
    images = np.random.default_rng(0).integers(0, 256, (count, 28, 28), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, images=images)
    return {"file": ("set.npz", buffer.getvalue(), "application/octet-stream")}


def run_config(config: str, args: argparse.Namespace, workdir: Path) -> dict:
    redis.Redis.from_url(REDIS_URL).flushdb()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CERTSERVE_")}
    env |= {
        "CERTSERVE_MODELS": f'["{args.model}"]',
        "CERTSERVE_TUNING_CACHE": str(workdir / "tuning.json"),
        "CERTSERVE_PRECISION": args.precision,
        "CERTSERVE_REDIS_URL": REDIS_URL,
        "CERTSERVE_JOB_DB": str(workdir / "jobs.sqlite3"),
        "CERTSERVE_JOB_MESSAGE_IMAGES": str(args.message_images),
    }
    port = free_port()
    api_env = env | {"CERTSERVE_PORT": str(port)}
    workers = 0 if config == "in-process" else int(config.split()[0])
    if workers:
        # The API computes nothing for jobs then: one thread, so that it takes no core from the workers.
        api_env |= {"CERTSERVE_JOB_BACKEND": "dramatiq", "CERTSERVE_DEVICES": "cpu", "CERTSERVE_THREADS": "1"}
    processes = []
    log = (workdir / "log.txt").open("a")
    try:
        processes.append(
            subprocess.Popen([sys.executable, "-m", "service"], cwd=REPO, env=api_env, stdout=log, stderr=log)
        )
        for k in range(workers):
            worker_env = env | {
                "CERTSERVE_JOB_BACKEND": "dramatiq",
                "CERTSERVE_DEVICES": "cpu",
                "CERTSERVE_THREADS": "1",
                "CERTSERVE_WORKER_METRICS_PORT": str(free_port()),
            }
            pin = ["taskset", "-c", str(k % os.cpu_count())] if shutil.which("taskset") else []
            command = [*pin, sys.executable, "-m", "service.jobs.worker"]
            processes.append(subprocess.Popen(command, cwd=REPO, env=worker_env, stdout=log, stderr=log))
            wait_up(f"http://127.0.0.1:{worker_env['CERTSERVE_WORKER_METRICS_PORT']}/metrics")
        base = f"http://127.0.0.1:{port}"
        wait_up(f"{base}/readyz")
        fields = {"n0": str(args.n0), "n": str(args.n), "seed": "0"}
        job = httpx.post(f"{base}/v1/jobs", files=upload(args.images), data=fields, timeout=60).json()
        first = None
        while True:
            status = httpx.get(f"{base}{job['status_url']}", timeout=10).json()
            if first is None and status["done"] > 0:
                first = (time.perf_counter(), status["done"])
            if status["state"] == "done":
                ended = time.perf_counter()
                break
            if status["state"] in ("failed", "cancelled"):
                raise RuntimeError(f"{config}: job {status['state']}: {status['error']}")
            time.sleep(0.05)
        images_per_s = (args.images - first[1]) / (ended - first[0])
        return {"config": config, "images_per_s": images_per_s, "samples_per_s": images_per_s * (args.n0 + args.n)}
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        log.close()
        redis.Redis.from_url(REDIS_URL).flushdb()


def report(results: dict) -> str:
    m, medians, a = results["machine"], results["median_images_per_s"], results["args"]
    rounds = results["rounds"]
    lines = [
        "## Batch jobs: Dramatiq workers against the in-process runner (issue 17)",
        "",
        f"`python -m bench.workers` on {m['cpu_model']}, {m['cpu_cores']} cores, {m['date_utc'][:10]}: one job of "
        f"{a['images']} images of {a['model']} (n0 = {a['n0']}, n = {a['n']}, {a['precision']}, "
        f"{a['message_images']} images per message), timed from its first finished image to its last; "
        f"{len(rounds)} rounds, configurations alternating. In-process: the API's own pool (`auto`: two one-thread "
        "CPU executors). Workers: `python -m service.jobs.worker` pinned to a core each with one thread, the API "
        "(one thread) only enqueueing. **The machine was shared with other engineers' work while this ran**; "
        "read the medians and their ratios.",
        "",
        "| configuration | median images/s | samples/s | rounds (images/s) |",
        "|---|--:|--:|---|",
    ]
    for config in CONFIGS:
        values = ", ".join(f"{r[config]['images_per_s']:.2f}" for r in rounds)
        samples = medians[config] * (a["n0"] + a["n"])
        lines.append(f"| {config} | {medians[config]:.2f} | {samples:,.0f} | {values} |")
    two_vs_one = medians["2 workers"] / medians["1 worker"]
    lines += [
        "",
        f"2 workers ÷ 1 worker: {two_vs_one:.2f}; 2 workers ÷ in-process: "
        f"{medians['2 workers'] / medians['in-process']:.2f}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fmnist-resnet-sigma0.25")
    parser.add_argument("--precision", default="bfloat16")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--n", type=int, default=2_000)
    parser.add_argument("--message-images", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rounds = []
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as workdir:
        for k in range(args.rounds):
            order = CONFIGS if k % 2 == 0 else CONFIGS[::-1]
            done = {config: run_config(config, args, Path(workdir)) for config in order}
            logging.info("round %d: %s", k, {c: round(r["images_per_s"], 2) for c, r in done.items()})
            rounds.append(done)
    results = {
        "machine": describe_machine(torch.device("cpu")),
        "args": vars(args),
        "rounds": rounds,
        "median_images_per_s": {c: statistics.median(r[c]["images_per_s"] for r in rounds) for c in CONFIGS},
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "cpu.json").write_text(json.dumps(results, indent=2) + "\n")
    (OUT / "report.md").write_text(report(results))
    print(report(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
