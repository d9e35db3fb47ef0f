from __future__ import annotations

import logging
from pathlib import Path

import pytest

from agent.inventory import Inventory, InventoryError, parse_simulated


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
