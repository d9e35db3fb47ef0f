"""`dstack ps`: runs as a table, or JSON."""

from __future__ import annotations

import json
import sys

from dstack.cli.render import (
    ago,
    attempts,
    ports_text,
    preempted_text,
    queue_text,
    reused_text,
    run_status,
    run_to_json,
)

STYLE = {
    "done": "green",
    "failed": "red",
    "stopped": "yellow",
    "running": "cyan",
    "uploading": "cyan",
    "pulling": "cyan",
}


DEFAULT_LIMIT = 100  # runs the table shows at once (a deep queue has 100,000: pages of them help no one)


def ps_command(show_all: bool, as_json: bool, limit: int | None = None) -> None:
    """The table shows the first `limit` runs (default DEFAULT_LIMIT; 0: every run) plus the latest
    finished ones, and says when runs were left out. `--json` is complete (every page) unless `--limit`
    is given: scripts that read it see every run, as before."""
    from dstack.cli.session import connect

    client = connect()
    if limit is None and as_json:
        limit = 0
    elif limit is None:
        limit = DEFAULT_LIMIT
    if limit == 0:
        runs, more = client.list_runs(show_all), False
    else:
        runs, more = client.list_runs_head(show_all, limit)
        # Stable: runs submitted in the same nanosecond keep the coordinator's order.
        runs = sorted(runs, key=lambda r: -r.submitted_at_ns)
    if as_json:
        json.dump([run_to_json(r) for r in runs], sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    from dstack.cli.term import Term

    # The repository only when it tells runs apart: most listings are of one project.
    several = len({r.repository for r in runs}) > 1
    rows: list[list[str | tuple[str, str]]] = []
    for r in runs:
        status = run_status(r.status)
        n = attempts(r)
        shown = f"{status} (attempt {n})" if n > 1 else status
        rows.append(
            [
                r.name,
                *([r.repository] if several else []),
                r.workflow,
                (shown, STYLE.get(status, "white")),
                ago(r.submitted_at_ns),
                ", ".join(r.tags),
                # A waiting run: its place in the scheduler's order and expected start, then why; and
                # why its last attempt was preempted, if one was; a running one: the ports it serves.
                "; ".join(
                    filter(
                        None,
                        [
                            " ".join(filter(None, [queue_text(r), r.message])),
                            preempted_text(r),
                            reused_text(r),
                            ports_text(r),
                        ],
                    )
                ),
            ]
        )
    header = ("RUN", *(("REPO",) if several else ()), "WORKFLOW", "STATUS", "SUBMITTED", "TAGS", "MESSAGE")
    Term().table(header, rows, overflow="fold")
    if more:
        what = "runs" if show_all else "unfinished runs"
        flag = "-a --limit 0" if show_all else "--limit 0"
        print(
            f"Only the newest {limit} {what} are shown; `dstack ps {flag}` lists every one (`--limit N` the newest N)",
            file=sys.stderr,
        )
