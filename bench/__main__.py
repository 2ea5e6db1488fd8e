"""``python -m bench``: measure, write the results (JSON) and the report (Markdown).

python -m bench                  full run (about 12 minutes on a 2-core CPU)
python -m bench --quick          seconds per part: a smoke test, not a measurement
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.baseline import compare_with_paper_loop
from bench.cache import flush_redis, redis_reachable, repeated_certify
from bench.client import image_body, new_client
from bench.compute_thread import on_compute_thread, start_compute_thread
from bench.config import BRIEF, FULL, QUICK, BenchConfig
from bench.headlines import headlines
from bench.inputs import random_pixels, test_set_images
from bench.latency import measure_latency
from bench.library import measure_library
from bench.limit import Limit, measure_limit
from bench.loadgen import client_cpu_cost
from bench.machine import describe_machine, device_slug
from bench.report import write_report
from bench.server import REPO_ROOT, Server, start_paper_server, start_server, stop_server
from bench.service_load import measure_service
from models.registry import DEFAULT_ROOT, find_checkpoint, read_registry_manifest
from service.engine.models import pick_device
from smoothing.runtime import keep_freed_memory
from smoothing.tuning import parse_plan_key

DEFAULT_MODEL = "fmnist-resnet-sigma0.25"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/12"  # a database of its own: flushed before and after

log = logging.getLogger("bench")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_true", help="tiny sizes, seconds per part (smoke test)")
    sizes.add_argument("--brief", action="store_true", help="full sizes, short windows (a lent GPU's few minutes)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model id in the registry (default: %(default)s)")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_ROOT, help="registry folder (default: checkpoints/)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:k] (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default: bench/results/<device>.json)")
    parser.add_argument(
        "--report",
        type=Path,
        default=REPO_ROOT / "BENCHMARKS.md",
        help="Markdown report, rendered from every results file beside --out (default: BENCHMARKS.md)",
    )
    parser.add_argument(
        "--redis-url",
        default=DEFAULT_REDIS_URL,
        help="Redis for the cache part; its database is flushed (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the images and loads")
    return parser.parse_args(argv)


def timed(results: dict[str, Any], part: str, started: float) -> None:
    results.setdefault("part_seconds", {})[part] = round(time.perf_counter() - started, 1)
    log.info("%s done in %.1f s", part, time.perf_counter() - started)


async def service_parts(
    server: Server, limit: Limit, config: BenchConfig, seed: int, start_paper: Callable[[], Server]
) -> dict[str, Any]:
    """Everything measured against the service without Redis (in-process LRU cache); the mixed load also against
    the paper's loop behind HTTP (``start_paper`` starts it), and the load generators' CPU cost on that server."""
    results: dict[str, Any] = {}
    async with new_client(server.url) as client:
        started = time.perf_counter()
        service = await measure_service(
            client,
            limit,
            pid=server.pid,
            ks=config.service_ks,
            n0=config.n0,
            n=config.certify_n,
            alpha=config.alpha,
            warmup_s=config.service_warmup_s,
            window_s=config.service_window_s,
            memory_s=config.memory_s,
            memory_interval_s=config.memory_interval_s,
            limit_seconds=config.limit_seconds,
            seed=seed + 1,
        )
        largest = service["loads"][-1]
        results["service"] = service
        results["memory"] = {"clients": largest["clients"], **largest.pop("memory")}
        timed(results, "service", started)

        started = time.perf_counter()
        results["latency"] = await measure_latency(
            client,
            limit,
            n=config.predict_n,
            alpha=config.alpha,
            idle_count=config.idle_predicts,
            saturated_count=config.saturated_predicts,
            certifiers=config.saturating_clients,
            n0=config.n0,
            certify_n=config.certify_n,
            warmup_s=config.service_warmup_s,
            sweep=config.sweep_concurrency,
            sweep_window_s=config.sweep_window_s,
            limit_seconds=config.limit_seconds,
            seed=seed + 2,
        )
        timed(results, "latency", started)

    started = time.perf_counter()
    paper = start_paper()
    try:
        results["mixed_load"] = await compare_with_paper_loop(
            server.url,
            paper.url,
            limit,
            predicts=config.mixed_predicts,
            predict_n=config.predict_n,
            certify_ns=config.mixed_certify_ns,
            n0=config.n0,
            span_s=config.mixed_arrival_span_s,
            rounds=config.mixed_rounds,
            alpha=config.alpha,
            seed=seed + 3,
            limit_seconds=config.limit_seconds,
        )
        timed(results, "mixed_load", started)
        started = time.perf_counter()
        body = image_body(
            random_pixels(np.random.default_rng(seed + 6), limit.manifest.input_shape),
            limit.manifest.id,
            0,
            n=config.predict_n,
            alpha=config.alpha,
        )
        results["client_cost"] = await client_cpu_cost(
            paper.url,
            "/noop",
            body,
            count=config.client_cost_requests,
            concurrency=config.client_cost_concurrency,
            rounds=config.client_cost_rounds,
        )
        timed(results, "client_cost", started)
    finally:
        stop_server(paper)

    started = time.perf_counter()
    results["cache"] = {"in_process": await cache_part(server, limit, config, seed + 4)}
    timed(results, "cache_in_process", started)
    return results


async def cache_part(server: Server, limit: Limit, config: BenchConfig, seed: int) -> dict[str, Any]:
    """Latency of repeated certifications answered from ``server``'s certificate cache (whichever it has)."""
    return await repeated_certify(
        server.url,
        limit.manifest,
        hits=config.cache_hits,
        n0=config.n0,
        n=config.cache_n,
        alpha=config.alpha,
        seed=seed,
    )


