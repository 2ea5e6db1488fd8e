"""One CPU, two ways: one executor on every core, or one executor per core (``CERTSERVE_DEVICES=cpu*2``)?

    python -m bench.executors                       # ~3 minutes on 2 cores: 5 interleaved rounds per layout

Each measurement is a fresh process (``--child``) that starts the service's pool exactly as the API
does (models loaded and tuned on a passing thread, ``start_engine``), keeps it saturated with
certification work at job priority straight through the scheduler (no HTTP), and counts the samples
its executors classify over a window after a warm-up. The layouts alternate within each round and the
order flips from round to round, so a slow drift of a shared machine's speed falls on both; the
figure is the median round, with the ratio of each round's pair beside it. Writes
``bench/results/executors/<device>.json`` and the Markdown section ``report.md`` beside it, which
BENCHMARKS.md includes (``python -m bench.report`` re-renders it).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from bench.machine import describe_machine
from service.engine.pool import load_settings_models, parse_devices, start_engine
from service.engine.scheduler import Priority, WorkItem
from service.settings import Settings
from smoothing.runtime import keep_freed_memory

OUT = Path(__file__).resolve().parent / "results" / "executors"
LAYOUTS = ("cpu", "cpu*2")
ITEMS = 16  # concurrent certifications keeping the pool busy (a job's images in flight)


def measure(spec: str, model_id: str, precision: str, tuning_cache: Path, warmup_s: float, seconds: float) -> dict:
    """Samples/s of a saturated pool laid out as ``spec`` (one process, this one)."""
    keep_freed_memory()
    settings = Settings(
        devices=spec, models=[model_id], precision=precision, tuning_cache=tuning_cache, max_pending_samples=10**12
    )
    slots = parse_devices(settings.devices, settings.threads)
    with ThreadPoolExecutor(1) as loader:
        models = loader.submit(load_settings_models, settings, slots).result()
    lock, counted = threading.Lock(), [0]

    def on_batch(batch, seconds_: float) -> None:
        with lock:
            counted[0] += batch.size

    engine, pool = start_engine(settings, slots, models, on_batch=on_batch)
    loaded = engine.model(model_id)
    x = torch.rand(loaded.manifest.input_shape, generator=torch.Generator().manual_seed(0))
    for seed in range(ITEMS):
        engine.scheduler.submit(
            WorkItem(model_id, x, loaded.manifest.sigma, seed, 1, 10**10, loaded.manifest.num_classes, Priority.JOB)
        )
    time.sleep(warmup_s)
    with lock:
        before, started = counted[0], time.perf_counter()
    time.sleep(seconds)
    with lock:
        after, ended = counted[0], time.perf_counter()
    pool.stop()
    plans = {name: m[model_id].plan for name, m in models.items()}
    return {
        "layout": spec,
        "executors": [{"name": s.name, "threads": s.threads} for s in slots],
        "batch_size": next(iter(plans.values())).batch_size,
        "precision": next(iter(plans.values())).precision,
        "samples_per_s": (after - before) / (ended - started),
    }


def run_child(spec: str, args: argparse.Namespace, tuning_cache: Path) -> dict:
    command = [sys.executable, "-m", "bench.executors", "--child", spec, "--tuning-cache", str(tuning_cache)]
    command += ["--model", args.model, "--precision", args.precision, "--seconds", str(args.seconds)]
    command += ["--warmup", str(args.warmup)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(results: dict) -> str:
    rounds = results["rounds"]
    medians = results["median_samples_per_s"]
    one, per_core = medians["cpu"], medians["cpu*2"]
    ratios = [r["cpu*2"]["samples_per_s"] / r["cpu"]["samples_per_s"] for r in rounds]
    m = results["machine"]
    lines = [
        "## Executors on one CPU (issue 17)",
        "",
        f"`python -m bench.executors` on {m['cpu_model']}, {m['cpu_cores']} cores, {m['date_utc'][:10]}, "
        f"{results['model']} in {rounds[0]['cpu']['precision']}: a saturated pool (certification work "
        "through the scheduler, no HTTP), each layout a fresh process, the two alternating within each of "
        f"{len(rounds)} rounds ({results['seconds']:g} s windows after {results['warmup']:g} s of warm-up). "
        "Single rounds on a shared machine move by tens "
        "of percent; the median round and the per-round ratio are what to read.",
        "",
        "| layout | executors × threads | batch | median samples/s | rounds (samples/s) |",
        "|---|---|--:|--:|---|",
    ]
    for layout in LAYOUTS:
        first = rounds[0][layout]
        shape = f"{len(first['executors'])} × {first['executors'][0]['threads']}"
        values = ", ".join(f"{r[layout]['samples_per_s']:,.0f}" for r in rounds)
        lines.append(f"| `{layout}` | {shape} | {first['batch_size']} | {medians[layout]:,.0f} | {values} |")
    winner = "cpu*2" if per_core > one else "cpu"
    lines += [
        "",
        f"Per-round ratio (two one-thread executors ÷ one two-thread executor): "
        f"{', '.join(f'{r:.2f}' for r in ratios)}; median {statistics.median(ratios):.2f}. "
        f"`CERTSERVE_DEVICES=auto` on a CPU therefore runs `{winner}` (service/engine/pool.py, AUTO_CPU_EXECUTORS).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fmnist-resnet-sigma0.25")
    parser.add_argument("--precision", default="bfloat16", help="the arithmetic both layouts run (default: the plan's)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=8.0, help="measurement window per process")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--tuning-cache", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = measure(args.child, args.model, args.precision, args.tuning_cache, args.warmup, args.seconds)
        print(json.dumps(result))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rounds = []
    with tempfile.TemporaryDirectory(prefix="bench-executors-") as workdir:
        tuning_cache = Path(workdir) / "tuning.json"  # each layout tunes once (per thread count), then reuses it
        for layout in LAYOUTS:
            run_child(layout, argparse.Namespace(**{**vars(args), "seconds": 1.0, "warmup": 0.5}), tuning_cache)
        for k in range(args.rounds):
            order = LAYOUTS if k % 2 == 0 else LAYOUTS[::-1]
            pair = {layout: run_child(layout, args, tuning_cache) for layout in order}
            logging.info("round %d: %s", k, {k_: round(v["samples_per_s"]) for k_, v in pair.items()})
            rounds.append(pair)
    results = {
        "machine": describe_machine(torch.device("cpu")),
        "model": args.model,
        "seconds": args.seconds,
        "warmup": args.warmup,
        "rounds": rounds,
        "median_samples_per_s": {
            layout: statistics.median(r[layout]["samples_per_s"] for r in rounds) for layout in LAYOUTS
        },
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "cpu.json").write_text(json.dumps(results, indent=2) + "\n")
    (OUT / "report.md").write_text(report(results))
    print(report(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
