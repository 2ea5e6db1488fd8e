"""The alert rules and the scrape config pass promtool's checks, and the rules pass their unit tests."""

from __future__ import annotations

import shutil
import subprocess

from ops_files import ALERTS, ALERTS_TEST, PROMETHEUS_CONFIG, PROMETHEUS_DIR, rule_expressions


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    path = shutil.which("promtool")
    assert path, "promtool is missing: `make prometheus` installs Debian's prometheus (sudo apt-get install prometheus)"
    return subprocess.run([path, *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=120)


def test_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rule_expressions())} rules found" in result.stdout


def test_scrape_config_passes_promtool_check() -> None:
    result = promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_unit_tests_pass() -> None:
    result = promtool("test", "rules", str(ALERTS_TEST))
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def test_every_alert_has_a_unit_test_that_fires_it() -> None:
    from ops_files import load_yaml

    fired = {
        case["alertname"]
        for test in load_yaml(ALERTS_TEST)["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert set(rule_expressions()) <= fired, f"alerts never fired by a test: {set(rule_expressions()) - fired}"


def test_the_required_alerts_exist() -> None:
    alerts = set(rule_expressions())
    for required in (
        "CertserveDown",
        "CertserveErrorRatioHigh",
        "CertservePredictLatencyHigh",
        "CertserveBacklogGrowing",
        "CertserveAbstentionRateJump",
        "CertserveRedisUnreachable",
        "CertserveNoWorkerWhileJobsQueued",
    ):
        assert required in alerts
