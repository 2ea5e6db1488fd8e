"""What the benchmark ran on: CPU, cores, memory, torch and its threads, the device, the date."""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

# CPU flags that decide whether bfloat16 has native support (AVX-512 BF16 instructions, AMX tiles).
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpuinfo_field(name: str, text: str) -> str | None:
    """The first value of ``name`` in /proc/cpuinfo's text, e.g. 'model name'."""
    match = re.search(rf"^{re.escape(name)}\s*:\s*(.*)$", text, re.MULTILINE)
    return match.group(1).strip() if match else None


def meminfo_gib(field: str) -> float | None:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return round(int(match.group(1)) / 2**20, 1) if match else None


def git_commit() -> str | None:
    """The repository's HEAD commit (with '+dirty' when files differ), or None outside a checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def device_name(device: torch.device) -> str:
    """'cpu' or the GPU's marketing name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def device_slug(device: torch.device) -> str:
    """A file-name-safe device name: 'cpu', or 'cuda-' + the GPU's name (e.g. cuda-nvidia-h100-80gb-hbm3)."""
    if device.type != "cuda":
        return device.type
    return "cuda-" + re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def describe_machine(device: torch.device) -> dict[str, object]:
    """The machine and software of this run, for the report's header."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    flags = (cpuinfo_field("flags", cpuinfo) or "").split()
    info: dict[str, object] = {
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu_model": cpuinfo_field("model name", cpuinfo) or platform.processor() or "unknown",
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)),
        "cpu_bf16_flags": [f for f in BF16_FLAGS if f in flags],
        "memory_gib": meminfo_gib("MemTotal"),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "device": str(device),
        "device_name": device_name(device),
        "git_commit": git_commit(),
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return info
