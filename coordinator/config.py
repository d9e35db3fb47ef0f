from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CoordinatorConfig:
    state_dir: Path
    # "unix:///path/to.sock" or "HOST:PORT"
    listen: str
    storage_url: str
    admin_token: str
    join_token: str
    lease_timeout_s: float = 15.0
    heartbeat_interval_s: float = 3.0
    # After the coordinator starts, agents that were online get this long on top of their lease to
    # reconnect: they could not renew while it was down, and they notice it is back only at their
    # next retry (the agent's own backoff and gRPC's reconnect backoff, each up to about 2.4 s, add up).
    reconnect_grace_s: float = 30.0
    # Self-fencing (docs/lifecycle.md): "on", an agent with no renewal acknowledged for `lease_timeout_s`
    # stops its jobs unless the coordinator's port refuses connections (it is down: nobody requeues);
    # "strict", whatever the cause; "off", never (then a partitioned agent's attempt may run beside its
    # requeued one). With fencing a lost agent's jobs are requeued `fence_margin_s` after the lease ran out,
    # and the agents stop theirs `fence_kill_s` before that (time for the kill, a late wake-up and the
    # drift between the two monotonic clocks), so an ack may come up to lease + margin - kill late.
    self_fence: str = "on"
    fence_margin_s: float = 5.0
    fence_kill_s: float = 2.0
    # Lost agents not heard from for this long (and agents that registered but never connected) leave
    # the pool: `dstack agents` stops listing them and their names are free.
    forget_lost_agents_after_s: float = 86400.0
    # Local mode: the one local agent is all there is, so a request it can never fit fails at once
    # instead of waiting for a bigger agent to join.
    fail_unsatisfiable: bool = False
    local_mode: bool = False
    # `dstack server --approve-agents`: a newly registered agent waits as `pending approval` and gets
    # no job until an admin runs `dstack agents approve NAME`.
    approve_agents: bool = False
    # Logs of jobs finished this long ago move from the database to the store (coordinator/retention.py).
    archive_after_s: float = 600.0
    archive_interval_s: float = 30.0
    # Per job: bytes of log text stored at most; past it lines are dropped, with one marker line (0: no quota).
    max_log_bytes: int = 1 << 30
    # Per log follower: bytes of stored chunks handed to it and not yet sent; beyond it, it reads the store
    # again (coordinator/log_feed.py).
    log_follow_buffer_bytes: int = 2 << 20
    # Garbage collection (coordinator/gc.py): code blobs no run names and unfinished uploads are removed once
    # idle this long (longer than a presigned upload URL lives: 1 h), checked every gc_interval_s.
    gc_grace_s: float = 4 * 3600.0
    gc_interval_s: float = 600.0
    # Delete archived logs (and, with retention_artifacts, artifacts of untagged runs) after this many days.
    retention_days: float | None = None
    retention_artifacts: bool = False
    # Fair share (coordinator/planner.py): off gives first come, first served (with backfill).
    fairshare: bool = True
    fairshare_half_life_s: float = 86400.0
    # Per user (coordinator/app/limits.py): jobs waiting to start, and runs submitted per minute; 0: no limit.
    max_queued_per_user: int = 1000
    max_submissions_per_minute: int = 600
    # Long-lived calls (coordinator/app/streams.py): followed logs, HTTP event streams, tunnels, downloads.
    # Open at once per user and in all (0: no limit); a stream whose client has not taken a message for
    # stream_stall_s is ended (its unsent data would otherwise sit in the coordinator's memory).
    max_streams_per_user: int = 64
    max_streams: int = 4096
    stream_stall_s: float = 60.0
    # A job waiting this long gets an agent reserved for it (when smaller jobs could starve it); inf: never.
    reserve_after_s: float = 300.0
    # Fair-share preemption (coordinator/preemption.py): a job below its user's fair share that waited this
    # long may preempt interruptible jobs of users above theirs by `preempt_margin` (inf: never); no job
    # is preempted in its first `preempt_min_run_s`.
    preempt_after_s: float = 60.0
    preempt_min_run_s: float = 60.0
    preempt_margin: float = 2.0
    # TCP only (a unix socket is always plaintext: its folder is the boundary). By default the coordinator
    # serves TLS with its own private CA (coordinator/tls.py); `insecure` serves plaintext (the in-process
    # tests, and an admin who says --insecure); tls_cert/tls_key serve an admin's certificate instead.
    insecure: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_sans: tuple[str, ...] = ()  # more names and addresses for the generated server certificate
    # The HTTP API and /metrics (coordinator/http/): None: not served; 0: a free port (written to
    # STATE_DIR/http-url). Same TLS as gRPC; host: gRPC's (127.0.0.1 for a unix socket) unless set.
    http_port: int | None = None
    http_host: str = ""
    # A file holding a token that Prometheus may scrape /metrics with (besides any user's token).
    metrics_token_file: Path | None = None

    @property
    def http_bind_host(self) -> str:
        if self.http_host:
            return self.http_host
        if self.listen.startswith("unix://"):
            return "127.0.0.1"  # local mode: this machine only
        return self.listen.rpartition(":")[0].strip("[]") or "0.0.0.0"

    @property
    def http_url_path(self) -> Path:
        return self.state_dir / "http-url"

    @property
    def db_path(self) -> Path:
        return self.state_dir / "coordinator.db"

    @property
    def secrets_key_path(self) -> Path:
        return self.state_dir / "secrets.key"
