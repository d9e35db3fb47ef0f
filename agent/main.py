"""`python -m dstack.agent` / `dstack agent`."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import socket
import sys
import warnings
from pathlib import Path

from dstack.agent import jobuser
from dstack.agent.config import AgentConfig
from dstack.agent.connection import Agent, FatalAgentError, pin_ca
from dstack.agent.diskspace import DEFAULT_MIN_FREE, parse_min_free
from dstack.agent.envcache import DEFAULT_SIZE, parse_size
from dstack.agent.inventory import InventoryError, parse_simulated
from dstack.agent.outbox import OutboxBounds
from dstack.agent.ports import parse_range
from dstack.agent.runtimes import RUNTIMES, DockerOptions, RuntimeError_, resolve_runtime
from dstack.agent.runtimes.cgroups import DEFAULT_PIDS_LIMIT


def default_home() -> str:
    """DSTACK_AGENT_HOME, else `agent` in DSTACK_HOME (where the CLI keeps its state), else ~/.dstack/agent."""
    if home := os.environ.get("DSTACK_AGENT_HOME"):
        return home
    if dstack_home := os.environ.get("DSTACK_HOME"):
        return str(Path(dstack_home) / "agent")
    return "~/.dstack/agent"


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    d = DockerOptions()
    p = argparse.ArgumentParser(
        prog="dstack agent",
        description="Runs a dstack agent on this host.",
    )
    p.add_argument("--coordinator", required=True, help="the coordinator: HOST:PORT or unix:///path.sock")
    token = p.add_mutually_exclusive_group()
    token.add_argument(
        "--join-token-file",
        metavar="PATH",
        default=env("DSTACK_JOIN_TOKEN_FILE", ""),
        help="a file holding the join token, which registers the agent on its first start (STATE_DIR/join-token"
        " of `dstack server`; env DSTACK_JOIN_TOKEN_FILE, or the token itself in DSTACK_JOIN_TOKEN)",
    )
    token.add_argument(
        "--join-token",
        default=None,
        help="the join token itself: avoid it, as other users of this host see a command line"
        " (ps, /proc/PID/cmdline); use --join-token-file or DSTACK_JOIN_TOKEN",
    )
    tls = p.add_argument_group(
        "TLS (TCP only; a unix socket is plaintext)",
        "The agent speaks TLS to the coordinator and checks its certificate against the coordinator's CA.",
    )
    pin = tls.add_mutually_exclusive_group()
    pin.add_argument(
        "--ca-file",
        metavar="PATH",
        default="",
        help="the coordinator's CA certificate (its STATE_DIR/tls/ca.pem, or an admin's CA); env DSTACK_CA_FILE",
    )
    pin.add_argument(
        "--ca-fingerprint",
        metavar="SHA256:HEX",
        default="",
        help="the CA fingerprint `dstack server` prints: the CA is fetched with it once and pinned in HOME;"
        " env DSTACK_CA_FINGERPRINT",
    )
    pin.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext, for a coordinator started with --insecure: tokens, jobs and their secrets cross the"
        " network readable by anyone on the path",
    )
    p.add_argument(
        "--home",
        default=default_home(),
        help="the agent's state: credentials, code cache, job folders, Python environments"
        " (default: %(default)s, from DSTACK_AGENT_HOME, else $DSTACK_HOME/agent)",
    )
    p.add_argument(
        "--name", default=socket.gethostname(), help="the name `dstack agents` shows (default: this host's name)"
    )
    p.add_argument(
        "--runtime",
        default=env("DSTACK_RUNTIME", "auto"),
        choices=RUNTIMES,
        help="where jobs run: docker containers, host processes, or auto (docker when a Docker engine answers;"
        " default: %(default)s)",
    )
    p.add_argument("--docker-host", default=env("DSTACK_DOCKER_HOST", ""), help="Docker engine (default: DOCKER_HOST)")
    p.add_argument(
        "--docker-image-bash",
        default=env("DSTACK_DOCKER_IMAGE_BASH", d.bash_image),
        help="the image of jobs that name none and need no GPU (default: %(default)s)",
    )
    p.add_argument(
        "--docker-image-python",
        default=env("DSTACK_DOCKER_IMAGE_PYTHON", d.python_image),
        help="the python provider's image; {version} is the workflow's Python version (default: %(default)s)",
    )
    p.add_argument(
        "--docker-image-cuda",
        default=env("DSTACK_DOCKER_IMAGE_CUDA", d.cuda_image),
        help="the image of GPU jobs that name none (default: %(default)s)",
    )
    p.add_argument(
        "--docker-network",
        default=env("DSTACK_DOCKER_NETWORK", d.network),
        choices=["bridge", "host", "none"],
        help="bridge publishes ports HOST:CONTAINER; host shares the host's network (no mapping); default: %(default)s",
    )
    p.add_argument(
        "--simulate-gpus",
        default=env("DSTACK_SIMULATE_GPUS", ""),
        help="test/dev only: report simulated GPUs instead of NVML's, e.g. 8xA100-80GB",
    )
    p.add_argument(
        "--advertise-address",
        default=env("DSTACK_ADVERTISE_ADDRESS", ""),
        help="the address other agents reach this one at: a multi-node job's MASTER_ADDR when this agent runs"
        " its rank 0 (default: this host's source address towards the coordinator)",
    )
    p.add_argument("--max-jobs", type=int, default=64, help="how many jobs may run here at once (default: %(default)s)")
    p.add_argument(
        "--stop-grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL (default: %(default)s)"
    )
    p.add_argument(
        "--store-retry",
        type=float,
        default=300.0,
        help="seconds to keep retrying a job's transient coordinator or store failures (unreachable, 5xx)"
        " before the job fails; refusals (access denied, no such bucket) fail it at once (default: %(default)s)",
    )
    p.add_argument(
        "--mount-sync",
        type=float,
        default=10.0,
        help="seconds between saves of mount: true artifacts (default: %(default)s)",
    )
    p.add_argument(
        "--env-cache-size",
        default=env("DSTACK_ENV_CACHE_SIZE", DEFAULT_SIZE),
        help="bound of the cache of Python job environments (venvs of `requirements`) in HOME/envs,"
        " e.g. 20GiB or 500MB; least recently used ones not in use go first; 0: a fresh venv per job"
        " (default: %(default)s, from DSTACK_ENV_CACHE_SIZE)",
    )
    p.add_argument(
        "--pids-limit",
        type=int,
        default=env("DSTACK_PIDS_LIMIT", str(DEFAULT_PIDS_LIMIT)),  # a string: argparse checks it with `type`
        metavar="N",
        help="processes and threads each job may have at once (cgroup pids controller, Docker pids_limit),"
        " so a fork bomb cannot take the host's pid space: every DataLoader worker and thread counts;"
        " 0: no limit (default: 4096 or 32 per CPU core, whichever is more: %(default)s here;"
        " from DSTACK_PIDS_LIMIT)",
    )
    p.add_argument(
        "--job-user",
        default=env("DSTACK_JOB_USER", jobuser.DEFAULT),
        help="as root, host-runtime jobs run as this unprivileged user, who cannot read the agent's credential"
        " (deploy/install.sh creates it: `useradd --system --no-create-home --shell /usr/sbin/nologin"
        f" {jobuser.DEFAULT}`); {jobuser.NONE}: as the agent's own user (default: %(default)s, from DSTACK_JOB_USER)",
    )
    p.add_argument(
        "--job-ports",
        default=env("DSTACK_JOB_PORTS", ""),
        metavar="LO-HI",
        help="where jobs' `ports: N` are picked, e.g. 20000-20999 (ports your firewall lets through);"
        " default: any free port the kernel offers (from DSTACK_JOB_PORTS)",
    )
    p.add_argument(
        "--min-free-disk",
        default=env("DSTACK_MIN_FREE_DISK", ""),
        metavar="SIZE|PCT",
        help="free space the agent keeps in its work folders (job folders, code cache), e.g. 2GiB or 5%%; below it"
        " the agent is draining (disk full): no new job is placed on it until space is back, and a job whose"
        " preparation meets a full disk is requeued on another agent; 0: no floor"
        f" (default: {str(DEFAULT_MIN_FREE).replace('%', '%%')}; from DSTACK_MIN_FREE_DISK)",
    )
    out = p.add_argument_group(
        "outbox",
        "Log lines the coordinator has not acknowledged yet (it is away, or slower than a job prints) wait in"
        " memory, then on disk in HOME/outbox; once a job owes --max-job-outbox-bytes (or all jobs"
        " --max-outbox-bytes), the job's output is not read until the coordinator catches up: its writes block,"
        " no line is dropped. Sizes like 512MiB or 2GB.",
    )
    out.add_argument(
        "--outbox-memory",
        default=env("DSTACK_OUTBOX_MEMORY", "64MiB"),
        help="lines of all jobs kept in memory (each job at most a quarter); beyond it they spool to disk"
        " (default: %(default)s, from DSTACK_OUTBOX_MEMORY)",
    )
    out.add_argument(
        "--max-job-outbox-bytes",
        default=env("DSTACK_MAX_JOB_OUTBOX_BYTES", "1GiB"),
        help="lines one job may owe, memory and disk, before its output is paused"
        " (default: %(default)s, from DSTACK_MAX_JOB_OUTBOX_BYTES)",
    )
    out.add_argument(
        "--max-outbox-bytes",
        default=env("DSTACK_MAX_OUTBOX_BYTES", "4GiB"),
        help="lines all jobs may owe, memory and disk, before every job's output is paused"
        " (default: %(default)s, from DSTACK_MAX_OUTBOX_BYTES)",
    )
    return p


def outbox_bounds(p: argparse.ArgumentParser, a: argparse.Namespace) -> OutboxBounds:
    sizes: dict[str, int] = {}
    for option in ("outbox_memory", "max_job_outbox_bytes", "max_outbox_bytes"):
        flag = "--" + option.replace("_", "-")
        try:
            sizes[option] = parse_size(getattr(a, option))
        except ValueError as e:
            p.error(f"{flag}: {e}")
        if sizes[option] <= 0:
            p.error(f"{flag}: give a size above 0, e.g. 256MiB")
    memory = sizes["outbox_memory"]
    return OutboxBounds(
        memory_bytes=memory,
        job_memory_bytes=max(memory // 4, 1),
        job_bytes=sizes["max_job_outbox_bytes"],
        total_bytes=sizes["max_outbox_bytes"],
        inflight_bytes=min(OutboxBounds.inflight_bytes, max(memory // 4, 1)),
    )


ARGV_TOKEN_WARNING = (
    "dstack agent: warning: --join-token puts the token on the command line, where other users of this host"
    " see it (ps, /proc/PID/cmdline); use --join-token-file PATH or the DSTACK_JOIN_TOKEN environment variable"
)


def join_token(p: argparse.ArgumentParser, a: argparse.Namespace) -> str:
    """The join token: from --join-token (with a warning), --join-token-file or DSTACK_JOIN_TOKEN, in that order."""
    if a.join_token is not None:
        print(ARGV_TOKEN_WARNING, file=sys.stderr)
        return str(a.join_token).strip()
    if a.join_token_file:
        path = Path(a.join_token_file).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as e:
            p.error(f"--join-token-file {path}: {e.strerror}: give the file that holds the join token")
        if not token:
            p.error(f"--join-token-file {path} is empty: copy the token from the server's STATE_DIR/join-token")
        if path.stat().st_mode & 0o077:
            print(
                f"dstack agent: warning: {path} is readable by other users of this host: `chmod 600 {path}`",
                file=sys.stderr,
            )
        return token
    return os.environ.get("DSTACK_JOIN_TOKEN", "").strip()


def parse_args(argv: list[str] | None = None) -> AgentConfig:
    env = os.environ.get
    p = build_parser()
    a = p.parse_args(argv)
    token = join_token(p, a)
    if a.simulate_gpus:
        try:
            parse_simulated(a.simulate_gpus)
        except InventoryError as e:
            p.error(str(e))
    if a.advertise_address:
        from dstack.protos.addresses import valid_address

        if not valid_address(a.advertise_address):
            p.error(f"--advertise-address {a.advertise_address!r}: give an IP address or a host name")
    if a.pids_limit < 0:
        p.error(f"--pids-limit {a.pids_limit}: give a number of processes, or 0 for no limit")
    try:
        env_cache_max_bytes = parse_size(a.env_cache_size)
    except ValueError as e:
        p.error(f"--env-cache-size: {e}")
    try:
        job_ports = parse_range(a.job_ports) if a.job_ports else None
    except ValueError as e:
        p.error(f"--job-ports: {e}")
    try:
        min_free_disk = parse_min_free(a.min_free_disk) if a.min_free_disk else DEFAULT_MIN_FREE
    except ValueError as e:
        p.error(f"--min-free-disk: {e}")
    if not (a.insecure or a.ca_file or a.ca_fingerprint):  # an option given wins over the environment
        a.ca_file, a.ca_fingerprint = env("DSTACK_CA_FILE", ""), env("DSTACK_CA_FINGERPRINT", "")
        if a.ca_file and a.ca_fingerprint:
            p.error("DSTACK_CA_FILE and DSTACK_CA_FINGERPRINT are both set: keep one")
    return AgentConfig(
        coordinator=a.coordinator,
        ca_file=Path(a.ca_file).expanduser().resolve() if a.ca_file else None,
        ca_fingerprint=a.ca_fingerprint,
        insecure=a.insecure,
        home=Path(a.home).expanduser().resolve(),
        join_token=token,
        name=a.name,
        runtime=a.runtime,
        docker=DockerOptions(
            bash_image=a.docker_image_bash,
            python_image=a.docker_image_python,
            cuda_image=a.docker_image_cuda,
            network=a.docker_network,
            base_url=a.docker_host,
        ),
        simulate_gpus=a.simulate_gpus,
        max_jobs=a.max_jobs,
        advertise_address=a.advertise_address,
        stop_grace_s=a.stop_grace,
        mount_sync_s=a.mount_sync,
        store_retry_s=a.store_retry,
        env_cache_max_bytes=env_cache_max_bytes,
        job_user_name=a.job_user,
        pids_limit=a.pids_limit,
        job_ports=job_ports,
        outbox=outbox_bounds(p, a),
        min_free_disk=min_free_disk,
    )


INSECURE_WARNING = (
    "dstack agent: warning: --insecure: the agent's credential, its jobs and their secrets cross the network in"
    " plaintext, and nothing proves the server is your coordinator (one that answers in its place gets them all)"
)


async def run_agent(config: AgentConfig) -> None:
    if config.insecure and not config.coordinator.startswith("unix:"):
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopper = asyncio.create_task(stop.wait())
    # Before the agent starts: with --ca-fingerprint, the CA is fetched and pinned (or the agent stops).
    pinning = asyncio.create_task(pin_ca(config))
    await asyncio.wait({pinning, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if not pinning.done():
        pinning.cancel()
        await asyncio.gather(pinning, return_exceptions=True)
        return
    agent = Agent(pinning.result())  # raises FatalAgentError
    main = asyncio.create_task(agent.run())
    done, _ = await asyncio.wait({main, stopper}, return_when=asyncio.FIRST_COMPLETED)
    main.cancel()
    stopper.cancel()
    await agent.close()
    if main in done:
        main.result()  # raises FatalAgentError


def _use_pidfd_child_watcher() -> None:
    """Python 3.11 waits for each job process with a thread of its own; a pidfd needs no thread.

    (3.12 and later pick the pidfd watcher by themselves.)"""
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return  # kernel without pidfd support
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        asyncio.set_child_watcher(asyncio.PidfdChildWatcher())


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(
        level=os.environ.get("DSTACK_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    config = parse_args(argv)
    try:
        config = dataclasses.replace(config, runtime=resolve_runtime(config.runtime, config.docker))
        config = dataclasses.replace(config, job_user=jobuser.resolve(config.job_user_name, config.runtime))
    except (RuntimeError_, jobuser.JobUserError) as e:
        print(f"dstack agent: {e}", file=sys.stderr)
        sys.exit(2)
    if not config.advertise_address:
        from dstack.agent.address import detect

        config = dataclasses.replace(config, advertise_address=detect(config.coordinator))
    _use_pidfd_child_watcher()
    try:
        asyncio.run(run_agent(config))
    except FatalAgentError as e:
        print(f"dstack agent: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        pass
