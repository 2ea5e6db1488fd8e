"""The client installs and imports without the service's heavy dependencies."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

CLIENT = Path(__file__).resolve().parents[2] / "client"


def test_the_client_depends_on_httpx_pydantic_and_tqdm_only() -> None:
    project = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]
    names = {dependency.split(">")[0].split("=")[0] for dependency in project["dependencies"]}
    assert names == {"httpx", "pydantic", "tqdm"}
    assert project["scripts"] == {"certserve-client": "certserve_client.cli:main"}


def test_the_client_imports_without_torch_numpy_or_the_service() -> None:
    blocked = ("torch", "numpy", "service", "smoothing", "models", "cryptography")
    code = (
        "import sys\n"
        f"for name in {blocked!r}: sys.modules[name] = None  # any import of them fails\n"
        "import certserve_client, certserve_client.cli\n"
        "print(certserve_client.Client.__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=CLIENT.parent)
    assert done.returncode == 0 and done.stdout.strip() == "Client", done.stderr
