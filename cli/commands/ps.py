"""`dstack ps`: runs as a table, or JSON."""

from __future__ import annotations

import json
import sys

from dstack.cli.render import ago, run_status, run_to_json

STYLE = {
    "done": "green",
    "failed": "red",
    "stopped": "yellow",
    "running": "cyan",
    "uploading": "cyan",
    "pulling": "cyan",
}


def ps_command(show_all: bool, as_json: bool) -> None:
    from dstack.cli.session import connect

    runs = connect().list_runs(show_all)
    if as_json:
        json.dump([run_to_json(r) for r in runs], sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for col in ("RUN", "WORKFLOW", "STATUS", "SUBMITTED", "TAGS", "MESSAGE"):
        table.add_column(col, overflow="fold")
    for r in runs:
        status = run_status(r.status)
        table.add_row(
            r.name,
            r.workflow,
            f"[{STYLE.get(status, 'white')}]{status}[/]",
            ago(r.submitted_at_ns),
            ", ".join(r.tags),
            r.message,
        )
    Console().print(table)
