"""What this host has: CPU, memory and disk through psutil, GPUs through NVML (pynvml)."""

from __future__ import annotations

import logging
import re
import socket
from pathlib import Path

import psutil

from dstack.agent.diskspace import DiskWatch, MinFree
from dstack.protos.v1 import common_pb2

log = logging.getLogger("dstack.agent")
GIB = 1 << 30
_SIM = re.compile(r"^(\d+)x([A-Za-z0-9]+)(?:-(\d+)GB)?$")


class InventoryError(Exception):
    pass


def parse_simulated(spec: str) -> list[common_pb2.GpuInfo]:
    """`8xA100-80GB` -> eight simulated A100s with 80 GiB each (test/dev option)."""
    m = _SIM.match(spec.strip())
    if not m:
        raise InventoryError(f"invalid simulated GPUs {spec!r}: expected COUNTxNAME[-MEMGB], e.g. 8xA100-80GB")
    count, model, mem = int(m.group(1)), m.group(2), int(m.group(3) or 16)
    return [
        common_pb2.GpuInfo(
            index=i,
            uuid=f"GPU-sim-{model.lower()}-{i:04d}",
            name=f"NVIDIA {model}-{mem}GB (simulated)",
            memory_total_bytes=mem * GIB,
            simulated=True,
        )
        for i in range(count)
    ]


class NvmlGpus:
    """Reads GPUs through NVML; with no NVML (no driver) the host has zero GPUs, said once in the log."""

    def __init__(self) -> None:
        self._ok: bool | None = None

    def read(self) -> list[common_pb2.GpuInfo]:
        import pynvml

        if self._ok is None:
            try:
                pynvml.nvmlInit()
                self._ok = True
                log.info("NVML %s: %d GPU(s)", pynvml.nvmlSystemGetDriverVersion(), pynvml.nvmlDeviceGetCount())
            except pynvml.NVMLError as e:
                self._ok = False
                log.info("no NVIDIA GPUs: NVML is not available (%s)", e)
        if not self._ok:
            return []
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            try:
                util = int(pynvml.nvmlDeviceGetUtilizationRates(h).gpu)
            except pynvml.NVMLError:
                util = 0
            try:
                temp = int(pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU))
            except pynvml.NVMLError:
                temp = 0
            name = pynvml.nvmlDeviceGetName(h)
            uuid = pynvml.nvmlDeviceGetUUID(h)
            gpus.append(
                common_pb2.GpuInfo(
                    index=i,
                    uuid=uuid.decode() if isinstance(uuid, bytes) else uuid,
                    name=name.decode() if isinstance(name, bytes) else name,
                    memory_total_bytes=int(mem.total),
                    memory_used_bytes=int(mem.used),
                    utilization_percent=util,
                    temperature_c=temp,
                )
            )
        return gpus


def nvml_versions() -> tuple[str, str]:
    """The NVIDIA driver's version and the CUDA version it supports ("12.4"); empty without NVML."""
    import pynvml

    try:
        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
        cuda = int(pynvml.nvmlSystemGetCudaDriverVersion())
    except pynvml.NVMLError:
        return "", ""
    driver_text = driver.decode() if isinstance(driver, bytes) else str(driver)
    return driver_text, f"{cuda // 1000}.{cuda % 1000 // 10}"


class Inventory:
    def __init__(
        self,
        home: Path,
        runtime: str,
        max_jobs: int,
        simulate_gpus: str = "",
        advertise_address: str = "",
        disk: DiskWatch | None = None,
    ) -> None:
        """`advertise_address`: what peers reach this agent at (agent/address.py), reported as given.
        `disk`: the work folders' free space against the agent's floor (default: the home, no floor)."""
        self.home = home
        self.disk = disk or DiskWatch([home], min_free=MinFree())
        self.advertise_address = advertise_address
        self.runtime = runtime
        self.max_jobs = max_jobs
        self._simulated = parse_simulated(simulate_gpus) if simulate_gpus else None
        self._nvml = NvmlGpus()
        self._versions: tuple[str, str] | None = None

    def versions(self) -> tuple[str, str]:
        """(driver, CUDA) versions, read once (blocking: NVML); empty for simulated GPUs."""
        if self._versions is None:
            self._versions = ("", "") if self._simulated is not None else nvml_versions()
        return self._versions

    def collect(self) -> common_pb2.Inventory:
        """Blocking (NVML and disk calls): run it in a worker thread."""
        vm = psutil.virtual_memory()
        self.home.mkdir(parents=True, exist_ok=True)
        gpus = self._simulated if self._simulated is not None else self._nvml.read()
        disk = self.disk.measure()
        return common_pb2.Inventory(
            hostname=socket.gethostname(),
            cpu_count=psutil.cpu_count() or 1,
            memory_total_bytes=vm.total,
            memory_available_bytes=vm.available,
            disk_free_bytes=disk.free,
            work_dir=disk.path,
            min_free_disk_bytes=disk.floor,
            disk_full=disk.full,
            gpus=gpus,
            runtime=self.runtime,
            max_jobs=self.max_jobs,
            advertise_address=self.advertise_address,
        )
