"""The agent's session with the coordinator: register, connect, and keep the stream alive.

One stream at a time. On any failure the agent reconnects with backoff (agent/retry.py: the session
never gives up); running jobs keep running and what they produced meanwhile waits in the outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc

from dstack.agent.artifacts import Downloader, Uploader
from dstack.agent.code import CodeCache
from dstack.agent.config import AgentConfig
from dstack.agent.diskspace import DiskWatch
from dstack.agent.inventory import Inventory
from dstack.agent.jobuser import JobUserError, prepare_root
from dstack.agent.lease import FencePolicy, LeaseGuard, refused
from dstack.agent.outbox import SHORT_BATCH_GAP_S, SHORT_BATCHES_INFLIGHT, Outbox
from dstack.agent.ports import PortPool
from dstack.agent.retry import SESSION_BACKOFF, Outcome, RetryPolicy, classify, describe
from dstack.agent.runner import Janitor, JobRunner, RunnerDeps, set_aside_job_folders
from dstack.agent.runtimes import make_runtime
from dstack.agent.tunnels import JobPorts, Tunnels
from dstack.protos.v1 import agent_pb2, agent_pb2_grpc, common_pb2
from dstack.storage.backoff import Attempts, Backoff
from dstack.storage.private import private_dir, tighten_file
from dstack.storage.transfer import Transfer
from dstack.tls import (
    FingerprintMismatch,
    TlsSetupError,
    Transport,
    fingerprint,
    handshake_failure,
    parse_fingerprint,
    pin_by_fingerprint,
    read_ca_file,
    save_pem,
    speaks_tls,
)

log = logging.getLogger("dstack.agent")

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # Reconnect fast after a coordinator restart: the default backoff grows to 2 minutes.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


# How long before its lease runs out the agent starts asking whether the coordinator is down (a refused
# connection), at most: a third of the lease, so a short lease leaves time to renew first.
PROBE_WINDOW_S = 2.0
# A probe's connection attempt lasts at most this long (never past the lease's end).
PROBE_TIMEOUT_S = 1.0


class FatalAgentError(Exception):
    """Retrying cannot help (e.g. the join token is wrong)."""


PIN_HINT = (
    "give the coordinator's CA with --ca-file (its STATE_DIR/tls/ca.pem) or --ca-fingerprint SHA256:... (printed by"
    " `dstack server`), or the environment variables DSTACK_CA_FILE / DSTACK_CA_FINGERPRINT"
)


def plaintext(config: AgentConfig) -> bool:
    return config.insecure or config.coordinator.startswith("unix:")


def transport(config: AgentConfig) -> Transport:
    if plaintext(config):
        return Transport(insecure=True)
    if config.ca_file is None:
        return Transport()
    try:
        return Transport(ca_pem=read_ca_file(config.ca_file), ca_source=str(config.ca_file))
    except TlsSetupError as e:
        raise FatalAgentError(f"{e}; {PIN_HINT}") from None


def open_channel(config: AgentConfig) -> grpc.aio.Channel:
    t = transport(config)
    if t.insecure:
        return grpc.aio.insecure_channel(config.coordinator, options=CHANNEL_OPTIONS)
    return grpc.aio.secure_channel(config.coordinator, t.credentials(), options=[*CHANNEL_OPTIONS, *t.options()])


async def pin_ca(config: AgentConfig) -> AgentConfig:
    """With --ca-fingerprint: the config with ca_file set to the CA pinned in the agent's home.

    The first start fetches the server's chain (retrying while the coordinator is unreachable), keeps the
    certificate with that fingerprint and saves it 0600; later starts use the saved one. A server that
    presents no such certificate stops the agent: retrying cannot make it the right coordinator."""
    if not config.ca_fingerprint or plaintext(config):
        return config
    try:
        expected = parse_fingerprint(config.ca_fingerprint)
    except TlsSetupError as e:
        raise FatalAgentError(str(e)) from None
    path = config.pinned_ca_path
    pinned = dataclasses.replace(config, ca_file=path, ca_fingerprint="")
    if await asyncio.to_thread(path.exists):
        try:
            if fingerprint(await asyncio.to_thread(path.read_bytes)) == expected:
                return pinned
        except (OSError, TlsSetupError):
            pass
        log.warning("%s is not the CA with fingerprint %s: fetching it again", path, expected)
    await asyncio.to_thread(private_dir, config.home, log)
    attempts = SESSION_BACKOFF.start()
    while True:
        try:
            pem = await asyncio.to_thread(pin_by_fingerprint, config.coordinator, expected)
            break
        except FingerprintMismatch as e:
            raise FatalAgentError(f"{e}; nothing was sent to it") from None
        except TlsSetupError as e:
            raise FatalAgentError(str(e)) from None
        except OSError as e:  # ssl.SSLError too: a plaintext server, or one still starting
            if "WRONG_VERSION_NUMBER" in str(e) or "wrong version number" in str(e):
                raise FatalAgentError(_not_tls(config.coordinator)) from None
            delay = attempts.next_delay() or SESSION_BACKOFF.max_s
            log.info("fetching the coordinator's CA from %s failed (%s); again in %.1fs", config.coordinator, e, delay)
            await asyncio.sleep(delay)
    await asyncio.to_thread(save_pem, path, pem)
    log.info("pinned the coordinator's CA %s in %s", expected, path)
    return pinned


def _not_tls(address: str) -> str:
    return (
        f"the coordinator at {address} does not speak TLS (was it started with --insecure?): give this agent"
        " --insecure too, only on a network you trust completely"
    )


async def tls_fatal(config: AgentConfig, e: grpc.aio.AioRpcError) -> FatalAgentError | None:
    """A failed handshake that retrying cannot fix, as a clear error; None for any other failure."""
    if e.code() != grpc.StatusCode.UNAVAILABLE or config.coordinator.startswith("unix:"):
        return None
    details = e.details() or ""
    if config.insecure:
        # A TLS server closes a plaintext connection without a word: ask it whether it speaks TLS.
        if ("Socket closed" in details or "Connection reset" in details) and await asyncio.to_thread(
            speaks_tls, config.coordinator
        ):
            return FatalAgentError(
                f"the coordinator at {config.coordinator} speaks TLS, and this agent has --insecure: {PIN_HINT}"
            )
        return None
    kind = handshake_failure(details)
    if kind == "plaintext":
        return FatalAgentError(_not_tls(config.coordinator))
    if kind == "untrusted":
        if config.ca_file is not None:
            return FatalAgentError(
                f"the certificate of the coordinator at {config.coordinator} does not match the pinned CA"
                f" ({config.ca_file}): if the coordinator's CA was made anew, give the new one; if not, something"
                f" is answering in its place. ({details})"
            )
        return FatalAgentError(
            f"the coordinator at {config.coordinator} speaks TLS with a certificate this agent does not trust:"
            f" {PIN_HINT}"
        )
    return None


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.outbox = Outbox(
            spool_dir=config.outbox_dir,
            bounds=config.outbox,
            short_batches_inflight=SHORT_BATCHES_INFLIGHT,
            short_batch_gap_s=SHORT_BATCH_GAP_S,
        )
        self.runtime = make_runtime(
            config.runtime,
            config.stop_grace_s,
            config.docker,
            str(config.home),
            config.env_cache,
            config.pids_limit,
            config.job_user,
        )
        self.disk = DiskWatch(config.work_dirs, config.min_free_disk)
        self.inventory = Inventory(
            config.home, config.runtime, config.max_jobs, config.simulate_gpus, config.advertise_address, self.disk
        )
        self._inventory_now = False  # a job met a full disk: the next heartbeat carries the inventory at once
        self.jobs: dict[str, JobRunner] = {}
        self.agent_id = ""
        self.session_started = False  # set once a session is acknowledged: its end resets the retry delay
        self.token = ""
        self.channel = open_channel(config)
        self.stub = agent_pb2_grpc.AgentServiceStub(self.channel)
        # One policy (agent/retry.py) for every coordinator call and store transfer a job makes.
        self.policy = RetryPolicy(Backoff(deadline_s=config.store_retry_s))
        # One pool of store connections for code, inputs and artifacts of every job on this agent.
        self.transfer = Transfer(backoff=self.policy.backoff, retryable=self.policy.retries_in_place)
        self.code = CodeCache(config.code_dir, self.stub, self.metadata, self.transfer, self.policy)
        self._last_inventory: common_pb2.Inventory | None = None
        self.tunnels = Tunnels(self.stub, self.metadata, self._job_ports)
        self._background: set[asyncio.Task[None]] = set()
        # Self-fencing (agent/lease.py): when the jobs must be stopped for want of an acknowledged renewal.
        self.lease = LeaseGuard()
        # The heartbeat's look at the disk and inventory runs on a thread of its own: on the shared default
        # pool it waited behind artifact uploads, unpacks and cgroup work (6 threads on 2 cores), under load
        # for longer than the lease, and the agent stopped its own healthy jobs (self-fence; issue 16 chaos).
        self._beat_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dstack-heartbeat")
        self.deps = RunnerDeps(
            jobs_dir=config.jobs_dir,
            runtime=self.runtime,
            code=self.code,
            outbox=self.outbox,
            uploader=Uploader(self.stub, self.metadata, self.policy, self.transfer),
            downloader=Downloader(self.stub, self.metadata, self.policy, self.transfer),
            gpu_uuids=self._gpu_uuids,
            gpu_infos=self._gpu_infos,
            gpu_versions=self.inventory.versions,
            gpus_simulated=bool(config.simulate_gpus),
            janitor=Janitor(),
            mount_sync_s=config.mount_sync_s,
            agent_home=str(config.home),
            ports=PortPool(config.job_ports),
            disk=self.disk,
            disk_full=self._disk_full,
            agent_name=config.name,
        )

    def _disk_full(self) -> None:
        """A job met a full disk: the coordinator hears it with the next message, not an inventory later,
        so it places nothing more here meanwhile."""
        self._inventory_now = True
        self.outbox.wake.set()
        self.outbox.urgent.set()

    def metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")]

    def _job_ports(self, job_id: str) -> JobPorts | None:
        """The ports of a job this agent runs now (started, not ended), for agent/tunnels.py."""
        runner = self.jobs.get(job_id)
        if runner is None or runner.proc is None:
            return None
        return JobPorts(runner.published_ports)

    def _gpu_uuids(self, indices: list[int]) -> list[str]:
        inv = self._last_inventory
        if inv is None or any(g.simulated for g in inv.gpus):
            return []  # simulated GPUs have no real UUID: pin by index
        by_index = {g.index: g.uuid for g in inv.gpus}
        return [by_index[i] for i in indices if i in by_index]

    def _gpu_infos(self, indices: list[int]) -> list[common_pb2.GpuInfo]:
        inv = self._last_inventory
        by_index = {g.index: g for g in inv.gpus} if inv is not None else {}
        return [by_index[i] for i in indices if i in by_index]

    # ---- credentials -------------------------------------------------------------------------
    async def _load_credentials(self) -> bool:
        path = self.config.credentials_path
        if not await asyncio.to_thread(path.exists):
            return False
        data = json.loads(await asyncio.to_thread(path.read_text))
        if data.get("coordinator") != self.config.coordinator:
            return False
        self.agent_id, self.token = data["agent_id"], data["agent_token"]
        return True

    async def _register(self) -> None:
        if not self.config.join_token:
            raise FatalAgentError(
                "this agent is not registered: give it the join token with --join-token-file PATH or the"
                " DSTACK_JOIN_TOKEN environment variable (the server keeps it in STATE_DIR/join-token)"
            )
        inv = await asyncio.to_thread(self.inventory.collect)
        try:
            # The join token as metadata: the coordinator refuses a Register without it before reading
            # the body. The body's copy is for coordinators older than that check.
            resp = await self.stub.Register(
                agent_pb2.RegisterRequest(join_token=self.config.join_token, name=self.config.name, inventory=inv),
                metadata=[("authorization", f"Bearer {self.config.join_token}")],
            )
        except grpc.aio.AioRpcError as e:
            # Registering is what REREGISTER does: refused here, the join token is wrong (agent/retry.py).
            if classify(e) is Outcome.REREGISTER:
                raise FatalAgentError(f"the coordinator refused the join token: {e.details()}") from e
            if classify(e) is Outcome.FINAL:  # e.g. its name is taken by an agent that is online
                raise FatalAgentError(f"the coordinator refused to register this agent: {describe(e)}") from e
            raise
        self.agent_id, self.token = resp.agent_id, resp.agent_token
        creds = {"coordinator": self.config.coordinator, "agent_id": self.agent_id, "agent_token": self.token}

        def save() -> None:
            path = self.config.credentials_path
            private_dir(path.parent, log)
            tmp = path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(fd, 0o600)  # a .tmp left by a crash keeps its mode through O_CREAT
            with os.fdopen(fd, "w") as f:
                json.dump(creds, f)
            os.replace(tmp, path)

        await asyncio.to_thread(save)
        log.info("registered with the coordinator as %s", self.agent_id)

    # ---- main loop ---------------------------------------------------------------------------
    async def run(self) -> None:
        # The home holds the agent's credential and the jobs' folders: the owner's only.
        await asyncio.to_thread(private_dir, self.config.home, log)
        await asyncio.to_thread(tighten_file, self.config.credentials_path, log)
        await self.runtime.cleanup_leftovers(str(self.config.home))
        # A previous agent's spooled lines: its jobs were stopped above and its outbox died with it.
        await asyncio.to_thread(shutil.rmtree, self.config.outbox_dir, True)
        # And its jobs' folders (none of its jobs is adopted): moved aside now, removed off the start path.
        for folder in await asyncio.to_thread(set_aside_job_folders, self.config.jobs_dir):
            self.deps.janitor.remove(folder)
        await asyncio.to_thread(self.code.remove_partial)  # and its unfinished code downloads
        if self.config.job_user is not None:  # its folders, outside the home (agent/jobuser.py)
            try:
                await asyncio.to_thread(prepare_root, self.config.jobs_dir, self.config.job_user)
            except JobUserError as e:
                raise FatalAgentError(str(e)) from e
        # Made by the agent, not by the first job: Docker would create a missing bind-mount source as root.
        await asyncio.to_thread(self.config.env_cache.folder.mkdir, parents=True, exist_ok=True)
        attempts = SESSION_BACKOFF.start()
        registered = await self._load_credentials()
        watchdog = asyncio.create_task(self._fence_watch(), name="self-fence")
        try:
            await self._sessions(attempts, registered)
        finally:
            watchdog.cancel()
            await asyncio.gather(watchdog, return_exceptions=True)

    async def _sessions(self, attempts: Attempts, registered: bool) -> None:
        while True:
            try:
                if not registered:
                    await self._register()
                    registered = True
                self.session_started = False
                await self._session()
            except FatalAgentError:
                raise
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as e:
                if classify(e) is Outcome.REMOVED:
                    # Retrying cannot help: its credential is revoked for good. Its jobs were failed by
                    # the coordinator; close() stops what still runs here.
                    raise FatalAgentError(
                        f"{describe(e)}. The agent stops. To enrol this host again, delete"
                        f" {self.config.credentials_path} and start the agent with a new join token"
                    ) from e
                if isinstance(e, grpc.aio.AioRpcError) and (fatal := await tls_fatal(self.config, e)) is not None:
                    raise fatal from None
                if classify(e) is Outcome.REREGISTER:
                    log.warning("the coordinator does not know this agent any more; registering again")
                    registered = False
                    continue
                # Any other outcome, FINAL too, is retried: the session outlives coordinator restarts
                # and upgrades, and its jobs keep running meanwhile.
                log.info("the session with the coordinator ended: %s", describe(e))
            except Exception:
                # The agent must outlive any one bad session: its jobs are still running.
                log.exception("session with the coordinator failed")
            if not self.session_started:
                await self._note_refusal()
            if self.session_started:  # a session that got going ended: the next try is a fresh start
                attempts = SESSION_BACKOFF.start()
            delay = attempts.next_delay() or SESSION_BACKOFF.max_s
            log.info("reconnecting in %.1fs", delay)
            await asyncio.sleep(delay)

    async def _session(self) -> None:
        call = self.stub.Connect(metadata=self.metadata())
        inv = await asyncio.to_thread(self.inventory.collect)
        self._last_inventory = inv
        active = set(self.jobs) | self.outbox.jobs_with_pending()
        hello_sent_at = self.lease.clock()  # before the coordinator can receive it: the lease counts from here
        await call.write(
            agent_pb2.AgentMessage(
                hello=agent_pb2.Hello(agent_id=self.agent_id, inventory=inv, active_job_ids=sorted(active))
            )
        )
        first = await call.read()
        if first is grpc.aio.EOF:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, None, None, "stream closed")
        ack = first.hello_ack
        # Before its assignments are started (below): a job is never started outside a counted lease.
        policy = FencePolicy(ack.self_fence_after_ms / 1000, ack.self_fence_strict, ack.reconnect_grace_ms / 1000)
        self.lease.adopt(policy, hello_sent_at)
        self.outbox.on_new_stream({p.job_id: p.seq for p in ack.log_positions}, blocks=ack.log_blocks)
        interval = (ack.heartbeat_interval_ms or 3000) / 1000
        self.session_started = True
        log.info("connected to the coordinator (%d active jobs)", len(active))
        await self._handle(first)
        # The session lasts while both directions do: if either ends or fails, the session ends
        # (a dead sender would otherwise stop heartbeats while the agent looks connected).
        tasks = {asyncio.create_task(self._send_loop(call, interval)), asyncio.create_task(self._read_loop(call))}
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            call.cancel()
            self.lease.stream_ended()
        for t in done:
            if not t.cancelled() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
        # The stream ended without an error status: treat as a disconnect.
        raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, None, None, "stream ended")

    async def _read_loop(self, call: grpc.aio.StreamStreamCall) -> None:
        while (msg := await call.read()) is not grpc.aio.EOF:
            await self._handle(msg)

    async def _send_loop(self, call: grpc.aio.StreamStreamCall, interval: float) -> None:
        """Writes, in this order of priority: the heartbeat when due, job updates, then one bounded log
        batch at a time (agent/outbox.py), so control traffic never waits behind a job's logs."""
        next_beat = time.monotonic() + interval
        next_inventory = time.monotonic() + self.config.inventory_interval_s
        seq = 0  # this stream's heartbeats, numbered for the coordinator's lease acks
        while True:
            now = time.monotonic()
            if now >= next_beat or self._inventory_now:
                due = now >= next_inventory or self._inventory_now
                self._inventory_now = False
                beat = await self._heartbeat(due)
                seq += 1
                beat.seq = seq
                self.lease.sent(seq, self.lease.clock())
                await call.write(agent_pb2.AgentMessage(heartbeat=beat))
                if due:
                    next_inventory = now + self.config.inventory_interval_s
                next_beat = now + interval
                continue
            self.outbox.wake.clear()  # before looking: whatever is added from now on wakes the wait below
            self.outbox.urgent.clear()
            if (control := self.outbox.take_control()) is not None:
                await call.write(control)
                continue
            await self.outbox.refill()
            # No linger between log batches: the outbox batches by acknowledgements (Outbox.take_logs), so
            # a lone line goes at once and a steady job's lines go together while the last batch is stored.
            if (logs := self.outbox.take_logs()) is not None:
                await call.write(logs)
                continue
            # asyncio.timeout, not wait_for: no task per wait (Python 3.11), and no swallowed cancel.
            wait_until = next_beat
            if (at := self.outbox.short_batch_at()) is not None:  # lines wait out the short-batch gap
                wait_until = min(wait_until, at)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, wait_until - time.monotonic())):
                    await self.outbox.wake.wait()

    async def _heartbeat(self, with_inventory: bool) -> agent_pb2.Heartbeat:
        """A heartbeat; with the inventory when it is due, or when the disk's verdict changed since the
        last one sent (its free space is looked at with every heartbeat: a statvfs, and the coordinator
        learns within a heartbeat that the disk is full, or that the space is back)."""
        beat = agent_pb2.Heartbeat()
        try:
            inv = await asyncio.get_running_loop().run_in_executor(self._beat_pool, self._look, with_inventory)
        except Exception:  # a flaky NVML read must not stop the heartbeat
            log.exception("reading the inventory failed; heartbeat without it")
            return beat
        if inv is not None:
            was_full = self._last_inventory is not None and self._last_inventory.disk_full
            if inv.disk_full != was_full:
                state = self.disk.state
                if inv.disk_full:
                    log.warning(
                        "%s (below %d MiB): draining, no new job until space is back",
                        state.describe(self.config.name),
                        state.floor >> 20,
                    )
                else:
                    log.info("disk space is back: %d MiB free in %s; taking jobs again", state.free >> 20, state.path)
            self._last_inventory = inv
            beat.inventory.CopyFrom(inv)
        return beat

    def _look(self, with_inventory: bool) -> common_pb2.Inventory | None:
        """(Worker thread) the inventory if due or if the disk became full or free again; else None."""
        if with_inventory:
            return self.inventory.collect()
        last = self._last_inventory
        if last is not None and self.disk.measure().full == last.disk_full:
            return None
        return self.inventory.collect()

    async def _handle(self, msg: agent_pb2.CoordinatorMessage) -> None:
        if msg.lease_ack:
            self.lease.acked(msg.lease_ack)
        for ack in msg.log_acks:
            self.outbox.ack_logs(ack.job_id, ack.seq)
        for uack in msg.update_acks:
            self.outbox.ack_update(uack.job_id, uack.status)
        for a in msg.assignments:
            if a.job_id in self.jobs:
                continue  # re-sent after a reconnect: already running
            # A job of ours that still holds one of its GPUs (an attempt the coordinator gave up on,
            # being aborted now) ends first: no GPU runs two jobs at once, whatever the coordinator says.
            gpus = set(a.gpu_indices)
            holders = [r for r in self.jobs.values() if gpus & set(r.a.gpu_indices) and r.task and not r.task.done()]
            runner = JobRunner(self.deps, a, after=holders)
            self.jobs[a.job_id] = runner
            runner.start().add_done_callback(self._forget_job(a.job_id))
        for order in msg.open_tunnels:
            self.tunnels.open(order)
        for stop in msg.stops:
            runner_ = self.jobs.get(stop.job_id)
            if runner_ is not None:
                task = asyncio.create_task(runner_.stop(stop.abort))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    # ---- self-fencing --------------------------------------------------------------------------
    async def _note_refusal(self) -> None:
        """After a failed try to start a session: if the port refuses, the coordinator is down now, which
        counts as a renewal (agent/lease.py). The watchdog only probes near the deadline; a coordinator
        that was down, then back while this agent waited out its reconnect backoff, would otherwise be
        counted from the last ack before it went down, and a healthy job stopped (seen in a CI chaos run)."""
        guard = self.lease
        if guard.remaining() is None or guard.policy.strict:
            return
        probed_at = guard.clock()
        if await refused(self.config.coordinator, PROBE_TIMEOUT_S):
            guard.coordinator_down(probed_at)
            log.info("the coordinator is down (its port refuses connections): jobs keep running")

    async def _fence_watch(self) -> None:
        """Stops every job once the lease runs out with no renewal acknowledged (agent/lease.py), unless a
        refused connection shows the coordinator is down. Runs for the agent's whole life, across sessions."""
        guard = self.lease
        while True:
            guard.changed.clear()
            left = guard.remaining()
            if left is None:  # no lease counted: nothing to stop for
                await guard.changed.wait()
                continue
            window = min(PROBE_WINDOW_S, guard.policy.after_s / 3)
            if left > window:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(guard.changed.wait(), left - window)
                continue
            if left > 0:
                if not guard.policy.strict:
                    probed_at = guard.clock()
                    if await refused(self.config.coordinator, max(0.05, min(PROBE_TIMEOUT_S, left))):
                        guard.coordinator_down(probed_at)
                        log.info("the coordinator is down (its port refuses connections): jobs keep running")
                        await asyncio.sleep(min(0.5, window))  # a down coordinator is asked again soon
                        continue
                left = guard.remaining() or 0.0
                if left > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(guard.changed.wait(), min(0.25, left))
                    continue
            self._fence(guard.policy.after_s)
            await guard.changed.wait()  # a renewal (the next session's hello ack) counts a lease again

    def _fence(self, after_s: float) -> None:
        running = [r for r in self.jobs.values() if not r.fenced and r.task is not None and not r.task.done()]
        if not running:
            return
        log.warning(
            "no lease renewal acknowledged by the coordinator for %.1fs: stopping %d job(s) (self-fence)",
            after_s,
            len(running),
        )
        message = (
            f"the agent had no lease renewal acknowledged by the coordinator for {after_s:g}s (cut off from it?)"
            " and stopped the job itself: the coordinator may run it again elsewhere, never beside this one"
        )
        for r in running:
            task = asyncio.create_task(r.fence(message))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def _forget_job(self, job_id: str) -> Callable[[asyncio.Task[None]], None]:
        def forget(_task: asyncio.Task[None]) -> None:
            self.jobs.pop(job_id, None)
            self.tunnels.job_ended(job_id, "the job ended")

        return forget

    async def close(self) -> None:
        for r in list(self.jobs.values()):
            if r.task is not None:
                r.task.cancel()
        await asyncio.gather(*(r.task for r in self.jobs.values() if r.task), return_exceptions=True)
        await self.tunnels.close()
        await self.runtime.close()
        await asyncio.to_thread(self.transfer.close)
        await self.channel.close()
        self._beat_pool.shutdown(wait=False)
