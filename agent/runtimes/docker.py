"""Docker runtime: each job runs in its own container, through the Docker Engine API (the `docker` SDK).

The job's directory is bind-mounted at /workflow; the container gets the job's environment, its GPUs
(by UUID, through a device request: what `docker run --gpus '"device=UUID,..."'` does with the NVIDIA
container toolkit), `shm_size`, memory and CPU limits, and its ports. Every container carries the
label `dstack.agent-home=<agent home>`: a restarted agent finds and removes what its predecessor left.

Every SDK call blocks: each runs in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import posixpath
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import docker
import docker.errors
import requests
from docker.types import DeviceRequest
from docker.utils import parse_repository_tag

from dstack.agent.envcache import EnvCache, applies_to
from dstack.agent.provider_jobs import COMPAT_DIR, COMPAT_MOUNT, provider_env
from dstack.agent.runtimes.base import (
    LISTEN_VAR,
    LOOPBACK,
    REPORT_FILE,
    REPORT_VAR,
    JobProcess,
    Runtime,
    RuntimeError_,
    RuntimeJob,
    gpu_env,
    gpu_ids,
    working_subdir,
)
from dstack.agent.runtimes.cgroups import DEFAULT_PIDS_LIMIT, pids_events_of, pids_limit_hits, pids_limit_line
from dstack.agent.runtimes.docker_options import DockerOptions as DockerOptions  # re-exported: callers import it here
from dstack.agent.runtimes.docker_options import engine_address
from dstack.protos.container_paths import CODE_MOUNT, check_container_path
from dstack.protos.v1 import common_pb2

log = logging.getLogger("dstack.agent")

LABEL_HOME = "dstack.agent-home"
LABEL_JOB = "dstack.job-id"
MOUNT = CODE_MOUNT  # where the job's directory is inside the container
# Runs the job's script with bash where the image has it, else with sh (busybox, alpine).
_SHELL = 'if command -v bash >/dev/null 2>&1; then exec bash -c "$1"; else exec sh -c "$1"; fi'
PULL_PROGRESS_EVERY_S = 2.0
PIDS_POLL_S = 1.0  # how often a running container's pids.events is read (one small file)
ENGINE_RETRY_S = 60.0  # how long a running job waits for a restarting Docker engine to answer again
# What these SDK calls raise when the engine is away or refuses: both mean "the job cannot go on here".
EngineErrors = (docker.errors.DockerException, requests.exceptions.RequestException)
OutputStream = Iterator[tuple[bytes | None, bytes | None]]  # (stdout, stderr) chunks, one of them None


T = TypeVar("T")


async def in_own_thread(fn: Callable[[], T]) -> T:
    """Runs a call that may block for long (waiting for a container, a pull, a stop with its grace
    period) in a thread of its own: in asyncio's default pool, eight of them would starve every
    other worker-thread call of the agent (the pool has min(32, CPUs + 4) threads)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(value: Any, error: BaseException | None) -> None:
        if fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(value)

    def run() -> None:
        try:
            value = fn()
        except BaseException as e:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(settle, None, e)
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, value, None)

    threading.Thread(target=run, name="docker-call", daemon=True).start()
    return await fut


def make_client(base_url: str = "", timeout: float | None = 60, version: str | None = None) -> docker.DockerClient:
    """Without `version`, the SDK asks the engine for it: one blocking round trip per client."""
    if base_url:
        return docker.DockerClient(
            base_url=base_url,
            timeout=timeout,  # type: ignore[arg-type]
            max_pool_size=64,
            version=version,
        )
    return docker.from_env(timeout=timeout, max_pool_size=64, version=version)  # type: ignore[arg-type]


def engine_version(base_url: str = "", timeout: float = 3.0) -> str | None:
    """The engine's version if a Docker engine answers at base_url (or DOCKER_HOST, or the default socket)."""
    try:
        client = make_client(base_url, timeout)
        try:
            return str(client.version().get("Version", "?"))
        finally:
            client.close()
    except EngineErrors:
        return None


# Providers whose jobs need a Python without naming a version: the agent's Python image by default.
PYTHON_PROVIDERS = frozenset({"python", "lab", "notebook"})


def pick_image(job: RuntimeJob, opts: DockerOptions) -> str:
    """The workflow's `image`, else the agent's image for the provider (python: by version; GPU jobs: CUDA)."""
    if job.image:
        return job.image
    if job.provider in PYTHON_PROVIDERS or job.python_version:
        return opts.python_image.format(version=job.python_version or "3.11")
    if job.gpu_indices:
        return opts.cuda_image
    return opts.bash_image


