from agent.runtimes.base import AGENT_MARKER, JobProcess, Runtime, RuntimeError_, RuntimeJob
from agent.runtimes.host import HostRuntime
from agent.runtimes.null import NullRuntime


def make_runtime(name: str, stop_grace_s: float) -> Runtime:
    if name == "host":
        return HostRuntime(stop_grace_s)
    if name == "null":
        return NullRuntime()
    raise RuntimeError_(f"unknown runtime {name!r}: expected host or null")


__all__ = [
    "AGENT_MARKER",
    "HostRuntime",
    "JobProcess",
    "NullRuntime",
    "Runtime",
    "RuntimeError_",
    "RuntimeJob",
    "make_runtime",
]
