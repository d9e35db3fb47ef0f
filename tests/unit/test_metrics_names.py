"""Every metric the Grafana dashboard and the docs use is one the coordinator exports, named dstack_*."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dstack.coordinator.app.stats import StateCounts
from dstack.coordinator.app.streams import StreamLimits
from dstack.coordinator.http.metrics import _StateCollector
from dstack.coordinator.metrics import EngineMetrics
from dstack.coordinator.model import AgentView, GpuInfo, Inventory, JobStatus, RunStatus

ROOT = Path(__file__).resolve().parents[2]


def exported() -> set[str]:
    gpu = GpuInfo(0, name="H100", memory_total_bytes=80 << 30, memory_used_bytes=1 << 30, utilization_percent=42)
    agent = AgentView("a1", "gpu-1", "online", Inventory(gpus=[gpu]), 1, 0, busy_gpu_indices=[0])
    counts = StateCounts({RunStatus.DONE: 2}, {JobStatus.RUNNING: 1}, {"alice": 3}, [agent], 0)
    registry = CollectorRegistry()
    registry.register(_StateCollector(counts, StreamLimits(64, 4096)))
    text = (generate_latest(registry) + generate_latest(EngineMetrics().registry)).decode()
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {s.name for s in family.samples}
        if family.name == "dstack_gpu_utilization_ratio":
            assert family.samples[0].value == 0.42
            assert family.samples[0].labels == {"agent": "gpu-1", "gpu": "0", "name": "H100"}
    return names


def test_every_name_the_dashboard_uses_is_exported() -> None:
    names = exported()
    assert all(n.startswith("dstack_") for n in names), names
    dashboard = json.loads((ROOT / "deploy/grafana/dstack-dashboard.json").read_text())
    used = {m for p in dashboard["panels"] for t in p["targets"] for m in re.findall(r"\bdstack_[a-z_]+", t["expr"])}
    docs = set(re.findall(r"`(dstack_[a-z_]+)", (ROOT / "docs/metrics.md").read_text()))
    assert used and docs
    assert used - names == set()
    # The docs name families (a histogram's name, a counter's with _total): each has samples.
    missing = {d for d in docs if not any(n == d or n.startswith(d + "_") for n in names)}
    assert missing == set()
