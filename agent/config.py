from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dstack.agent.diskspace import DEFAULT_MIN_FREE, MinFree
from dstack.agent.envcache import EnvCache
from dstack.agent.jobuser import ENVS, JobUser, jobs_root
from dstack.agent.outbox import OutboxBounds
from dstack.agent.runtimes.cgroups import DEFAULT_PIDS_LIMIT
from dstack.agent.runtimes.docker_options import DockerOptions


@dataclass(frozen=True)
class AgentConfig:
    coordinator: str  # "unix:///path.sock" or "HOST:PORT"
    home: Path  # credentials, code cache, job working directories
    join_token: str = ""
    name: str = ""
    runtime: str = "host"  # host | docker | null (`auto` is resolved before the agent starts)
    docker: DockerOptions = field(default_factory=DockerOptions)
    simulate_gpus: str = ""  # e.g. "8xA100-80GB": test/dev only, never on by default
    max_jobs: int = 64
    advertise_address: str = ""  # where other agents reach this one (agent/address.py); resolved at start
    stop_grace_s: float = 10.0
    inventory_interval_s: float = 10.0
    # How long a failing coordinator call or store request of a job is retried (transient failures
    # only, with backoff: agent/retry.py) before the job fails.
    store_retry_s: float = 300.0
    mount_sync_s: float = 10.0  # how often `mount: true` artifact folders are saved while a job runs
    env_cache_max_bytes: int = 20 << 30  # Python job environments (requirements venvs); 0: one per job
    pids_limit: int = DEFAULT_PIDS_LIMIT  # processes and threads per job (cgroup pids, Docker pids_limit); 0: none
    # TCP only (a unix socket is plaintext). TLS verified against ca_file (else the system's roots); a
    # ca_fingerprint is turned into a ca_file at the first connection (agent/connection.py: pin_ca).
    ca_file: Path | None = None
    ca_fingerprint: str = ""
    insecure: bool = False
    # Host jobs run as this user (the agent runs as root: agent/jobuser.py); None: as the agent's user.
    job_user: JobUser | None = None
    job_user_name: str = ""  # --job-user, resolved into job_user at start (agent/main.py)
    job_ports: tuple[int, int] | None = None  # --job-ports LO-HI: where `ports: N` picks; None: any free port
    # Log lines owed to the coordinator: in memory, then spooled in outbox_dir, then the job's output waits.
    outbox: OutboxBounds = field(default_factory=OutboxBounds)
    # Below this much free space in its work folders the agent is disk full: it takes no new job until
    # space is back (agent/diskspace.py).
    min_free_disk: MinFree = DEFAULT_MIN_FREE

    @property
    def credentials_path(self) -> Path:
        return self.home / "agent.json"

    @property
    def outbox_dir(self) -> Path:
        """Where log lines beyond the outbox's memory bound wait for the coordinator (one folder per job)."""
        return self.home / "outbox"

    @property
    def pinned_ca_path(self) -> Path:
        """Where the CA pinned by --ca-fingerprint is kept (0600, in the 0700 home)."""
        return self.home / "coordinator-ca.pem"

    @property
    def jobs_dir(self) -> Path:
        # A job user cannot enter the agent's home (0700): its jobs' folders go next to it.
        return jobs_root(self.home) if self.job_user is not None else self.home / "jobs"

    @property
    def work_dirs(self) -> list[Path]:
        """Where jobs make the agent write: their folders, and the home (code cache, environments, spool)."""
        return [self.jobs_dir, self.home]  # the job folders may be a disk of their own

    @property
    def code_dir(self) -> Path:
        return self.home / "code"

    @property
    def env_cache(self) -> EnvCache:
        # The job user's own cache: no job can write the environments the agent's own user keeps.
        folder = self.jobs_dir / ENVS if self.job_user is not None else self.home / "envs"
        return EnvCache(folder, self.env_cache_max_bytes)