def listen_address(opts: DockerOptions) -> str:
    """On a bridge network the container has interfaces of its own, and the host reaches a server in it
    only through them (a published port, or the container's address), never through the container's
    loopback; with the host's network, the host's loopback is the container's."""
    return "0.0.0.0" if opts.network == "bridge" else LOOPBACK


def _script(commands: list[str]) -> str:
    return "set -e\n" + "\n".join(commands) + "\n"


def container_config(
    job: RuntimeJob,
    opts: DockerOptions,
    image: str,
    agent_home: str,
    env_cache: EnvCache | None = None,
    image_id: str = "",
    pids_limit: int = 0,
) -> dict[str, Any]:
    """The arguments of `containers.create` for a job (pure: unit-tested without an engine)."""
    rel = working_subdir(job)
    env = dict(job.env) | gpu_env(job)
    volumes = {str(job.workdir): {"bind": MOUNT, "mode": "rw"}}
    for host, path in job.mounts:  # absolute artifact paths: the job's own folders (agent/artifacts.py)
        volumes[host] = {"bind": check_container_path(path), "mode": "rw"}
    if env_cache is not None and applies_to(job.provider):
        # The cache at the same path in every container (venvs are not relocatable), the helper read-only.
        env |= env_cache.container_env(image_id)
        env[REPORT_VAR] = f"{MOUNT}/{REPORT_FILE}"
        volumes |= env_cache.container_volumes()
    if job.provider_program:  # the compat `dstack` the program imports, read-only (agent/provider_jobs.py)
        env = provider_env(env, MOUNT, COMPAT_MOUNT)
        volumes[str(COMPAT_DIR)] = {"bind": COMPAT_MOUNT, "mode": "ro"}
    device_requests = None
    if job.gpu_indices:
        ids = gpu_ids(job)
        env["NVIDIA_VISIBLE_DEVICES"] = ",".join(ids)
        if not job.gpus_simulated:
            # Inside the container only these GPUs exist; CUDA_VISIBLE_DEVICES by UUID still names them.
            device_requests = [DeviceRequest(device_ids=ids, capabilities=[["gpu"]])]
    else:
        env["NVIDIA_VISIBLE_DEVICES"] = "void"  # a CUDA image's default `all` must not expose the host's GPUs
    ports: dict[str, int | tuple[str, int]] | None = None
    if job.ports:
        if opts.network == "bridge":
            # An app's port (its token is readable by the whole team) only on the host's loopback, where the
            # agent's tunnel connects; other ports on every interface, as `ports` always published them.
            ports = {
                f"{container}/tcp": (LOOPBACK, host) if container in job.loopback_ports else host
                for host, container in job.ports
            }
        elif opts.network == "host":
            moved = [f"{h}:{c}" for h, c in job.ports if h != c]
            if moved:
                raise RuntimeError_(
                    f"ports {', '.join(moved)}: this agent's containers use the host network, where a port"
                    " cannot be mapped to another; use PORT, or run the agent with --docker-network bridge"
                )
        else:
            raise RuntimeError_(
                f"this agent's containers have no network (--docker-network {opts.network}): ports cannot be served"
            )
    config: dict[str, Any] = {
        "image": image,
        "name": f"dstack-{job.job_id}",
        "labels": {LABEL_HOME: agent_home, LABEL_JOB: job.job_id},
        "environment": env,
        "working_dir": posixpath.normpath(posixpath.join(MOUNT, rel)),
        "volumes": volumes,
        "network_mode": opts.network,
        "ports": ports,
        "init": True,  # docker-init (tini) as PID 1 passes SIGTERM on to the job's shell
        "detach": True,
        "stdin_open": False,
        "tty": False,
        "device_requests": device_requests,
        "mem_limit": job.memory_bytes or None,
        "memswap_limit": job.memory_bytes or None,  # no swap beyond the limit
        "nano_cpus": int(job.cpu * 1e9) or None,
        "shm_size": job.shm_size_bytes or None,
        # A fork bomb fails its forks instead of taking the host's pid space (and the agent) with it.
        "pids_limit": pids_limit or None,
    }
    if job.commands:
        config["entrypoint"] = ["/bin/sh", "-c", _SHELL, "dstack-job", _script(job.commands)]
        config["command"] = []
    # else: the image's own entrypoint and command (the docker provider without `commands`)
    uid, gid = os.getuid(), os.getgid()
    if uid != 0:  # files the job writes into its directory stay the agent's, so it can remove them
        config["user"] = f"{uid}:{gid}"
        env.setdefault("HOME", "/tmp")
    return {k: v for k, v in config.items() if v is not None}


