"""The bound comparison (issue 16) on a three-image reference log: every bound answers, and its answers make sense."""

import json
from pathlib import Path

from smoothing.looks import BOUNDS
from training.studies.bound_sim import main

HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime\tcount_a\tn\tsigma\talpha\n"


def test_bound_study_writes_every_bound_and_a_report(tmp_path: Path) -> None:
    # Two images every sample of which was right (fixed n certified 0.953), one near a coin flip (abstained).
    (tmp_path / "certify-n100k-sigma0.25.tsv").write_text(
        HEADER
        + "0\t1\t1\t0.9529\t1\t1.0\t100000\t100000\t0.25\t0.001\n"
        + "1\t2\t2\t0.9529\t1\t1.0\t100000\t100000\t0.25\t0.001\n"
        + "2\t3\t-1\t0.0\t0\t1.0\t50100\t100000\t0.25\t0.001\n"
    )
    out, report = tmp_path / "bounds.json", tmp_path / "bounds.md"
    argv = ["--sigmas", "0.25", "--repeats", "2", "--adaptive-repeats", "1", "--fixed-dir", str(tmp_path)]
    main([*argv, "--out", str(out), "--report", str(report)])
    (result,) = json.loads(out.read_text())["results"]
    assert set(result["bounds"]) == set(BOUNDS)
    for bound, measured in result["bounds"].items():
        # r = 0.25 and 0.5: the clear images certify within a few hundred samples, the coin flip never does.
        for r in ("0.25", "0.5"):
            assert measured["cells"][r]["agreement"] == 1.0, bound
            assert measured["cells"][r]["mean_samples"] < 5_000, bound
        # r = 1.0 is beyond n_max's reach at σ = 0.25 for every bound: answered without samples.
        assert measured["cells"]["1.0"]["mean_samples"] == 0
        assert 0.9 < measured["max_certifiable_radius"] < result["fixed_max_radius"]
        spent = [a["mean_samples"] for a in measured["adaptive"]]
        assert spent[0] > spent[-1]  # the smallest tolerance samples the most
    assert "Sample efficiency, second round" in report.read_text()
