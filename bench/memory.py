"""Resident memory of a process (Linux /proc), and whether it stays flat over a run."""

from __future__ import annotations

import re
from pathlib import Path

from scipy.stats import linregress

FLAT_GROWTH = 0.05  # flat: the fitted growth over the whole window is below 5 % of the starting RSS


def read_rss_mib(pid: int) -> dict[str, float]:
    """Current (VmRSS) and peak (VmHWM) resident set of ``pid``, in MiB."""
    text = Path(f"/proc/{pid}/status").read_text()
    values = {}
    for field in ("VmRSS", "VmHWM"):
        match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
        if match is None:
            raise RuntimeError(f"/proc/{pid}/status has no {field}")
        values[field] = int(match.group(1)) / 1024
    return {"rss_mib": values["VmRSS"], "peak_mib": values["VmHWM"]}


def rss_trend(samples: list[tuple[float, float]]) -> dict[str, object]:
    """Fit RSS (MiB) against time (s) over ``samples`` [(seconds since start, rss_mib)].

    Returns the slope (MiB per minute), the growth the fit predicts over the window, and whether
    that growth is below FLAT_GROWTH of the starting RSS.
    """
    times = [t for t, _ in samples]
    rss = [r for _, r in samples]
    duration = times[-1] - times[0]
    slope = float(linregress(times, rss).slope) if len(samples) >= 3 and duration > 0 else 0.0
    growth = slope * duration
    return {
        "samples": len(samples),
        "duration_s": duration,
        "start_mib": rss[0],
        "end_mib": rss[-1],
        "min_mib": min(rss),
        "max_mib": max(rss),
        "slope_mib_per_min": slope * 60,
        "fitted_growth_mib": growth,
        "flat": bool(growth < FLAT_GROWTH * rss[0]),
        "flat_rule": f"fitted growth over the window below {FLAT_GROWTH:.0%} of the starting RSS",
    }
