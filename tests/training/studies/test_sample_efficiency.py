"""Smoke test of the issue-5 measurement on the shipped σ = 0.25 model (tiny n; no timing asserted)."""

import json
from pathlib import Path

import pytest

from training.studies.sample_efficiency import main, samples_within_tolerance

REPO = Path(__file__).resolve().parents[3]
LOG = REPO / "results/fmnist/certify-sigma0.25.tsv"


@pytest.mark.slow
def test_sample_efficiency_writes_cells_and_report(tmp_path: Path) -> None:
    reference = tmp_path / "certify-n100k-sigma0.25.tsv"
    reference.write_text("".join(LOG.read_text().splitlines(keepends=True)[:4]))  # header + 3 images
    out, report = tmp_path / "out.json", tmp_path / "report.md"
    main(
        [
            "--models",
            "fmnist-resnet-sigma0.25",
            "--fixed-dir",
            str(tmp_path),
            "--n-max",
            "2000",
            "--radii",
            "0.1",
            "5.0",
            "--out",
            str(out),
            "--report",
            str(report),
        ]
    )
    (result,) = json.loads(out.read_text())
    assert result["images"] == 3 and set(result["cells"]) == {"0.1", "5.0"}
    # 5.0 is beyond what 2,000 samples can ever certify: decided without a single sample, like the reference.
    infeasible = result["cells"]["5.0"]
    assert infeasible["mean_samples"] == 0 and infeasible["agreement"] == 1.0
    assert all(0 < row["samples"] <= 100 + 2000 for row in result["decisions"]["0.1"])
    assert [a["tolerance"] for a in result["adaptive"]] == [0.02, 0.05, 0.1]
    assert all(a["mean_samples"] <= 100 + 2000 for a in result["adaptive"])
    # The same noise stream at every tolerance: a larger tolerance never spends more samples.
    spent = [a["mean_samples"] for a in result["adaptive"]]
    assert spent == sorted(spent, reverse=True)
    assert "Sample-efficient certification" in report.read_text()


def test_samples_within_tolerance_is_the_fewest_that_reach_the_radius() -> None:
    # All n samples agree: radius σ·Φ⁻¹(α^(1/n)). Within 0.02 of n = 100,000's at σ = 0.25 takes ~72,600 samples.
    n = samples_within_tolerance(0.02, 0.25, 100_000)
    assert 70_000 < n < 75_000
    assert samples_within_tolerance(0.0, 0.25, 100_000) == 100_000
    assert samples_within_tolerance(0.1, 0.25, 100_000) < samples_within_tolerance(0.05, 0.25, 100_000) < n
