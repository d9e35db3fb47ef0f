"""`dstack tags list`."""

from __future__ import annotations

import json
import sys

from dstack.cli.render import ago, iso


def list_command(as_json: bool) -> None:
    from dstack.cli.session import connect

    tags = connect().list_tags()
    if as_json:
        out = [
            {"name": t.name, "run": t.run_name, "workflow": t.workflow, "created_at": iso(t.created_at_ns)}
            for t in tags
        ]
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for col in ("TAG", "RUN", "WORKFLOW", "CREATED"):
        table.add_column(col)
    for t in tags:
        table.add_row(t.name, t.run_name, t.workflow, ago(t.created_at_ns))
    Console().print(table)
