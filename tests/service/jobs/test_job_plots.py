"""service/jobs/plots.py: which figure a job's rows get."""

from __future__ import annotations

import pytest

from service.jobs.plots import job_figure, job_plot


def row(idx: int, label: int | None, predict: int | None, radius: float) -> dict:
    correct = None if label is None else predict == label
    return {"idx": idx, "label": label, "predict": predict, "radius": radius, "correct": correct}


def test_rows_with_labels_give_certified_accuracy_against_radius() -> None:
    rows = [row(0, 1, 1, 0.5), row(1, 2, 0, 0.8), row(2, 3, None, 0.0), row(3, 4, 4, 0.2)]
    (ax,) = job_figure(rows, "title", "curve").axes
    (line,) = ax.get_lines()
    assert line.get_label() == "curve" and line.get_ydata()[0] == 0.5  # 2 of 4 right (one wrong, one abstained)


def test_rows_without_labels_give_the_radius_histogram() -> None:
    rows = [row(0, None, 1, 0.5), row(1, None, None, 0.0), row(2, None, 3, 0.7)]
    (ax,) = job_figure(rows, "title", "curve").axes
    assert ax.get_ylabel() == "images" and ax.get_title() == "title: 2 certified, 1 abstained"


def test_a_job_plot_needs_a_result() -> None:
    with pytest.raises(ValueError, match="at least one result"):
        job_figure([], "title", "curve")
    status = {"model_id": "tiny", "total": 1, "params": {"n0": 16, "n": 64, "alpha": 0.001}}
    assert job_plot(status, [row(0, 1, 1, 0.3)], "png")[:8] == b"\x89PNG\r\n\x1a\n"
