"""While `dstack run` waits for its run to start: the run's state and the scheduler's reason, as `dstack ps` says.

On a terminal it is one line that updates in place; piped, a plain line each time the text changes. It ends
when the run starts (or ends), or when the first log line arrives, so it never mixes with the job's output.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from dstack.cli.client import Client
from dstack.cli.errors import CliError
from dstack.cli.render import run_status, waiting_text
from dstack.cli.term import Term
from dstack.protos.v1 import common_pb2

if TYPE_CHECKING:
    from rich.status import Status

POLL_S = 0.5
WAITING = frozenset({common_pb2.RUN_STATUS_SUBMITTED, common_pb2.RUN_STATUS_PENDING, common_pb2.RUN_STATUS_PULLING})


class WaitReporter:
    def __init__(self, client: Client, run_name: str, console: Term, poll_s: float = POLL_S) -> None:
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
                self.console.print(text)
                return
            # rich's spinner only on a terminal, and only once a run has waited: a run that starts at once never
            # imports rich (~30 ms of the CLI's start).
            from rich.text import Text  # a Text, so that a message is never read as markup

            if self._status is None:
                from rich.console import Console

                rich = Console(file=self.console.file, highlight=False, _environ=self.console.environ)
                self._status = rich.status(Text(text))
                self._status.start()
            else:
                self._status.update(Text(text))