def add_float32_fractions(results: dict[str, Any]) -> None:
    """When L uses a reduced precision, which the service does not (the library does: it runs L's model), also give
    the service's fractions against L in float32."""
    limit = results["limit"]
    if limit["model_as_measured"]["precision"] == "float32":
        return
    factor = limit["samples_per_s"] / limit["samples_per_s_float32"]  # L over L in float32, same windows
    for load in results["service"]["loads"]:
        load["fraction_of_float32_limit"] = load["fraction_of_limit"] * factor


def service_plans(tuning_cache: Path, model_sha256: str, precision: str) -> list[dict[str, Any]]:
    """The plans the service left in its tuning cache for the model at ``precision`` (one per executor thread
    count and device), with the batch sizes refinement moved them to while it served."""
    if not tuning_cache.exists():
        return []
    plans = []
    for key, plan in json.loads(tuning_cache.read_text()).items():
        fields = parse_plan_key(key)
        if fields["cache_key"] == model_sha256 and fields.get("precision") == precision:
            plans.append(
                {
                    "device": fields["device"],
                    "threads": int(fields["threads"]),
                    "batch_size": plan["batch_size"],
                    "interactive_batch_size": plan.get("interactive_batch_size", plan["batch_size"]),
                }
            )
    return sorted(plans, key=lambda p: (p["device"], p["threads"]))


