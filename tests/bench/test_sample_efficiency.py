"""Smoke test of the issue-5 measurement on the shipped σ = 0.25 model (tiny n; no timing asserted)."""

import json
from pathlib import Path

import pytest

from bench.sample_efficiency import main

REPO = Path(__file__).resolve().parents[2]
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
    assert result["adaptive"]["mean_samples"] <= 100 + 2000
    assert "Sample-efficient certification" in report.read_text()
