"""`dstack port-forward RUN [LOCAL:]REMOTE`, `dstack attach RUN`, and the tunnels `dstack run` opens.

Each waits for the run's job to run, listens on 127.0.0.1 (cli/tunnel.py), prints the local URLs,
and closes the tunnels, saying so, when the run ends or on Ctrl-C.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from dstack.cli.client import Client
from dstack.cli.errors import AuthError, CliError, RequestRejected
from dstack.cli.term import Term
from dstack.cli.tunnel import (
    Forward,
    Forwarder,
    PortSpec,
    describe,
    expected_ports,
    open_run_tunnels,
    run_ports,
)
from dstack.protos.v1 import client_pb2, common_pb2

FINISHED = (common_pb2.RUN_STATUS_DONE, common_pb2.RUN_STATUS_FAILED, common_pb2.RUN_STATUS_STOPPED)
POLL_S = 1.0


def _status(run: client_pb2.Run) -> str:
    return str(common_pb2.RunStatus.Name(run.status)).removeprefix("RUN_STATUS_").lower()


def check_may_tunnel(client: Client, run: client_pb2.Run) -> None:
    """The coordinator refuses others' tunnels; this says so before anything listens."""
    me = client.info()
    if me.role != "admin" and run.owner != me.user:
        raise AuthError(
            f"only the owner ({run.owner}) or an admin can open a tunnel into run {run.name}; you are {me.user}"
        )


def wait_running(
    client: Client, name: str, ready: Callable[[client_pb2.Run], bool], err: Term | None
) -> client_pb2.Run:
    """The run once `ready` says so; an error if it finished first."""
    said = False
    while True:
        run = client.get_run(name)
        if ready(run):
            return run
        if run.status in FINISHED:
            raise RequestRejected(f"run {name} is {_status(run)}: there is nothing to connect to")
        if err is not None and not said:
            err.print((f"waiting for run {name} to start ({_status(run)})", "dim"))
            said = True
        time.sleep(POLL_S)


def _serving(port: int, job_name: str) -> Callable[[client_pb2.Run], bool]:
    def ready(run: client_pb2.Run) -> bool:
        return any(
            j.status == common_pb2.JOB_STATUS_RUNNING and p.container_port == port and job_name in ("", j.job_name)
            for j, p in run_ports(run)
        )

    return ready


def _any_running_port(run: client_pb2.Run) -> bool:
    return any(j.status == common_pb2.JOB_STATUS_RUNNING for j, _ in run_ports(run))


def _until_finished(client: Client, name: str) -> client_pb2.Run:
    while True:
        run = client.get_run(name)
        if run.status in FINISHED:
            return run
        time.sleep(POLL_S)


def _error_printer(err: Term) -> Callable[[str], None]:
    return lambda message: err.print((f"tunnel: {message}", "yellow"))


def port_forward_command(name: str, spec_text: str, job_name: str) -> int:
    from dstack.cli.session import connect

    err = Term(stderr=True)
    spec = PortSpec.parse(spec_text)
    client = connect()
    run = client.get_run(name)
    declared = sorted({p.container_port for j, p in run_ports(run) if job_name in ("", j.job_name)})
    if spec.remote not in declared:
        shown = ", ".join(map(str, declared)) or "none"
        raise RequestRejected(
            f"port {spec.remote} is not one of the ports run {name} declares ({shown}): add it to the workflow's"
            " `ports` to reach it"
        )
    check_may_tunnel(client, run)
    wait_running(client, name, _serving(spec.remote, job_name), err)
    forwarder = Forwarder(client.endpoint, _error_printer(err))
    try:
        local = forwarder.forward(name, job_name, spec.remote, spec.local)
        err.print(f"forwarding http://127.0.0.1:{local}/ to port {spec.remote} of run {name} (Ctrl-C to stop)")
        final = _until_finished(client, name)
        err.print((f"run {name} is {_status(final)}: the tunnel is closed", "yellow"))
        return 0
    except KeyboardInterrupt:
        err.print("\ntunnel closed")
        return 130
    finally:
        forwarder.close()


def attach_command(name: str) -> int:
    from dstack.cli.commands.logs import print_logs
    from dstack.cli.render import run_summary
    from dstack.cli.session import connect

    err = Term(stderr=True)
    client = connect()
    run = client.get_run(name)
    if not expected_ports(run):
        raise RequestRejected(f"run {name} declares no ports: there is nothing to attach to (`dstack logs {name} -f`)")
    check_may_tunnel(client, run)
    run = wait_running(client, name, _any_running_port, err)
    forwarder = Forwarder(client.endpoint, _error_printer(err))
    try:
        forwards = open_run_tunnels(forwarder, run)
        print_forwards(err, forwards, len(run.jobs) > 1)
        final = print_logs(client, run, follow=True) or client.get_run(name)
        err.print((f"run {name} is {_status(final)}: the tunnels are closed", "yellow"))
        err.print(run_summary(final))
        return 0 if final.status == common_pb2.RUN_STATUS_DONE else 1
    except KeyboardInterrupt:
        err.print(f"\ntunnels closed; the run goes on: `dstack attach {name}` to open them again")
        return 130
    finally:
        forwarder.close()


def print_forwards(err: Term, forwards: list[Forward], several_jobs: bool) -> None:
    for f in forwards:
        err.print(("tunnel ", "dim"), (describe(f, several_jobs), "bold"))


class RunTunnels:
    """`dstack run`'s tunnels: opened, with their URLs printed, once the run's jobs with ports run;
    closed when the run ends (`close`)."""

    def __init__(self, client: Client, run: client_pb2.Run, err: Term, before_output: Callable[[], None]) -> None:
        self.client = client
        self.name = run.name
        self.err = err
        self.before_output = before_output
        self.forwarder: Forwarder | None = None
        self.opened: set[tuple[str, int]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="dstack-run-tunnels", daemon=True)

    def start(self) -> RunTunnels:
        self._thread.start()
        return self

    def _watch(self) -> None:
        try:
            while not self._stop.is_set():
                run = self.client.get_run(self.name)
                if run.status in FINISHED:
                    return
                fresh = [
                    (j, p)
                    for j, p in run_ports(run)
                    if j.status == common_pb2.JOB_STATUS_RUNNING and (j.job_name, p.container_port) not in self.opened
                ]
                if fresh:
                    self._open(run, fresh)
                    if len(self.opened) >= expected_ports(run):
                        return
                self._stop.wait(POLL_S)
        except CliError as e:
            self.err.print((f"tunnel: {e}", "yellow"))

    def _open(self, run: client_pb2.Run, fresh: list[tuple[client_pb2.Job, common_pb2.PortSpec]]) -> None:
        if self.forwarder is None:
            self.forwarder = Forwarder(self.client.endpoint, _error_printer(self.err))
        forwards = []
        for job, port in fresh:
            remote = port.container_port
            local = self.forwarder.forward(run.name, job.job_name, remote)
            self.opened.add((job.job_name, remote))
            forwards.append(Forward(run.name, job.job_name, remote, local, port.app, port.url_path))
        self.before_output()
        print_forwards(self.err, forwards, len(run.jobs) > 1)

    def close(self, final: client_pb2.Run | None) -> None:
        self._stop.set()
        self._thread.join(5)
        if self.forwarder is not None:
            self.forwarder.close()
            if final is not None:
                self.err.print((f"run {self.name} is {_status(final)}: the tunnels are closed", "yellow"))
            else:
                self.err.print(("the tunnels are closed", "yellow"))
