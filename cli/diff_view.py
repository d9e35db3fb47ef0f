"""`dstack diff RUN1 RUN2` for people (cli/run_diff.py makes the document): one table per section, only
what differs. Every value is shown as text, never as rich markup: records hold what users and agents wrote."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text


def _value(v: Any) -> str:
    if v is None or v == "" or v == []:
        return "-"
    if isinstance(v, list | dict):
        return json.dumps(v) if not (isinstance(v, list) and all(isinstance(x, str) for x in v)) else ", ".join(v)
    return str(v)


def _table(title: str, names: list[str]) -> Table:
    table = Table(title=title, title_justify="left", box=None, pad_edge=False, header_style="dim")
    table.add_column("", style="bold")
    for n in names:
        table.add_column(n)
    return table


def _rows(table: Table, pairs: dict[str, Any], prefix: str = "") -> None:
    for key, pair in pairs.items():
        table.add_row(Text(prefix + key), Text(_value(pair[0])), Text(_value(pair[1])))


def render_diff(diff: dict[str, Any], console: Console | None = None) -> None:
    out = console or Console(highlight=False)
    names = list(diff.get("runs") or ["", ""])
    if diff.get("identical"):
        out.print(Text(f"{names[0]} and {names[1]}: the same code, workflows, inputs and environment (timings aside)"))
    if diff.get("run"):
        table = _table("run", names)
        _rows(table, diff["run"])
        out.print(table)
    code = diff.get("code") or {}
    if code:
        table = _table("code", names)
        _rows(table, {k: v for k, v in code.items() if isinstance(v, list)})
        for group in ("untracked", "files"):
            for key, files in (code.get(group) or {}).items():
                if files:
                    table.add_row(Text(f"{group} {key}"), *_file_cells(key, files))
        out.print(table)
        if code.get("unified_diff"):
            out.print(Text(code["unified_diff"]))
    for workflow, changes in (diff.get("workflows") or {}).items():
        table = _table(f"workflow {workflow}", names)
        _rows(table, changes.get("variables") or {}, "variable ")
        if "run_args" in changes:
            _rows(table, {"run args": changes["run_args"]})
        _rows(table, changes.get("workflow") or {})
        out.print(table)
    for job in diff.get("jobs") or []:
        title = f"job {job['workflow']}" + (f" #{job['index']}" if job.get("index") else "")
        table = _table(title, names)
        if job.get("only_in"):
            table.add_row(Text("only in"), Text(job["only_in"]), Text(""))
        for i in job.get("inputs") or []:
            a, b = i["manifest_hash"]
            sa, sb = i["source"]
            table.add_row(
                Text(f"input {i['job']}"),
                Text(f"{sa or '-'} {str(a or '')[:16]}"),
                Text(f"{sb or '-'} {str(b or '')[:16]}"),
            )
        pkgs = job.get("packages") or {}
        _rows(table, pkgs.get("changed") or {}, "package ")
        for n, v in (pkgs.get("added") or {}).items():
            table.add_row(Text(f"package {n}"), Text("-"), Text(v))
        for n, v in (pkgs.get("removed") or {}).items():
            table.add_row(Text(f"package {n}"), Text(v), Text("-"))
        _rows(table, job.get("environment") or {})
        for key in ("agent", "status", "exit_code"):
            if key in job:
                _rows(table, {key.replace("_", " "): job[key]})
        _rows(table, job.get("spec") or {}, "spec ")
        timings = job.get("timings_s") or {}
        if timings:
            _rows(table, {f"{k} (s)": v for k, v in timings.items()}, "time ")
        out.print(table)


def _file_cells(key: str, files: list[str]) -> tuple[Text, Text]:
    """Files only RUN2 has go under RUN2, files only RUN1 has under RUN1, changed ones under both."""
    listed = Text(", ".join(files))
    if key == "added":
        return Text(""), listed
    if key == "removed":
        return listed, Text("")
    return listed, listed.copy()