def run(args: argparse.Namespace, config: BenchConfig, device: torch.device, workdir: Path) -> dict[str, Any]:
    manifest = read_registry_manifest(find_checkpoint(args.model_dir, args.model))
    results: dict[str, Any] = {
        "schema": 2,  # 2: the mixed load against the paper server; cache p99s as headlines
        "quick": config.quick,
        "brief": config is BRIEF,  # full sizes in short windows (bench.config.BRIEF)
        "machine": {**describe_machine(device), "torch_threads": on_compute_thread(torch.get_num_threads)},
        "model": {
            "id": manifest.id,
            "architecture": manifest.architecture,
            "dataset": manifest.dataset,
            "input_shape": list(manifest.input_shape),
            "sigma": manifest.sigma,
            "sha256": manifest.sha256,
        },
        "settings": config.as_dict(),
    }
    log.info("benchmarking %s on %s (%s run)", manifest.id, device, "quick" if config.quick else "full")
    images, source = test_set_images(manifest, max(config.precision_images, 4), seed=args.seed)
    results["images"] = source
    tuning_cache = workdir / "tuning.json"

    started = time.perf_counter()
    limit, results["limit"] = on_compute_thread(
        measure_limit,
        args.model_dir,
        args.model,
        device,
        candidates=config.batch_candidates,
        seconds=config.limit_seconds,
        precision_seconds=config.precision_seconds,
        precision_rounds=config.precision_rounds,
        check_images=images[: config.precision_images],
        check_n0=config.n0,
        check_n=config.precision_n,
        alpha=config.alpha,
        tuning_cache=tuning_cache,
    )
    timed(results, "limit", started)

    started = time.perf_counter()
    results["library"] = on_compute_thread(
        measure_library,
        limit,
        images,
        n0=config.n0,
        n=config.certify_n,
        alpha=config.alpha,
        rounds=config.library_rounds,
        seconds=config.library_seconds,
        limit_seconds=config.limit_seconds,
    )
    timed(results, "library", started)

    # The service runs its devices as `make run` does: on a CPU `auto` (one one-thread executor per core, the
    # layout bench.executors measures faster than one executor on every core); L and the library are one process
    # computing on every core, as a user's script would.
    results["service_devices"] = "auto" if device.type == "cpu" else str(device)
    server_args = dict(
        model_dir=args.model_dir,
        model_id=args.model,
        device=results["service_devices"],
        tuning_cache=tuning_cache,
        workdir=workdir,
        timeout_s=config.server_start_timeout_s,
        precision=limit.precision,
    )
    server = start_server(**server_args)
    try:
        start_paper = functools.partial(
            start_paper_server,
            model_dir=args.model_dir,
            model_id=args.model,
            device=device,
            workdir=workdir,
            timeout_s=config.server_start_timeout_s,
        )
        results.update(asyncio.run(service_parts(server, limit, config, args.seed, start_paper)))
    finally:
        stop_server(server)
    results["service_plans"] = service_plans(tuning_cache, manifest.sha256, limit.precision)

    started = time.perf_counter()
    unreachable = redis_reachable(args.redis_url)
    if unreachable:
        results["cache"]["redis"] = {"url": args.redis_url, "unavailable": unreachable}
    else:
        flush_redis(args.redis_url)
        server = start_server(**server_args, redis_url=args.redis_url)
        try:
            results["cache"]["redis"] = {
                "url": args.redis_url,
                **asyncio.run(cache_part(server, limit, config, args.seed + 5)),
            }
        finally:
            stop_server(server)
            flush_redis(args.redis_url)
    timed(results, "cache_redis", started)
    add_float32_fractions(results)
    results["headlines"] = headlines(results)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the progress
    config = QUICK if args.quick else BRIEF if args.brief else FULL
    device = pick_device(args.device)
    out = args.out or REPO_ROOT / "bench" / "results" / f"{device_slug(device)}.json"
    started = time.perf_counter()
    keep_freed_memory()  # as `python -m service` does at start-up, before the first large allocation
    start_compute_thread()  # the service's threading, mirrored (see bench.compute_thread)
    with tempfile.TemporaryDirectory(prefix="bench-") as workdir:
        results = run(args, config, device, Path(workdir))
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    write_report(out, args.report)
    log.info("wrote %s and %s in %.0f s", out, args.report, results["total_seconds"])
    for row in results["headlines"]:
        log.info(
            "%-60s %10s  target %-8s %s",
            row["name"],
            f"{row['value']:.3g}" if row["value"] is not None else "—",
            row["target"],
            {True: "met", False: "MISSED", None: ""}[row["met"]],
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
