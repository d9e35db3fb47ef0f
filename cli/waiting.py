"""While `dstack run` waits for its run to start: the run's state and the scheduler's reason, as `dstack ps` says.

On a terminal it is one line that updates in place; piped, a plain line each time the text changes. It ends
when the run starts (or ends), or when the first log line arrives, so it never mixes with the job's output.
"""

from __future__ import annotations

import threading

from rich.console import Console
from rich.status import Status

from dstack.cli.client import Client
from dstack.cli.errors import CliError
from dstack.cli.render import run_status, waiting_text
from dstack.protos.v1 import common_pb2

POLL_S = 0.5
WAITING = frozenset({common_pb2.RUN_STATUS_SUBMITTED, common_pb2.RUN_STATUS_PENDING, common_pb2.RUN_STATUS_PULLING})


class WaitReporter:
    def __init__(self, client: Client, run_name: str, console: Console, poll_s: float = POLL_S) -> None:
        self.client = client
        self.run_name = run_name
        self.console = console
        self.poll_s = poll_s
        self._done = threading.Event()
        self._lock = threading.Lock()  # the line is cleared once, and never printed after that
        self._status: Status | None = None
        self._thread = threading.Thread(target=self._watch, name="dstack-wait", daemon=True)

    def start(self) -> WaitReporter:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Idempotent; called before the first log line is printed and when the run ends."""
        with self._lock:
            if self._done.is_set():
                return
            self._done.set()
            if self._status is not None:
                self._status.stop()

    def _watch(self) -> None:
        shown = ""
        while not self._done.wait(self.poll_s):
            try:
                run = self.client.get_run(self.run_name)
            except CliError:
                continue  # the log stream reports a coordinator that went away; this line only informs
            if run.status not in WAITING:
                self.stop()
                return
            text = f"{self.run_name}: {waiting_text(run_status(run.status), run.message)}"
            if text != shown:
                self._show(text)
                shown = text

    def _show(self, text: str) -> None:
        with self._lock:
            if self._done.is_set():
                return
            if not self.console.is_terminal:
                self.console.print(text, markup=False)
            elif self._status is None:
                self._status = self.console.status(text)
                self._status.start()
            else:
                self._status.update(text)
