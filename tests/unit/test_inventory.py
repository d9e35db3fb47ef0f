from __future__ import annotations

import logging
from pathlib import Path

import pytest

from dstack.agent.inventory import Inventory, InventoryError, parse_simulated


def test_no_nvml_means_zero_gpus_and_one_log_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
        pytest.skip("this machine has NVML (a GPU host): covered by scripts/gpu-check.sh")
    except pynvml.NVMLError:
        pass
    inv = Inventory(tmp_path, "host", 8)
    with caplog.at_level(logging.INFO, logger="dstack.agent"):
        first, second = inv.collect(), inv.collect()
    assert list(first.gpus) == [] and list(second.gpus) == []
    assert first.cpu_count >= 1 and first.memory_total_bytes > 0 and first.disk_free_bytes > 0
    lines = [r.getMessage() for r in caplog.records if "NVML" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("no NVIDIA GPUs: NVML is not available")


def test_simulated_gpus_are_marked_and_never_default(tmp_path: Path) -> None:
    gpus = parse_simulated("8xA100-80GB")
    assert len(gpus) == 8 and all(g.simulated for g in gpus)
    assert gpus[3].index == 3 and gpus[3].memory_total_bytes == 80 << 30 and "A100" in gpus[3].name
    assert list(Inventory(tmp_path, "host", 8, "2xH100-80GB").collect().gpus) == parse_simulated("2xH100-80GB")
    with pytest.raises(InventoryError, match="expected COUNTxNAME"):
        parse_simulated("lots")


def test_nvml_inventory_reads_each_gpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The real NVML code path, with pynvml's functions replaced (no GPU on this machine)."""
    import types

    import pynvml

    class Mem:
        def __init__(self, total: int, used: int) -> None:
            self.total, self.used = total, used

    devices = [
        ("NVIDIA A100-SXM4-80GB", "GPU-aaaa", Mem(80 << 30, 1 << 30), 37, 41),
        (b"NVIDIA A100-SXM4-80GB", b"GPU-bbbb", Mem(80 << 30, 2 << 30), None, None),  # old pynvml: bytes
    ]
    calls = {"init": 0}

    def init() -> None:
        calls["init"] += 1

    def util(h: int) -> types.SimpleNamespace:
        if devices[h][3] is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return types.SimpleNamespace(gpu=devices[h][3], memory=0)

    def temp(h: int, sensor: int) -> int:
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        t = devices[h][4]
        if t is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return t

    monkeypatch.setattr(pynvml, "nvmlInit", init)
    monkeypatch.setattr(pynvml, "nvmlSystemGetDriverVersion", lambda: "550.54")
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: len(devices))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda i: i)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", lambda h: devices[h][2])
    monkeypatch.setattr(pynvml, "nvmlDeviceGetUtilizationRates", util)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetTemperature", temp)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetName", lambda h: devices[h][0])
    monkeypatch.setattr(pynvml, "nvmlDeviceGetUUID", lambda h: devices[h][1])
    inv = Inventory(tmp_path, "docker", 8)
    first, again = inv.collect(), inv.collect()  # refreshed on each collect; NVML initialised once
    assert calls["init"] == 1
    a, b = first.gpus
    assert (a.index, a.uuid, a.name) == (0, "GPU-aaaa", "NVIDIA A100-SXM4-80GB")
    assert (a.memory_total_bytes, a.memory_used_bytes, a.utilization_percent, a.temperature_c) == (
        80 << 30,
        1 << 30,
        37,
        41,
    )
    assert (b.index, b.uuid, b.name, b.utilization_percent, b.temperature_c) == (
        1,
        "GPU-bbbb",
        "NVIDIA A100-SXM4-80GB",
        0,
        0,
    )
    assert not a.simulated and first.runtime == "docker"
    assert list(again.gpus) == list(first.gpus)
