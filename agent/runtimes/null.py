"""A runtime that runs nothing and exits 0 at once: for benchmarks of the control plane."""

from __future__ import annotations

from collections.abc import AsyncIterator

from dstack.agent.runtimes.base import JobProcess, Runtime, RuntimeJob


class _Done(JobProcess):
    async def output(self) -> AsyncIterator[tuple[int, bytes]]:
        return
        yield

    async def wait(self) -> int:
        return 0

    async def stop(self, abort: bool) -> None:
        return None


class NullRuntime(Runtime):
    name = "null"

    async def start(self, job: RuntimeJob) -> JobProcess:
        return _Done()
