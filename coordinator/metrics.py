"""The coordinator's own Prometheus instruments: what happens over time (scheduling passes, dispatch
latency, log lines, artifact bytes, store errors). What the state is now (runs and jobs by state, queue
depth, agents, GPUs) is read when /metrics is scraped (coordinator/http/metrics.py), not kept here.

One registry per coordinator, not prometheus-client's global one: the in-process tests start several
coordinators in one interpreter, and each must count only its own.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# A pass over a big queue takes tens of milliseconds; a dispatch can wait from milliseconds to days. The
# pass's buckets are finer around issue 16's target (a p99 of 50 ms), so that a p99 read from them says
# how far below or above it is, not only on which side.
PASS_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
DISPATCH_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 24 * 3600.0)


class EngineMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.scheduling_pass = Histogram(
            "dstack_scheduling_pass_seconds",
            "How long one scheduling pass took: planning and writing it on the DB thread (not its wait there)"
            " and sending its assignments",
            buckets=PASS_BUCKETS,
            registry=self.registry,
        )
        self.scheduling_pass_cpu = Histogram(
            "dstack_scheduling_pass_cpu_seconds",
            "CPU time one scheduling pass took (its threads' own, as dstack_scheduling_pass_seconds counts it):"
            " what a loaded host's other processes do not add to",
            buckets=PASS_BUCKETS,
            registry=self.registry,
        )
        self.full_pass = Histogram(
            "dstack_scheduling_full_pass_seconds",
            "How long one full pass took (every waiting job's reason, position and estimated start; also"
            " counted in dstack_scheduling_pass_seconds): over a deep queue, at most one a second",
            buckets=PASS_BUCKETS,
            registry=self.registry,
        )
        self.heads_walked = Histogram(
            "dstack_scheduling_heads_walked",
            "Waiting jobs a heads-only pass looked at (it stops once nothing that waits fits anywhere)",
            buckets=(1, 10, 100, 1000, 10_000, 100_000),
            registry=self.registry,
        )
        self.dispatch_latency = Histogram(
            "dstack_dispatch_latency_seconds",
            "From a job's submission (or requeue) to its assignment to an agent",
            buckets=DISPATCH_BUCKETS,
            registry=self.registry,
        )
        self.assignments = Counter(
            "dstack_assignments", "Jobs assigned to agents by the scheduler", registry=self.registry
        )
        self.log_lines = Counter(
            "dstack_log_lines", "Log lines received from agents (resends included)", registry=self.registry
        )
        # Followers' hand-off (coordinator/log_feed.py): chunks sent on without a store read, and followers
        # that did not take theirs in time (they read the store again).
        self.log_chunks_handed = Counter(
            "dstack_log_chunks_handed_off",
            "Stored log chunks a caught-up follower sent on as handed to it, without reading the store",
            registry=self.registry,
        )
        self.log_follower_overflows = Counter(
            "dstack_log_follower_overflows",
            "Times a follower's hand-off buffer overflowed (a slow reader): it reads the store again",
            registry=self.registry,
        )
        self.artifact_bytes = Counter(
            "dstack_artifact_bytes",
            "Bytes of artifacts committed (by agents' jobs and uploads)",
            registry=self.registry,
        )
        self.agents_lost = Counter(
            "dstack_agents_lost", "Agents marked lost because their lease ran out", registry=self.registry
        )
        # The longest an agent holding a lease went unheard (between two of its messages read): how close
        # the pool came to a lease timeout (coordinator/leases.py).
        self.longest_silence = Gauge(
            "dstack_agent_longest_silence_seconds",
            "The longest gap between two messages read from one online agent, since the coordinator started",
            registry=self.registry,
        )
        self.lease_check_lateness = Histogram(
            "dstack_lease_check_lateness_seconds",
            "How late each lease check ran (the coordinator's event loop stalled, or its process was descheduled)",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=self.registry,
        )
        self.scheduling_failures = Counter(
            "dstack_scheduling_pass_failures", "Scheduling passes that failed and were retried", registry=self.registry
        )
