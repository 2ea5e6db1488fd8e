"""The headline figures of a run, each a ratio (or a latency) measured within that run, with its target."""

from __future__ import annotations

from typing import Any

LIBRARY_TARGET = 0.95  # library CERTIFY samples/s over L
SERVICE_TARGET = 0.90  # service samples/s over L, at K >= SERVICE_TARGET_FROM_K clients
SERVICE_TARGET_FROM_K = 4
ATTAINABLE_TARGET = 0.8  # mixed load: (service ÷ paper server) over the attainable speed-up (L ÷ paper loop)
LATENCY_RATIO_TARGET = 3.0  # predict p99 under saturation over idle p99
CACHE_P99_TARGET_MS = 2.0  # p99 of a certification answered from a cache (in-process or Redis)


def headline(name: str, value: float | None, target: str, met: bool | None, unit: str = "") -> dict[str, Any]:
    return {"name": name, "value": value, "unit": unit, "target": target, "met": met}


def headlines(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per figure of the issue; ``met`` is None where the figure has no target or was not measured."""
    rows = []
    library = results.get("library")
    if library:
        fraction = library["fraction_of_limit"]
        rows.append(
            headline("library CERTIFY samples/s ÷ L", fraction, f"≥ {LIBRARY_TARGET}", fraction >= LIBRARY_TARGET)
        )
    for load in results.get("service", {}).get("loads", []):
        k, fraction = load["clients"], load["fraction_of_limit"]
        targeted = k >= SERVICE_TARGET_FROM_K
        rows.append(
            headline(
                f"service samples/s ÷ L, K = {k} certify clients",
                fraction,
                f"≥ {SERVICE_TARGET}" if targeted else "—",
                fraction >= SERVICE_TARGET if targeted else None,
            )
        )
    mixed = results.get("mixed_load")
    if mixed:
        rows.append(
            headline("mixed load: service ÷ paper server, total samples/s", mixed["throughput_speedup"], "—", None, "×")
        )
        rows.append(
            headline("mixed load: attainable speed-up, L ÷ paper loop", mixed["attainable_speedup"], "—", None, "×")
        )
        fraction = mixed["fraction_of_attainable"]
        rows.append(
            headline(
                "mixed load: speed-up ÷ attainable",
                fraction,
                f"≥ {ATTAINABLE_TARGET:g}",
                fraction >= ATTAINABLE_TARGET,
            )
        )
        rows.append(
            headline("mixed load: paper server ÷ service, predict p99", mixed["predict_p99_speedup"], "—", None, "×")
        )
    latency = results.get("latency")
    if latency:
        ratio = latency["p99_saturated_over_idle"]
        rows.append(
            headline(
                "predict p99 saturated ÷ idle", ratio, f"≤ {LATENCY_RATIO_TARGET:g}", ratio <= LATENCY_RATIO_TARGET, "×"
            )
        )
    for name, cache in results.get("cache", {}).items():
        p99 = cache.get("repeats", {}).get("p99_ms")
        rows.append(
            headline(
                f"certify answered from the {'in-process' if name == 'in_process' else name} cache, p99",
                p99,
                f"≤ {CACHE_P99_TARGET_MS:g} ms",
                None if p99 is None else p99 <= CACHE_P99_TARGET_MS,
                "ms",
            )
        )
    memory = results.get("memory")
    if memory:
        rows.append(
            headline(
                f"service RSS growth over {memory['duration_s']:.0f} s at K = {memory['clients']}",
                memory["fitted_growth_mib"],
                "flat",
                memory["flat"],
                "MiB",
            )
        )
    return rows
