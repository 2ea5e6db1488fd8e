"""A batch job's plot, drawn by the offline ``analyze`` figures (``training.plots``).

With labels, certified accuracy against radius (an abstention or a wrong label is never
certified); without labels, where accuracy cannot be counted, the histogram of certified radii.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure

from training.plots import ImageFormat, curves_figure, figure_bytes, radius_histogram_figure


def job_figure(rows: list[dict[str, Any]], title: str, curve_label: str) -> Figure:
    """The figure of a job's result rows (as ``JobRunner.results`` returns them; at least one row)."""
    if not rows:
        raise ValueError("a job plot needs at least one result")
    radii = np.array([row["radius"] for row in rows], dtype=float)
    if all(row["label"] is not None for row in rows):
        correct = np.array([bool(row["correct"]) for row in rows])
        return curves_figure({title: {curve_label: (radii, correct)}})
    abstained = np.array([row["predict"] is None for row in rows])
    return radius_histogram_figure(radii, abstained, title)


def job_plot(status: dict[str, Any], rows: list[dict[str, Any]], image_format: ImageFormat) -> bytes:
    """The plot of a job (``status`` as ``JobRunner.status`` returns it) as PNG or SVG bytes."""
    params = status["params"]
    title = f"{status['model_id']}: {len(rows)} of {status['total']} images"
    curve_label = f"n0 = {params['n0']}, n = {params['n']}, α = {params['alpha']:g}"
    return figure_bytes(job_figure(rows, title, curve_label), image_format)
