"""`dstack stop RUN`: asks the coordinator to stop a run, then says how it ended."""

from __future__ import annotations

import time

from dstack.cli.client import Client
from dstack.cli.render import run_status
from dstack.protos.v1 import client_pb2, common_pb2

FINISHED = frozenset({common_pb2.RUN_STATUS_DONE, common_pb2.RUN_STATUS_FAILED, common_pb2.RUN_STATUS_STOPPED})
POLL_S = 0.2


def stop_and_wait(client: Client, name: str, wait_s: float) -> tuple[client_pb2.Run, bool]:
    """Stops the run and waits up to wait_s for it to end; returns the run and whether it has ended."""
    run = client.stop_run(name)
    deadline = time.monotonic() + wait_s
    while run.status not in FINISHED and time.monotonic() < deadline:
        time.sleep(POLL_S)
        run = client.get_run(name)
    return run, run.status in FINISHED


def describe(run: client_pb2.Run, ended: bool) -> str:
    if ended:
        return f"{run.name}: {run_status(run.status)}"
    return f"{run.name}: stopping (stop requested; was {run_status(run.status)}); `dstack ps` shows when it has ended"


def stop_command(name: str, wait_s: float) -> int:
    from dstack.cli.session import connect

    run, ended = stop_and_wait(connect(), name, wait_s)
    print(describe(run, ended))
    return 0


def preempt_command(name: str) -> int:
    """`dstack stop --preempt RUN`: its interruptible jobs are stopped with their grace period, their
    artifacts saved, and requeued as new attempts (an admin's command)."""
    from dstack.cli.session import connect

    n, _ = connect().preempt_run(name)
    if n == 0:
        print(f"{name}: nothing to preempt (no interruptible job of it is on an agent)")
        return 1
    print(f"{name}: {n} job(s) preempted; each is requeued as a new attempt once its agent has saved it")
    return 0
