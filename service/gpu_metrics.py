"""GPU memory and utilisation, read at scrape time for the CUDA devices the service computes on.

Memory comes from ``torch.cuda.mem_get_info`` (the whole device, other processes included);
utilisation from NVML through ``nvidia-ml-py`` (``pynvml``) when that package and the driver's
library are present. On a CPU-only host, or without NVML, the series are simply absent: nothing
is imported or initialised that could fail a start-up or a scrape.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import REGISTRY, Collector

log = logging.getLogger(__name__)


def _nvml_handles(devices: list[torch.device]) -> dict[str, Any]:
    """NVML handle per CUDA device name, matched by UUID (CUDA and NVML may number devices differently).

    Empty when nvidia-ml-py is not installed or NVML cannot be initialised (no driver library).
    """
    try:
        import pynvml  # nvidia-ml-py: optional, installed in the CUDA image
    except ImportError:
        return {}
    try:
        pynvml.nvmlInit()
        return {
            str(d): pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{torch.cuda.get_device_properties(d).uuid}") for d in devices
        }
    except (pynvml.NVMLError, AttributeError, RuntimeError) as e:
        log.info("GPU utilisation not exported: NVML unavailable (%s)", e)
        return {}


class GpuCollector(Collector):
    """Exports ``certserve_gpu_memory_used_bytes``, ``certserve_gpu_memory_total_bytes`` and
    ``certserve_gpu_utilization_ratio`` (0..1, NVML's busy share of the last sample period) per device."""

    def __init__(self) -> None:
        self._devices: list[torch.device] = []
        self._nvml: dict[str, Any] = {}

    def watch(self, devices: Iterable[torch.device]) -> None:
        """Report on the CUDA devices among ``devices`` (others are ignored); replaces the previous set."""
        cuda = [d for d in devices if d.type == "cuda"] if torch.cuda.is_available() else []
        self._devices = [torch.device("cuda", d.index if d.index is not None else 0) for d in cuda]
        self._nvml = _nvml_handles(self._devices) if self._devices else {}

    @property
    def devices(self) -> list[torch.device]:
        return list(self._devices)

    def collect(self) -> Iterator[Metric]:
        if not self._devices:
            return
        used = GaugeMetricFamily(
            "certserve_gpu_memory_used_bytes", "device memory in use (all processes)", labels=["device"]
        )
        total = GaugeMetricFamily("certserve_gpu_memory_total_bytes", "device memory", labels=["device"])
        for device in self._devices:
            try:
                free_bytes, total_bytes = torch.cuda.mem_get_info(device)
            except RuntimeError as e:  # a failing device must not fail the whole scrape
                log.warning("GPU memory of %s unavailable: %s", device, e)
                continue
            used.add_metric([str(device)], total_bytes - free_bytes)
            total.add_metric([str(device)], total_bytes)
        yield used
        yield total
        if self._nvml:
            import pynvml

            utilisation = GaugeMetricFamily(
                "certserve_gpu_utilization_ratio",
                "share of the last sample period in which a kernel ran on the device (NVML), 0..1",
                labels=["device"],
            )
            for name, handle in self._nvml.items():
                try:
                    utilisation.add_metric([name], pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
                except pynvml.NVMLError as e:
                    log.warning("GPU utilisation of %s unavailable: %s", name, e)
            yield utilisation


GPU = GpuCollector()
REGISTRY.register(GPU)
