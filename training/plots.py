"""Figures of certification results, drawn from arrays in memory: certified accuracy against radius
(the paper's Figure 6) and, for examples without labels, the histogram of certified radii.

``analyze`` writes them to files; the service draws a batch job's plot with the same functions
(``GET /v1/jobs/{id}/plot.png``). Radii are ℓ2 in the [0, 1] pixel space of the model's input.

Figures are built with ``matplotlib.figure.Figure`` rather than pyplot, which keeps global state:
no display is needed, and figures drawn on different threads do not share a current figure.
Rendering still takes one lock, since matplotlib does not promise that its font and text caches
are thread-safe.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
from matplotlib.figure import Figure

from smoothing.accuracy import approximate_certified_accuracy

Curves = dict[str, tuple[np.ndarray, np.ndarray]]  # curve label → (radii, correct), one entry per example
ImageFormat = Literal["png", "svg"]
RADIUS_LABEL = "radius (ℓ2, [0, 1] pixels)"
_RENDER_LOCK = threading.Lock()


def certified_accuracies(radii: np.ndarray, hits: np.ndarray, at: Sequence[float]) -> list[float]:
    """Approximate certified accuracy at each radius in ``at`` (fractions of the examples)."""
    return [approximate_certified_accuracy(radii, hits, r) for r in at]


def radius_grid(largest: float) -> np.ndarray:
    """500 radii from 0 to a little past ``largest``: the x axis of a certified-accuracy curve."""
    return np.linspace(0.0, max(largest, 1e-3) * 1.05, 500)


def curves_figure(panels: dict[str, Curves]) -> Figure:
    """One panel per entry of ``panels`` (its title), one curve per (radii, correct): certified accuracy
    against radius, on a shared y axis from 0 to 1."""
    largest = max(float(np.max(r, initial=0.0)) for curves in panels.values() for r, _ in curves.values())
    grid = radius_grid(largest)
    figure = Figure(figsize=(6 * len(panels), 4.5))
    axes = figure.subplots(1, len(panels), sharey=True, squeeze=False)
    for ax, (title, curves) in zip(axes[0], panels.items(), strict=True):
        for label, (radii, hits) in curves.items():
            ax.plot(grid, certified_accuracies(radii, hits, grid), label=label)
        ax.set(title=title, xlabel=RADIUS_LABEL, ylim=(0, 1), xlim=(0, grid[-1]))
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0][0].set_ylabel("approximate certified accuracy")
    figure.tight_layout()
    return figure


def radius_histogram_figure(radii: np.ndarray, abstained: np.ndarray, title: str) -> Figure:
    """Histogram of the radii of the examples that were certified (``abstained`` False); the title
    says how many abstained. For results without labels, where accuracy cannot be counted."""
    radii, abstained = np.asarray(radii, dtype=float), np.asarray(abstained, dtype=bool)
    certified = radii[~abstained]
    figure = Figure(figsize=(6, 4.5))
    ax = figure.subplots()
    bins = np.linspace(0.0, max(float(np.max(certified, initial=0.0)), 1e-3) * 1.05, 31)
    ax.hist(certified, bins=bins, color="tab:blue", edgecolor="white")
    ax.set(
        title=f"{title}: {certified.size} certified, {int(abstained.sum())} abstained",
        xlabel=RADIUS_LABEL,
        ylabel="images",
    )
    ax.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def save_figure(figure: Figure, target: Path | BinaryIO, image_format: ImageFormat = "png", dpi: int = 150) -> None:
    """Write ``figure`` as PNG or SVG to a file path (its folder is created) or a binary stream."""
    if isinstance(target, Path):
        target.parent.mkdir(parents=True, exist_ok=True)
    with _RENDER_LOCK:
        figure.savefig(target, format=image_format, dpi=dpi)


def figure_bytes(figure: Figure, image_format: ImageFormat = "png", dpi: int = 100) -> bytes:
    """``figure`` encoded as PNG or SVG."""
    buffer = io.BytesIO()
    save_figure(figure, buffer, image_format, dpi)
    return buffer.getvalue()


def plot_curves(panels: dict[str, Curves], path: Path) -> None:
    """``curves_figure(panels)`` as a PNG file at ``path``."""
    save_figure(curves_figure(panels), path)