class _PullProgress:
    """Turns the engine's pull events into a few log lines: one per phase, and a total every 2 s."""

    def __init__(self, image: str, emit: Callable[[str], None]) -> None:
        self.image = image
        self.emit = emit
        self.layers: dict[str, tuple[int, int]] = {}  # layer id -> (downloaded, total)
        self.done: set[str] = set()
        self.last = 0.0

    def feed(self, event: dict[str, Any]) -> None:
        if "error" in event:
            raise RuntimeError_(f"cannot pull image {self.image!r}: {event['error']}")
        status, layer = str(event.get("status", "")), str(event.get("id", ""))
        detail = event.get("progressDetail") or {}
        if status == "Downloading" and layer and detail.get("total"):
            self.layers[layer] = (int(detail.get("current", 0)), int(detail["total"]))
        elif status in ("Download complete", "Pull complete", "Already exists") and layer:
            self.done.add(layer)
            total = self.layers.get(layer, (0, 0))[1]
            self.layers[layer] = (total, total)
        elif not layer or status.startswith(("Digest", "Status", "Pulling from")):
            self.emit(f"dstack: pulling {self.image}: {status}")
        now = time.monotonic()
        if self.layers and now - self.last >= PULL_PROGRESS_EVERY_S:
            self.last = now
            got_mb = sum(c for c, _ in self.layers.values()) / 1e6
            size_mb = sum(t for _, t in self.layers.values()) / 1e6
            self.emit(
                f"dstack: pulling {self.image}: {len(self.done)}/{len(self.layers)} layers,"
                f" {got_mb:.1f}/{size_mb:.1f} MB"
            )


class DockerProcess(JobProcess):
    def __init__(
        self,
        runtime: DockerRuntime,
        container_id: str,
        stream: OutputStream,
        job: RuntimeJob,
        image_facts: dict[str, Any] | None = None,
    ) -> None:
        self.rt = runtime
        self._facts = image_facts or {}
        self.cid = container_id
        self.stream = stream  # attached before the container started: no output is missed
        self.job = job
        self.exit_note = ""
        self.lost = ""
        self._stopping = False
        self._closed = threading.Event()
        self._pids_watch: asyncio.Task[None] | None = None
        if runtime.pids_limit:
            self._pids_watch = asyncio.create_task(self._watch_pids())

    def facts(self) -> dict[str, Any]:
        return dict(self._facts)

    async def _watch_pids(self) -> None:
        """Says in the job's log when its forks fail on the pids limit. The engine removes the container's
        group as it ends, so its pids.events is read while it runs."""
        try:
            state = (await asyncio.to_thread(self.rt.client.api.inspect_container, self.cid)).get("State", {})
            events = await asyncio.to_thread(pids_events_of, int(state.get("Pid") or 0), self.cid)
        except (*EngineErrors, ValueError):
            return
        if events is None or not state.get("Pid"):
            return
        while True:
            await asyncio.sleep(PIDS_POLL_S)
            if hits := await asyncio.to_thread(pids_limit_hits, events):
                self.job.system_line(pids_limit_line(self.rt.pids_limit, hits))
                self.exit_note = self.exit_note or f"it hit its pids limit ({self.rt.pids_limit})"
                return
            if not await asyncio.to_thread(events.exists):
                return  # the container ended

    async def output(self) -> AsyncIterator[tuple[int, bytes]]:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[tuple[int, bytes] | None] = asyncio.Queue(maxsize=64)

        def put(item: tuple[int, bytes] | None) -> bool:
            if self._closed.is_set():
                return False
            try:
                # Blocks while the queue is full: backpressure from the outbox down to the engine.
                asyncio.run_coroutine_threadsafe(q.put(item), loop).result()
            except Exception:  # the loop is closing
                return False
            return True

        def pump() -> None:
            try:
                for out, err in self.stream:
                    if out and not put((common_pb2.LOG_STREAM_STDOUT, out)):
                        return
                    if err and not put((common_pb2.LOG_STREAM_STDERR, err)):
                        return
            except (OSError, *EngineErrors) as e:
                log.warning("job %s: the container's output stream broke: %s", self.job.job_id, e)
            finally:
                put(None)

        thread = threading.Thread(target=pump, name=f"attach-{self.job.job_id}", daemon=True)
        thread.start()
        try:
            while (item := await q.get()) is not None:
                yield item
        finally:
            self._closed.set()
            with contextlib.suppress(asyncio.QueueEmpty):  # unblock a pump waiting on a full queue
                while True:
                    q.get_nowait()

    async def wait(self) -> int:
        api = self.rt.client.api
        while True:
            try:
                result = await in_own_thread(lambda: api.wait(self.cid, timeout=None))
                break
            except docker.errors.NotFound:
                self.lost = "the job's container disappeared (removed outside dstack?)"
                return -9
            except EngineErrors as e:
                # The engine went away (restart, crash): wait for it, then look at the container again
                # (with live-restore the container is still running).
                log.warning("job %s: lost the Docker engine (%s); waiting for it", self.job.job_id, e)
                self.job.system_line("dstack: lost the Docker engine; waiting for it to answer again")
                if not await self.rt.wait_for_engine(ENGINE_RETRY_S):
                    self.lost = f"the Docker engine at {self.rt.address} stopped answering while the job ran"
                    return -9
        code = int(result.get("StatusCode", -1))
        if code != 0 and not self._stopping and not await self.rt.answers():
            # An engine shutting down closes its API first, then stops every container: that is
            # why this one ended, not the job itself.
            self.lost = f"the Docker engine at {self.rt.address} stopped while the job ran (it stopped the container)"
            return code
        try:
            state = (await asyncio.to_thread(api.inspect_container, self.cid)).get("State", {})
            if state.get("OOMKilled"):
                limit = self.job.memory_bytes
                self.exit_note = "out of memory" + (f": the limit is {limit / (1 << 20):.0f} MiB" if limit else "")
        except EngineErrors:
            pass
        return code

    async def stop(self, abort: bool) -> None:
        self._stopping = True
        api = self.rt.client.api
        try:
            if abort:
                await asyncio.to_thread(api.kill, self.cid)
            else:  # SIGTERM, then SIGKILL after the grace period: the engine does both
                grace = max(1, round(self.rt.stop_grace_s))
                await in_own_thread(lambda: api.stop(self.cid, timeout=grace))
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as e:
            if e.status_code != 409:  # 409: not running any more
                log.warning("job %s: stopping its container failed: %s", self.job.job_id, e)
        except EngineErrors as e:
            log.warning("job %s: stopping its container failed: %s", self.job.job_id, e)

    async def cleanup(self) -> None:
        self._closed.set()
        if self._pids_watch is not None:
            self._pids_watch.cancel()
        await self.rt.remove(self.cid)


