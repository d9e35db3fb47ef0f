import logging

from dstack.agent.envcache import EnvCache
from dstack.agent.jobuser import JobUser
from dstack.agent.runtimes.base import AGENT_MARKER, JobProcess, Runtime, RuntimeError_, RuntimeJob
from dstack.agent.runtimes.cgroups import DEFAULT_PIDS_LIMIT

# Not runtimes.docker: it imports the Docker SDK, which only a docker agent needs (docker_options.py).
from dstack.agent.runtimes.docker_options import DockerOptions, engine_address
from dstack.agent.runtimes.host import HostRuntime
from dstack.agent.runtimes.null import NullRuntime

log = logging.getLogger("dstack.agent")
RUNTIMES = ("auto", "docker", "host", "null")


def resolve_runtime(name: str, docker: DockerOptions) -> str:
    """`auto`: docker when a Docker engine answers (at --docker-host, DOCKER_HOST or the default socket), else host."""
    if name not in ("auto", "docker"):  # anything else, unknown names too, is make_runtime's to judge
        return name
    from dstack.agent.runtimes.docker import engine_version

    version = engine_version(docker.base_url)
    where = engine_address(docker.base_url)
    if version is not None:
        log.info("runtime: docker (Docker engine %s at %s)", version, where)
        return "docker"
    if name == "docker":
        raise RuntimeError_(f"--runtime docker: no Docker engine answers at {where} (set DOCKER_HOST?)")
    log.info("runtime: host processes (no Docker engine answers at %s)", where)
    return "host"


def make_runtime(
    name: str,
    stop_grace_s: float,
    docker: DockerOptions | None = None,
    agent_home: str = "",
    env_cache: EnvCache | None = None,
    pids_limit: int = DEFAULT_PIDS_LIMIT,
    job_user: JobUser | None = None,
) -> Runtime:
    if name == "host":
        return HostRuntime(stop_grace_s, agent_home, env_cache=env_cache, pids_limit=pids_limit, job_user=job_user)
    if name == "null":
        return NullRuntime()
    if name == "docker":
        from dstack.agent.runtimes.docker import DockerRuntime

        return DockerRuntime(stop_grace_s, docker, agent_home, env_cache, pids_limit)
    raise RuntimeError_(f"unknown runtime {name!r}: expected host, docker or null")


__all__ = [
    "AGENT_MARKER",
    "RUNTIMES",
    "DockerOptions",
    "HostRuntime",
    "JobProcess",
    "NullRuntime",
    "Runtime",
    "RuntimeError_",
    "RuntimeJob",
    "make_runtime",
    "resolve_runtime",
]
