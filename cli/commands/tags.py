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
    from dstack.cli.term import Term

    rows = [[t.name, t.run_name, t.workflow, ago(t.created_at_ns)] for t in tags]
    Term().table(("TAG", "RUN", "WORKFLOW", "CREATED"), rows)