class DockerRuntime(Runtime):
    name = "docker"

    def __init__(
        self,
        stop_grace_s: float,
        options: DockerOptions | None = None,
        agent_home: str = "",
        env_cache: EnvCache | None = None,
        pids_limit: int = DEFAULT_PIDS_LIMIT,
    ) -> None:
        self.stop_grace_s = stop_grace_s
        self.pids_limit = pids_limit
        self.env_cache = env_cache
        self.opts = options or DockerOptions()
        self.agent_home = agent_home
        self.address = engine_address(self.opts.base_url)
        self.client = make_client(self.opts.base_url)
        # Output streams wait for as long as a job is silent: no read timeout on their connection.
        self.stream_api = make_client(self.opts.base_url, timeout=None, version=self.client.api.api_version).api
        self._pulls: dict[str, asyncio.Future[None]] = {}
        self._background: set[asyncio.Task[None]] = set()

    def published_ports(self, ports: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """On the bridge network as published (HOST:CONTAINER); on the host network the container's
        ports are the host's (container_config refuses a remapping there)."""
        if self.opts.network == "bridge":
            return list(ports)
        return super().published_ports(ports)

    def base_env(self, host_env: dict[str, str]) -> dict[str, str]:
        # The image's own PATH, HOME and user apply inside the container, not the agent host's.
        env = {k: v for k, v in host_env.items() if k not in ("PATH", "HOME", "USER", "LOGNAME")}
        return env | {LISTEN_VAR: listen_address(self.opts)}

    async def answers(self) -> bool:
        try:
            await asyncio.to_thread(self.client.ping)
            return True
        except EngineErrors:
            return False

    async def wait_for_engine(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if await self.answers():
                return True
            await asyncio.sleep(0.5)
        return False

    async def start(self, job: RuntimeJob) -> JobProcess:
        image = pick_image(job, self.opts)
        container_config(job, self.opts, image, self.agent_home)  # a job this agent cannot run fails before a pull
        try:
            image_id = await self._ensure_image(image, job)
            config = container_config(job, self.opts, image, self.agent_home, self.env_cache, image_id, self.pids_limit)
            cid, stream = await asyncio.to_thread(self._create_and_start, config)
        except RuntimeError_:
            raise
        except docker.errors.APIError as e:
            raise RuntimeError_(f"cannot start the container: {e.explanation or e}") from e
        except EngineErrors as e:
            raise RuntimeError_(f"the Docker engine at {self.address} does not answer: {e}") from e
        log.info("job %s: container %s (%s)", job.job_id, cid[:12], image)
        return DockerProcess(self, cid, stream, job, await asyncio.to_thread(self._image_facts, image, image_id))

    def _image_facts(self, image: str, image_id: str) -> dict[str, Any]:
        """The image the job ran, for the run's record: its ID, its repository digests, its OS."""
        facts: dict[str, Any] = {"image": image, "image_id": image_id}
        try:
            attrs = self.client.images.get(image_id or image).attrs
        except EngineErrors:
            return facts
        facts["image_digests"] = list(attrs.get("RepoDigests") or [])
        facts["os"] = "/".join(str(attrs[k]) for k in ("Os", "Architecture") if attrs.get(k))
        return facts

    def _create_and_start(self, config: dict[str, Any]) -> tuple[str, OutputStream]:
        try:
            container = self.client.containers.create(**config)
        except docker.errors.APIError as e:
            if e.status_code != 409:  # 409: a container of that name is left from an earlier try
                raise
            self.client.api.remove_container(config["name"], force=True)
            container = self.client.containers.create(**config)
        try:
            # Attached before it starts: a job that ends at once still has all its output read.
            cid = str(container.id)
            stream: OutputStream = self.stream_api.attach(
                cid, stdout=True, stderr=True, stream=True, logs=False, demux=True
            )
            container.start()
        except Exception:
            with contextlib.suppress(*EngineErrors):
                container.remove(force=True)
            raise
        return cid, stream

    async def _ensure_image(self, image: str, job: RuntimeJob) -> str:
        """Pulls the image if it is missing; returns its id."""
        try:
            return str((await asyncio.to_thread(self.client.images.get, image)).id)
        except docker.errors.ImageNotFound:
            pass
        job.on_pulling()
        job.system_line(f"dstack: pulling image {image}")
        pending = self._pulls.get(image)
        if pending is None:  # jobs that need the same image share one pull
            pending = self._pulls[image] = asyncio.ensure_future(self._pull(image, job.system_line))
            pending.add_done_callback(lambda _f: self._pulls.pop(image, None))
        await asyncio.shield(pending)
        job.system_line(f"dstack: pulled image {image}")
        return str((await asyncio.to_thread(self.client.images.get, image)).id)

    async def _pull(self, image: str, emit: Callable[[str], None]) -> None:
        loop = asyncio.get_running_loop()

        def emit_threadsafe(text: str) -> None:
            loop.call_soon_threadsafe(emit, text)

        progress = _PullProgress(image, emit_threadsafe)
        repo, tag = parse_repository_tag(image)

        def pull() -> None:
            for event in self.client.api.pull(repo, tag=tag or "latest", stream=True, decode=True):
                progress.feed(event)

        try:
            await in_own_thread(pull)
        except docker.errors.APIError as e:
            raise RuntimeError_(f"cannot pull image {image!r}: {e.explanation or e}") from e

    async def remove(self, cid: str) -> None:
        try:
            await asyncio.to_thread(self.client.api.remove_container, cid, force=True, v=True)
        except docker.errors.NotFound:
            pass
        except EngineErrors as e:
            # The engine is away: remove it once it answers again, without holding up the job's report
            # (and if it never does, the next agent start removes it: it carries our label).
            log.warning("removing container %s failed (will retry): %s", cid[:12], e)
            task = asyncio.create_task(self._remove_later(cid))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _remove_later(self, cid: str) -> None:
        if await self.wait_for_engine(ENGINE_RETRY_S):
            with contextlib.suppress(*EngineErrors):
                await asyncio.to_thread(self.client.api.remove_container, cid, force=True, v=True)

    async def cleanup_leftovers(self, agent_home: str) -> None:
        """Containers of a previous run of this agent (same home) are removed: the coordinator fails their jobs."""
        try:
            # ignore_removed: a container that goes away between the listing and its inspection is no error.
            left = await asyncio.to_thread(
                self.client.containers.list,
                all=True,
                ignore_removed=True,
                filters={"label": f"{LABEL_HOME}={agent_home}"},
            )
        except EngineErrors as e:
            log.warning("cannot list containers left by a previous agent run: %s", e)
            return
        for c in left:
            await self.remove(str(c.id))
        if left:
            log.warning("removed %d container(s) left by jobs of a previous agent run", len(left))
