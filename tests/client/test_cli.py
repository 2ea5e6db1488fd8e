"""``certserve-client`` against the real server: answers on stdout, progress on stderr, and its exit statuses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from client_helpers import API_KEY, black, gray, images_zip, png
from live_server import free_port

from certserve_client import cli

pytestmark = pytest.mark.slow  # every test talks to a server process


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    paths = {"gray": tmp_path / "gray.png", "black": tmp_path / "black.png", "zip": tmp_path / "images.zip"}
    paths["gray"].write_bytes(png(gray()))
    paths["black"].write_bytes(png(black()))
    paths["zip"].write_bytes(images_zip(3))
    return paths


def run(server: str, *argv: str) -> int:
    return cli.main(["--url", server, "--api-key", API_KEY, *argv])


def test_certify_and_predict_exit_statuses(server: str, files: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    assert run(server, "certify", str(files["gray"]), "--n0", "64", "--n", "400", "--verify") == cli.EXIT_OK
    assert capsys.readouterr().out.startswith("certified: label 0 (t-shirt), radius ")
    status = run(server, "certify", str(files["gray"]), "--n", "400", "--radius", "5")
    assert status == cli.EXIT_NOT_CERTIFIED and "not certified at radius 5" in capsys.readouterr().out
    adaptive = ("--mode", "adaptive", "--radius", "0.01", "--n", "3200")
    status = run(server, "--json", "certify", str(files["gray"]), *adaptive)
    answer = json.loads(capsys.readouterr().out)
    assert status == cli.EXIT_OK and answer["certified_at_radius"] is True and answer["mode"] == "adaptive"
    assert run(server, "predict", str(files["black"]), "--n", "256", "--seed", "20190") == cli.EXIT_ABSTAINED
    assert capsys.readouterr().out.startswith("abstained")
    assert run(server, "predict", str(files["gray"]), "--n", "300") == cli.EXIT_OK
    assert capsys.readouterr().out.startswith("label 0 (t-shirt)")


def test_models(server: str, capsys: pytest.CaptureFixture) -> None:
    assert run(server, "models") == cli.EXIT_OK
    assert capsys.readouterr().out.split("\t")[:2] == ["tiny", "σ=0.25"]


def test_a_job_submitted_waited_for_and_read_as_tsv(
    server: str, files: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    status = run(server, "job", "submit", str(files["zip"]), "--n0", "16", "--n", "64", "--wait", "--poll", "0.1")
    out, err = capsys.readouterr()
    assert status == cli.EXIT_OK and ": done, 3/3 images" in out and "3/3" in err  # tqdm's bar on stderr
    job_id = out.split()[1].rstrip(":")
    # Job ids are URL-safe base64 and may begin with "-": "--" ends the options.
    assert run(server, "job", "results", "--format", "tsv", "--", job_id) == cli.EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "idx\tlabel\tpredict\tradius\tcorrect\ttime\tsamples" and len(lines) == 4
    assert run(server, "job", "status", "--", job_id) == cli.EXIT_OK and "done" in capsys.readouterr().out
    assert run(server, "job", "submit", str(files["zip"]), "--n", "100000") == cli.EXIT_OK
    running = capsys.readouterr().out.strip()
    assert run(server, "job", "cancel", "--", running) == cli.EXIT_OK and "cancelled" in capsys.readouterr().out
    assert run(server, "job", "wait", "--no-progress", "--", running) == cli.EXIT_JOB_UNFINISHED


def test_errors_exit_statuses(server: str, files: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    assert run(server, "certify", str(files["gray"]), "--model", "nope") == cli.EXIT_REJECTED
    assert "404: unknown model 'nope'" in capsys.readouterr().err
    assert cli.main(["--url", server, "models"]) == cli.EXIT_REJECTED  # no key
    assert "401: missing API key" in capsys.readouterr().err
    assert run(server, "certify", str(files["gray"]), "--alpha", "0.9") == cli.EXIT_REJECTED
    assert run(f"http://127.0.0.1:{free_port()}", "models") == cli.EXIT_UNAVAILABLE
    assert "cannot reach" in capsys.readouterr().err
    assert run(server, "predict", str(files["gray"].parent / "missing.png")) == cli.EXIT_USAGE
    with pytest.raises(SystemExit) as usage:
        run(server, "certify")  # no image
    assert usage.value.code == cli.EXIT_USAGE


def test_an_unsigned_certificate_exits_bad_signature(
    tight_server: str, files: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    status = cli.main(["--url", tight_server, "certify", str(files["gray"]), "--n0", "32", "--n", "64", "--verify"])
    assert status == cli.EXIT_BAD_SIGNATURE and "no signature" in capsys.readouterr().err


def test_server_busy_exits_unavailable(
    tight_server: str, files: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    assert cli.main(["--url", tight_server, "certify", str(files["gray"]), "--n", "100000"]) == cli.EXIT_UNAVAILABLE
    assert "503: server busy" in capsys.readouterr().err


def test_the_console_script(server: str, files: dict[str, Path]) -> None:
    script = Path(sys.executable).parent / "certserve-client"
    command = [str(script), "--url", server, "--api-key", API_KEY, "predict", str(files["black"]), "--n", "256"]
    done = subprocess.run([*command, "--seed", "20190"], capture_output=True, text=True, timeout=120)
    assert done.returncode == cli.EXIT_ABSTAINED and done.stdout.startswith("abstained"), done.stderr
    helped = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "exit status:" in helped.stdout
