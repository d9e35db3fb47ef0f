"""GET /metrics in Prometheus' text format.

Counters and histograms of what happened live in the engine (coordinator/metrics.py). The state now
(runs and jobs by status, queue depth per user, agents, GPUs) is read at scrape time by one use case
(coordinator/app/stats.py: two grouped counts and the agents, on the DB thread; the queue from memory),
so a scrape costs the same whatever the history, and nothing is kept in step with the database.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dstack.coordinator.app.core import Core
from dstack.coordinator.app.stats import StateCounts, state_counts
from dstack.coordinator.app.streams import StreamLimits
from dstack.coordinator.model import JobStatus, RunStatus


class _StateCollector(Collector):
    def __init__(self, counts: StateCounts, streams: StreamLimits) -> None:
        self.counts = counts
        self.streams = streams

    def collect(self) -> Iterator[Metric]:
        c = self.counts
        runs = GaugeMetricFamily("dstack_runs", "Runs by status", labels=["status"])
        for rs in RunStatus:
            if rs.value:
                runs.add_metric([rs.name.lower()], c.runs.get(rs, 0))
        yield runs
        jobs = GaugeMetricFamily("dstack_jobs", "Jobs by status", labels=["status"])
        for js in JobStatus:
            if js.value:
                jobs.add_metric([js.name.lower()], c.jobs.get(js, 0))
        yield jobs
        depth = GaugeMetricFamily("dstack_queue_depth", "Jobs waiting to start, per user", labels=["user"])
        for user, n in sorted(c.queued_per_user.items()):
            depth.add_metric([user], n)
        yield depth
        agents = GaugeMetricFamily("dstack_agents", "Agents by status", labels=["status"])
        by_status: dict[str, int] = {}
        for a in c.agents:
            by_status[a.status] = by_status.get(a.status, 0) + 1
        for status, n in sorted(by_status.items()):
            agents.add_metric([status], n)
        yield agents
        labels = ["agent", "gpu", "name"]
        util = GaugeMetricFamily(
            "dstack_gpu_utilization_ratio", "GPU utilisation (0 to 1), last reported", labels=labels
        )
        used = GaugeMetricFamily("dstack_gpu_memory_used_bytes", "GPU memory in use, last reported", labels=labels)
        total = GaugeMetricFamily("dstack_gpu_memory_total_bytes", "GPU memory", labels=labels)
        busy = GaugeMetricFamily("dstack_gpu_allocated", "1 if a job holds the GPU", labels=labels)
        for a in c.agents:
            if a.status != "online":
                continue  # a lost agent's last figures are stale
            held = set(a.busy_gpu_indices)
            for g in a.inventory.gpus:
                key = [a.name, str(g.index), g.name]
                util.add_metric(key, g.utilization_percent / 100)
                used.add_metric(key, g.memory_used_bytes)
                total.add_metric(key, g.memory_total_bytes)
                busy.add_metric(key, 1 if g.index in held else 0)
        yield from (util, used, total, busy)
        yield CounterMetricFamily(
            "dstack_store_errors", "Database calls that failed with a database error", value=c.store_errors
        )
        s = self.streams
        yield GaugeMetricFamily("dstack_streams_open", "Long-lived calls open (logs, tunnels, downloads)", s.open_total)
        yield CounterMetricFamily(
            "dstack_streams_refused", "Long-lived calls refused by --max-streams(-per-user)", value=s.refused
        )
        yield CounterMetricFamily(
            "dstack_streams_dropped_slow", "Streams ended because their client took nothing", value=s.dropped_slow
        )


async def exposition(core: Core) -> tuple[bytes, str]:
    """The /metrics body and its content type."""
    from prometheus_client import CollectorRegistry

    counts = await state_counts(core)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StateCollector(counts, core.streams))
    # Small: a few dozen series plus one per GPU; rendered on the loop (no disk, no lock held long).
    body = generate_latest(registry) + generate_latest(core.engine.metrics.registry)
    return body, CONTENT_TYPE_LATEST
