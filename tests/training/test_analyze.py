"""training/analyze.py on handwritten logs whose certified accuracies are known by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from smoothing.accuracy import true_accuracy_lower_bound
from smoothing.statistics import lower_confidence_bound, radius_from_lower_bound
from training.analyze import main, parse_seconds, read_log

# (label, predict, radius, seconds): 7 right answers with radii 0.9 0.3 0.5 1.6 0.1 0.75 2.1,
# one wrong answer with radius 1.2 and two abstentions.
ROWS = [
    (0, 0, 0.9, 1.5),
    (1, 1, 0.3, 2.0),
    (2, 2, 0.5, 0.5),
    (3, 3, 1.6, 1.0),
    (4, 4, 0.1, 1.0),
    (5, 5, 0.75, 2.0),
    (6, 6, 2.1, 1.0),
    (7, 1, 1.2, 0.5),
    (8, -1, 0.0, 0.25),
    (9, -1, 0.0, 0.25),
]
RADII = ["0", "0.25", "0.5", "1", "2"]
EXPECTED = ["0.700", "0.600", "0.500", "0.200", "0.100"]  # correct with radius ≥ r, out of 10


def as_timedelta(seconds: float) -> str:
    return f"0:00:{int(seconds):02d}.{round(seconds % 1 * 1e6):06d}"


def write_seconds_log(path: Path) -> Path:
    """Our certify format (seconds, 4 decimals), with the columns in a shuffled order."""
    lines = ["time\tcorrect\tidx\tradius\tpredict\tlabel"]
    for i, (label, predict, radius, seconds) in enumerate(ROWS):
        lines.append(f"{seconds:.4f}\t{int(predict == label)}\t{10 * i}\t{radius}\t{predict}\t{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


def write_timedelta_log(path: Path) -> Path:
    """The paper's format: idx label predict radius correct time, time as H:MM:SS.ffffff."""
    lines = ["idx\tlabel\tpredict\tradius\tcorrect\ttime"]
    for i, (label, predict, radius, seconds) in enumerate(ROWS):
        lines.append(f"{10 * i}\t{label}\t{predict}\t{radius:.3}\t{int(predict == label)}\t{as_timedelta(seconds)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def write_counts_log(path: Path, sigma: float = 0.5, alpha: float = 0.001, n: int = 1000) -> Path:
    """A certify log with count_a n sigma alpha, radii consistent with the counts (p̄B = 1 − p̲A)."""
    lines = ["idx\tlabel\tpredict\tradius\tcorrect\ttime\tcount_a\tn\tsigma\talpha"]
    for i, count_a in enumerate([1000, 998, 990, 960, 900, 800, 700, 600, 560, 520, 990]):
        p_a_lower = lower_confidence_bound(count_a, n, alpha)
        label, predict = i % 10, (i % 10 if p_a_lower > 0.5 else -1)
        if i == 10:
            predict = (label + 1) % 10  # confidently wrong
        radius = radius_from_lower_bound(p_a_lower, sigma) if predict != -1 else 0.0
        lines.append(
            f"{i}\t{label}\t{predict}\t{radius:.4f}\t{int(predict == label)}\t1.0\t{count_a}\t{n}\t{sigma}\t{alpha}"
        )
    path.write_text("\n".join(lines) + "\n")
    return path


def table_row(markdown: str, *first_cells: str) -> list[str]:
    """Cells of the markdown row that starts with ``first_cells``."""
    prefix = "| " + " | ".join(first_cells) + " |"
    rows = [line for line in markdown.splitlines() if line.startswith(prefix)]
    assert len(rows) == 1, f"no single row starting {prefix!r} in\n{markdown}"
    return [cell.strip() for cell in rows[0].strip("|").split("|")]


def test_parse_seconds_reads_both_formats() -> None:
    assert parse_seconds("1.2345") == 1.2345
    assert parse_seconds("0:00:01.500000") == 1.5
    assert parse_seconds("1:02:03.25") == 3723.25
    assert parse_seconds("0:00:07") == 7.0
    assert parse_seconds("2 days, 0:00:01") == 2 * 86400 + 1
    with pytest.raises(ValueError):
        parse_seconds("soon")


def test_read_log_finds_columns_by_header(tmp_path: Path) -> None:
    for log in (read_log(write_seconds_log(tmp_path / "a.tsv")), read_log(write_timedelta_log(tmp_path / "b.tsv"))):
        np.testing.assert_array_equal(log["idx"], np.arange(0, 100, 10))
        np.testing.assert_allclose(log["time"], [row[3] for row in ROWS])
        np.testing.assert_array_equal(log["predict"], [row[1] for row in ROWS])
        assert log["correct"].sum() == 7


def test_read_log_rejects_malformed_files(tmp_path: Path) -> None:
    path = tmp_path / "x.tsv"
    path.write_text("idx\tlabel\tpredict\tradius\n0\t1\t1\t0.5\n")
    with pytest.raises(ValueError, match="missing columns"):
        read_log(path)
    path.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\t0.5\t1\n")
    with pytest.raises(ValueError, match=r"x\.tsv:2: 5 fields"):
        read_log(path)


def test_tables_hold_the_certified_accuracies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    logs = [str(write_seconds_log(tmp_path / "a.tsv")), str(write_timedelta_log(tmp_path / "b.tsv"))]
    out = tmp_path / "results"
    main([*logs, "--labels", "σ=0.12", "paper_format", "--radii", *RADII, "--out-dir", str(out)])
    printed = capsys.readouterr().out
    markdown = (out / "certified_accuracy.md").read_text()
    assert markdown.strip() in printed
    assert table_row(markdown, "log", "accuracy") == [
        "log",
        "accuracy",
        "r = 0",
        "r = 0.25",
        "r = 0.5",
        "r = 1",
        "r = 2",
    ]
    for label in ("σ=0.12", "paper_format"):
        assert table_row(markdown, label, "approximate")[2:] == EXPECTED
        assert table_row(markdown, label, "10") == [label, "10", "1.0000", "0:00:10"]  # 10 s in all
    latex = (out / "certified_accuracy.tex").read_text()
    assert r"\toprule" in latex and r"\bottomrule" in latex
    assert r"$\sigma$=0.12 & approximate & " + " & ".join(EXPECTED) + r" \\" in latex
    assert r"paper\_format & approximate" in latex


def test_theorem6_row_lies_below_the_approximate_accuracy(tmp_path: Path) -> None:
    out = tmp_path / "results"
    main(
        [
            str(write_seconds_log(tmp_path / "a.tsv")),
            "--radii",
            *RADII,
            "--out-dir",
            str(out),
            "--alpha",
            "0.01",
            "--rho",
            "0.05",
        ]
    )
    markdown = (out / "certified_accuracy.md").read_text()
    bound = [float(v) for v in table_row(markdown, "a", "true ≥ (α = 0.01, ρ = 0.05)")[2:]]
    approximate = [float(v) for v in EXPECTED]
    assert all(b <= a for b, a in zip(bound, approximate, strict=True))
    assert bound[0] > 0  # not vacuous at r = 0: 7 of 10 certified, α = 0.01
    expected = [true_accuracy_lower_bound(round(10 * a), 10, 0.01, 0.05) for a in approximate]
    np.testing.assert_allclose(bound, expected, atol=5e-4)


def test_plot_is_a_png(tmp_path: Path) -> None:
    plot = tmp_path / "figs" / "curves.png"
    main(
        [
            str(write_seconds_log(tmp_path / "a.tsv")),
            str(write_timedelta_log(tmp_path / "b.tsv")),
            "--out-dir",
            str(tmp_path / "results"),
            "--plot",
            str(plot),
        ]
    )
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot.stat().st_size > 10_000  # axes, two curves and a legend, not an empty canvas
    assert not (tmp_path / "results" / "certified_accuracy.png").exists()


def test_alpha_comes_from_the_log(tmp_path: Path) -> None:
    path = write_counts_log(tmp_path / "c.tsv", alpha=0.001)
    main([str(path), "--out-dir", str(tmp_path / "r1")])
    assert "α = 0.001" in (tmp_path / "r1" / "certified_accuracy.md").read_text()
    with pytest.raises(ValueError, match="certified at α = 0.001"):
        main([str(path), "--alpha", "0.01", "--out-dir", str(tmp_path / "r2")])


def test_compare_bounds_orders_lecuyer_li_cohen(tmp_path: Path) -> None:
    path = write_counts_log(tmp_path / "c.tsv")
    out = tmp_path / "results"
    radii = ["0", "0.1", "0.2", "0.3", "0.5", "0.8", "1.2"]
    main([str(path), "--labels", "σ=0.5", "--radii", *radii, "--out-dir", str(out), "--compare-bounds"])
    markdown = (out / "bounds.md").read_text()
    cohen, lecuyer, li = (
        np.array([float(v) for v in table_row(markdown, "σ=0.5", name)[2:]])
        for name in ("Cohen et al. (Theorem 1)", "Lecuyer et al.", "Li et al.")
    )
    assert np.all(lecuyer <= li) and np.all(li <= cohen)
    assert lecuyer[0] == li[0] == cohen[0] == 0.818  # the same 9 of 11 certified and right at r = 0
    assert lecuyer[-1] < cohen[-1]  # Lecuyer et al. never certify beyond ≈ 0.57σ = 0.285
    # Theorem 1 recomputed from the counts gives the log's own radii back.
    approximate = table_row((out / "certified_accuracy.md").read_text(), "σ=0.5", "approximate")[2:]
    assert [f"{v:.3f}" for v in cohen] == approximate
    assert (out / "bounds.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_bounds_needs_the_counts(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="count_a"):
        main([str(write_timedelta_log(tmp_path / "b.tsv")), "--out-dir", str(tmp_path / "r"), "--compare-bounds"])


def test_rejects_predict_logs_and_wrong_label_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    predict_log = tmp_path / "p.tsv"
    predict_log.write_text("idx\tlabel\tpredict\tcorrect\ttime\n0\t1\t1\t1\t0.5\n")
    with pytest.raises(SystemExit, match="not a certify log"):
        main([str(predict_log), "--out-dir", str(tmp_path / "r")])
    with pytest.raises(SystemExit):
        main([str(write_seconds_log(tmp_path / "a.tsv")), "--labels", "x", "y", "--out-dir", str(tmp_path / "r")])
    assert "2 labels for 1 logs" in capsys.readouterr().err


def test_average_certified_radius_counts_wrong_and_abstained_as_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "results"
    main([str(write_seconds_log(tmp_path / "a.tsv")), "--labels", "a", "--radii", *RADII, "--out-dir", str(out)])
    markdown = (out / "certified_accuracy.md").read_text()
    assert "## Average certified radius" in markdown
    assert table_row(markdown, "a", "0.625") == ["a", "0.625"]  # (0.9+0.3+0.5+1.6+0.1+0.75+2.1) / 10


def test_common_keeps_the_indices_every_log_holds(tmp_path: Path) -> None:
    full = write_seconds_log(tmp_path / "full.tsv")
    lines = full.read_text().splitlines()
    short = tmp_path / "short.tsv"
    short.write_text("\n".join(lines[:5]) + "\n")  # the first four examples: right, radii 0.9 0.3 0.5 1.6
    out = tmp_path / "results"
    main([str(full), str(short), "--labels", "full", "short", "--radii", *RADII, "--out-dir", str(out), "--common"])
    markdown = (out / "certified_accuracy.md").read_text()
    for label in ("full", "short"):
        assert table_row(markdown, label, "approximate")[2:] == ["1.000", "1.000", "0.750", "0.250", "0.000"]
        assert table_row(markdown, label, "0.825") == [label, "0.825"]


def test_paper_logs_are_labelled_by_their_full_names_and_tables_go_beside_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    first, second = write_timedelta_log(logs / "sigma_0.25"), write_timedelta_log(logs / "sigma_0.50")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    main([str(first), str(second)])
    out = capsys.readouterr().out
    assert table_row(out, "sigma_0.25", "approximate") and table_row(out, "sigma_0.50", "approximate")  # not sigma_0
    assert (logs / "certified_accuracy.md").is_file() and not (elsewhere / "results").exists()
    assert f"wrote {logs / 'certified_accuracy.md'}" in out and f"wrote {logs / 'certified_accuracy.png'}" in out


def test_logs_holding_their_sigma_are_labelled_by_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = [write_counts_log(tmp_path / f"run-{i}.tsv", sigma=s) for i, s in enumerate((0.25, 0.5))]
    main([*map(str, paths), "--out-dir", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert table_row(out, "σ=0.25", "approximate") and table_row(out, "σ=0.5", "approximate")
