"""The n0 / first-check sweep (issue 16) on a two-image reference log: a smaller n0 costs fewer samples."""

import json
from pathlib import Path

from training.studies.n0_sim import main

HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime\tcount_a\tn\tsigma\talpha\n"


def test_sweep_spends_n0_less_on_clear_images_and_reports_every_setting(tmp_path: Path) -> None:
    # Every sample right (fixed n certified 0.953 at σ = 0.25), and a coin flip (abstained).
    (tmp_path / "certify-n100k-sigma0.25.tsv").write_text(
        HEADER
        + "0\t1\t1\t0.9529\t1\t1.0\t100000\t100000\t0.25\t0.001\n"
        + "1\t3\t-1\t0.0\t0\t1.0\t50100\t100000\t0.25\t0.001\n"
    )
    out, report = tmp_path / "n0.json", tmp_path / "n0.md"
    argv = ["--sigmas", "0.25", "--repeats", "2", "--n0", "100", "16", "--first-check", "32", "--fixed-dir"]
    main([*argv, str(tmp_path), "--out", str(out), "--report", str(report)])
    rows = {row["n0"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {100, 16}
    for row in rows.values():
        assert row["min_agreement"] == 1.0
    clear_large, clear_small = rows[100]["cells"]["0.25/0.25"], rows[16]["cells"]["0.25/0.25"]
    assert clear_small["mean_samples"] < clear_large["mean_samples"]
    text = report.read_text()
    assert "| 100 | 32 |" in text and "| 16 | 32 |" in text and "prior mixture" in text
