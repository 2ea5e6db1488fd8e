"""The futility simulation of the radius test (issue 5): runs on a small reference log, and its answers make sense."""

from pathlib import Path

import numpy as np

from training.studies.futility_sim import simulate

HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime\tcount_a\tn\tsigma\talpha\n"


def test_clear_images_are_decided_at_the_first_look_and_agree(tmp_path: Path) -> None:
    log = tmp_path / "ref.tsv"
    # Two images every sample of which was right (certified at r = 0.25 by fixed n), one near a coin flip (abstained).
    log.write_text(
        HEADER
        + "0\t1\t1\t0.95\t1\t1.0\t100000\t100000\t0.25\t0.001\n"
        + "1\t2\t2\t0.95\t1\t1.0\t100000\t100000\t0.25\t0.001\n"
        + "2\t3\t-1\t0.0\t0\t1.0\t50100\t100000\t0.25\t0.001\n"
    )
    cell = simulate(log, 0.25, 0.25, 0.01, repeats=5, rng=np.random.default_rng(0))
    assert cell["agreement"] == 1.0
    # Clear images stop at the first look (100 + 100 samples); the coin flip stops for futility long before n_max.
    assert cell["mean_samples"] < 2_000
