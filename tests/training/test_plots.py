"""training/plots.py: the figures analyze writes and the service serves, from arrays in memory."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from training.plots import certified_accuracies, curves_figure, figure_bytes, radius_histogram_figure

RADII = np.array([0.9, 0.3, 0.5, 0.0, 1.2])
CORRECT = np.array([True, True, False, False, True])


def test_certified_accuracies_count_right_answers_at_least_that_far() -> None:
    assert certified_accuracies(RADII, CORRECT, [0.0, 0.4, 1.0, 1.3]) == [0.6, 0.4, 0.2, 0.0]


def test_curves_are_drawn_from_the_arrays() -> None:
    figure = curves_figure({"panel": {"curve": (RADII, CORRECT)}})
    (ax,) = figure.axes
    (line,) = ax.get_lines()
    x, y = line.get_data()
    assert x[0] == 0.0 and x[-1] > RADII.max() and y[0] == 0.6 and y[-1] == 0.0
    assert np.all(np.diff(y) <= 0)  # certified accuracy never rises with the radius
    assert ax.get_ylabel() == "approximate certified accuracy" and ax.get_title() == "panel"


def test_the_histogram_counts_certified_radii_and_names_the_abstentions() -> None:
    abstained = RADII == 0.0
    figure = radius_histogram_figure(RADII, abstained, "set")
    (ax,) = figure.axes
    assert sum(patch.get_height() for patch in ax.patches) == 4  # the abstention is not a bar
    assert ax.get_title() == "set: 4 certified, 1 abstained"


def test_figures_encode_as_png_and_svg() -> None:
    figure = curves_figure({"panel": {"curve": (RADII, CORRECT)}})
    image = Image.open(io.BytesIO(figure_bytes(figure, "png", dpi=100)))
    assert (image.width, image.height) == (600, 450)
    assert b"<svg" in figure_bytes(figure, "svg")
