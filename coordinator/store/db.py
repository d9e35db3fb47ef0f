"""The store's one handle: the shared connection (`Db`: `tx`, the clock) with a repository per
resource hung off it, and the flat names the coordinator calls (each one a repository's method).

All blocking: called on the DbExecutor thread, never from the event loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from dstack.coordinator.store.agents import AgentRow, Agents, Removal
from dstack.coordinator.store.artifacts import ArtifactRow, Artifacts, FileRecord, UploadJob
from dstack.coordinator.store.base import Db
from dstack.coordinator.store.cache import StepCache
from dstack.coordinator.store.code import CodeBlobs
from dstack.coordinator.store.jobs import (
    AgentJob,
    Allocation,
    Assignment,
    JobLocation,
    JobRow,
    Jobs,
    Placement,
    QueuedJob,
    UpdateResult,
    WaitingJob,
)
from dstack.coordinator.store.join_tokens import JoinTokenRow, JoinTokens
from dstack.coordinator.store.journal import JobJournal
from dstack.coordinator.store.logs import ArchivableJob, Logs
from dstack.coordinator.store.records import Records
from dstack.coordinator.store.runs import CreatedRun, ExpiredRun, NewJob, RunFilters, RunRow, Runs, StopOnAgent
from dstack.coordinator.store.scope import Scope
from dstack.coordinator.store.secrets import SecretRow, Secrets
from dstack.coordinator.store.tags import TagRow, Tags
from dstack.coordinator.store.usage import FinishedJob, OnAgent, Usage, UserLimitsRow
from dstack.coordinator.store.users import UserRow, Users, hash_token

__all__ = [
    "AgentJob",
    "AgentRow",
    "Allocation",
    "ArchivableJob",
    "ArtifactRow",
    "Assignment",
    "CreatedRun",
    "ExpiredRun",
    "FileRecord",
    "FinishedJob",
    "JobLocation",
    "JobRow",
    "JoinTokenRow",
    "NewJob",
    "OnAgent",
    "Placement",
    "QueuedJob",
    "Removal",
    "RunFilters",
    "RunRow",
    "SecretRow",
    "StopOnAgent",
    "Store",
    "TagRow",
    "UpdateResult",
    "UploadJob",
    "UserLimitsRow",
    "UserRow",
    "WaitingJob",
    "hash_token",
]


class Store(Db):
    def rolled_back(self) -> None:
        self.logs.forget_all()

    def __init__(self, path: Path, clock: Callable[[], int] = time.time_ns, *, read_only: bool = False) -> None:
        super().__init__(path, clock, read_only=read_only)
        self.users = Users(self)
        self.code = CodeBlobs(self)
        self.runs = Runs(self)
        self.jobs = Jobs(self)
        self.agents = Agents(self)
        self.logs = Logs(self)
        self.artifacts = Artifacts(self, self.runs)
        self.tags = Tags(self, self.runs)
        self.secrets = Secrets(self)
        self.records = Records(self)
        self.cache = StepCache(self)
        self.scope = Scope(self)
        self.usage = Usage(self)
        self.journal = JobJournal(self)  # which jobs changed since a pass last looked (the writer's)
        self.jobs.charge = self.usage.charge_ended
        self.join_tokens = JoinTokens(self)

        # users and code
        self.ensure_user = self.users.ensure
        self.user_for_token = self.users.for_token
        self.user_with_role = self.users.with_role
        self.user = self.users.get
        self.user_by_token_hash = self.users.by_token_hash
        self.list_users = self.users.all
        self.add_user = self.users.add
        self.remove_user = self.users.remove
        self.rotate_user_token = self.users.rotate
        self.touch_user = self.users.touch
        self.has_code = self.code.has
        self.add_code = self.code.add
        self.touch_code = self.code.touch
        # runs
        self.reserve_run_name = self.runs.reserve_name
        self.create_run = self.runs.create
        self.run_by_name = self.runs.by_name
        self.run_with_tags = self.runs.by_name_with_tags
        self.run_by_id = self.runs.by_id
        self.list_runs = self.runs.recent
        self.runs_page = self.runs.page
        self.runs_listing_page = self.runs.listing_page
        self.run_counts = self.runs.counts_by_status
        self.queued_jobs_of = self.runs.queued_jobs_of
        self.request_stop = self.runs.request_stop
        self.latest_done_run = self.runs.latest_done_ref
        self.repositories = self.runs.repositories
        self.deletable_run = self.runs.deletable
        self.delete_run = self.runs.delete
        self.expired_runs = self.runs.expired
        self.mark_artifacts_deleted = self.runs.mark_artifacts_deleted
        # jobs
        self.jobs_of_runs = self.jobs.of_runs
        self.job_counts = self.jobs.counts_by_status
        self.queued_jobs = self.jobs.queued
        self.run_ids_of_jobs = self.jobs.run_ids
        self.job_location = self.jobs.location
        self.waiting_jobs = self.jobs.waiting
        self.waiting_jobs_of = self.jobs.waiting_of
        self.dependency_statuses = self.jobs.dependency_statuses
        self.active_allocations = self.jobs.active_allocations
        self.apply_schedule = self.jobs.apply_schedule
        self.assignments_for_agent = self.jobs.assignments_for_agent
        self.jobs_on_agent = self.jobs.on_agent
        self.terminal_or_unknown = self.jobs.terminal_or_unknown
        self.stop_unstarted = self.jobs.stop_unstarted
        self.fail_jobs_lost_by_agent = self.jobs.fail_lost_by_agent
        self.fail_undelivered = self.jobs.fail_undelivered
        self.apply_job_updates = self.jobs.apply_updates
        self.apply_job_updates_many = self.jobs.apply_updates_many
        self.request_preempt = self.jobs.request_preempt
        self.job_attempts = self.jobs.attempts_of
        self.starved_among = self.jobs.starved_among
        self.jobs_with_max_duration = self.jobs.with_max_duration
        self.stop_for_max_duration = self.jobs.stop_for_max_duration
        self.running_for_preemption = self.jobs.running_for_preemption
        self.any_preemptible_running = self.jobs.any_preemptible_running
        self.gang_ports = self.jobs.gang_ports
        self.settle_gangs = self.jobs.settle_gangs
        # agents
        self.register_agent = self.agents.register
        self.unused_agents = self.agents.unused
        self.forget_agents = self.agents.forget
        self.agent_by_token = self.agents.by_token
        self.agent_online = self.agents.online
        self.heartbeat = self.agents.heartbeat
        self.extend_all_leases = self.agents.extend_all_leases
        self.expire_leases = self.agents.expire_leases
        self.record_heard = self.agents.record_heard
        self.online_agent_ids = self.agents.online_ids
        self.lose_agents = self.agents.lose
        self.online_agents = self.agents.online_agents
        self.online_agent_keys = self.agents.online_agent_keys
        self.list_agents = self.agents.pool
        self.remove_agent = self.agents.remove
        self.approve_agent = self.agents.approve
        # join tokens
        self.ensure_default_join_token = self.join_tokens.ensure_default
        self.create_join_token = self.join_tokens.create
        self.list_join_tokens = self.join_tokens.all
        self.revoke_join_token = self.join_tokens.revoke
        self.check_join_token = self.join_tokens.check
        # logs
        self.insert_logs = self.logs.insert
        self.log_positions = self.logs.positions
        self.read_logs = self.logs.read
        self.read_log_page = self.logs.read_page
        self.all_logs = self.logs.all
        self.jobs_to_archive = self.logs.jobs_to_archive
        self.mark_logs_archived = self.logs.mark_archived
        self.mark_logs_deleted = self.logs.mark_deleted
        # artifacts
        self.save_artifacts = self.artifacts.save
        self.list_artifacts = self.artifacts.of_run
        self.artifact = self.artifacts.get
        self.container_paths_of_run = self.artifacts.container_paths_of_run
        self.create_upload_run = self.artifacts.create_upload_run
        self.upload_job = self.artifacts.upload_job
        self.finish_upload_run = self.artifacts.finish_upload_run
        # tags
        self.tags_of_runs = self.tags.of_runs
        self.add_tag = self.tags.add
        self.tag = self.tags.get
        self.resolve_tag = self.tags.resolve
        self.list_tags = self.tags.all
        self.delete_tag = self.tags.delete
        # secrets
        self.put_secret = self.secrets.put
        self.list_secrets = self.secrets.all
        self.secret_ciphertexts = self.secrets.ciphertexts
        self.secret_names = self.secrets.names
        self.delete_secret = self.secrets.delete
        # what an agent may touch (coordinator/app/agent_scope.py)
        self.agent_acting_job = self.scope.acting_job
        self.agent_reportable = self.scope.reportable
        self.agents_acting_of_many = self.scope.acting_of_many
        self.agent_lost_attempts = self.scope.lost_attempts
        self.agent_has_code = self.scope.has_code
        self.agent_input_sources = self.scope.input_sources
        # fair share and quotas
        self.charge_finished_usage = self.usage.charge_finished
        self.usage_accumulators = self.usage.accumulators
        self.recent_durations = self.usage.recent_durations
        self.jobs_on_agents = self.usage.on_agents
        self.jobs_on_agent_rows = self.usage.on_agent_rows
        self.user_limits = self.usage.limits
        self.user_role = self.usage.role
        self.set_user_limits = self.usage.set_limits
