"""`dstack validate [WORKFLOW]`: every workflow file checked as `dstack run` checks it, nothing submitted.

What a team puts in its CI: no coordinator is contacted and no token is needed. Each workflow goes through
`check_offline` (cli/commands/run.py), exactly what `dstack run` does before it connects: variables, fields,
provider (a custom provider's repository is fetched, into the same cache `dstack run` uses), dependencies, job
specs and the files the workflow names in the code that would be sent. A file that cannot be read (invalid YAML,
a duplicate key) is reported and the others are still checked; each workflow gets its first error (a later one
often follows from it), so every failing workflow has at least one file:line line. Notes (`note: ...`, such as a
deprecated 2022 form or a bare `env` name not set here) are shown with the workflow they came from.

Not checked (they need the coordinator): that tags named in `depends-on`/`deps` exist, and that the pool has a
container runtime for a job with an absolute artifact path.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dstack.cli.errors import CliError, Location, WorkflowError
from dstack.cli.term import Term


@dataclass(frozen=True)
class Problem:
    """An error at a place in a workflow file (`file` relative to the project root), or without one."""

    message: str
    file: str | None = None
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: {self.message}" if self.file else self.message

    def as_json(self) -> dict[str, Any]:
        return {"message": self.message, "file": self.file, "line": self.line, "column": self.column}


@dataclass
class WorkflowCheck:
    name: str
    file: str
    line: int
    errors: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "file": self.file,
            "line": self.line,
            "ok": self.ok,
            "errors": [e.as_json() for e in self.errors],
            "notes": self.notes,
        }


@dataclass
class ProjectCheck:
    root: Path
    file_errors: list[Problem]  # files (or workflow entries) that could not be read at all
    workflows: list[WorkflowCheck]
    notes: list[str]  # notes printed while reading the files, not tied to one workflow's check

    @property
    def ok(self) -> bool:
        return not self.file_errors and all(w.ok for w in self.workflows)

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "root": str(self.root),
            "file_errors": [e.as_json() for e in self.file_errors],
            "workflows": [w.as_json() for w in self.workflows],
            "notes": self.notes,
        }


def validate_project(root: Path, only: str | None = None) -> ProjectCheck:
    """Checks every workflow of the project at `root` (or only `only`), as `dstack run` would before submitting.

    Errors in a file that cannot be read are always reported, even with `only`: `dstack run` reads every
    workflow file, so such a file stops any run."""
    from dstack.cli.commands.run import check_offline, list_code
    from dstack.cli.workflows import load_workflow_nodes

    rel = _Relative(root)
    load_errors: list[WorkflowError] = []
    with _captured() as printed:
        nodes = load_workflow_nodes(root, load_errors)
    seen_notes = set(printed())
    check = ProjectCheck(root, [rel.problem(e) for e in load_errors], [], [rel.text(n) for n in printed()])
    names = list(nodes)
    if only is not None:
        if only not in nodes:
            known = ", ".join(sorted(nodes)) or "none"
            check.file_errors.append(Problem(f"workflow {only!r} is not defined; workflows: {known}"))
            return check
        names = [only]
    packed = None
    for name in names:
        node = nodes[name]
        result = WorkflowCheck(name, rel.path(node.location.file), node.location.line)
        check.workflows.append(result)
        with _captured() as printed:
            try:
                if packed is None:
                    packed = list_code(root)  # the files that would be sent: names only
                fresh = load_workflow_nodes(root, [])  # variables are substituted in place: a copy per workflow
                check_offline(root, name, [], Term(stderr=True), packed, fresh)
            except CliError as e:
                result.errors.append(rel.problem(e))
            except Exception as e:  # a bug of the checker is an error of the check, never a silent pass
                result.errors.append(Problem(f"internal error: {type(e).__name__}: {rel.text(str(e))}"))
        for line in printed():
            if line not in seen_notes:  # a dependency's note is shown once, with the first workflow that had it
                seen_notes.add(line)
                result.notes.append(rel.text(line))
    return check


@contextlib.contextmanager
def _captured() -> Iterator[Any]:
    """What the checks print on stderr (notes and warnings), as lines."""
    buffer = io.StringIO()
    with contextlib.redirect_stderr(buffer):
        yield lambda: [line for line in buffer.getvalue().splitlines() if line.strip()]


class _Relative:
    """Paths in messages relative to the project root: what a CI log or a reader in the project wants."""

    def __init__(self, root: Path) -> None:
        self.prefixes = sorted({f"{root}/", f"{root.resolve()}/"}, key=len, reverse=True)

    def path(self, path: Path | str) -> str:
        return self.text(str(path))

    def text(self, text: str) -> str:
        for prefix in self.prefixes:
            text = text.replace(prefix, "")
        return text

    def problem(self, e: CliError) -> Problem:
        message = str(e)
        loc: Location | None = getattr(e, "location", None)
        if loc is None:
            return Problem(self.text(message))
        prefix = f"{loc}: "
        if message.startswith(prefix):
            message = message[len(prefix) :]
        return Problem(self.text(message), self.path(loc.file), loc.line, loc.column)


def render(check: ProjectCheck) -> list[tuple[str, str]]:
    """(style, line) for the terminal: one line per workflow (`ok` or its error), its notes, then a summary."""
    lines: list[tuple[str, str]] = [("yellow", n) for n in check.notes]
    lines += [("red", f"error  {e}") for e in check.file_errors]
    width = max((len(w.name) for w in check.workflows), default=0)
    for w in check.workflows:
        if w.ok:
            lines.append(("green", f"ok     {w.name.ljust(width)}  {w.file}:{w.line}"))
        for e in w.errors:
            lines.append(("red", f"error  {w.name.ljust(width)}  {e}"))
        lines += [("yellow", f"       {w.name.ljust(width)}  {n}") for n in w.notes]
    good = sum(1 for w in check.workflows if w.ok)
    summary = f"{len(check.workflows)} workflow{'s' if len(check.workflows) != 1 else ''}: {good} ok"
    if good != len(check.workflows):
        summary += f", {len(check.workflows) - good} with errors"
    if check.file_errors:
        summary += f"; {len(check.file_errors)} error{'s' if len(check.file_errors) != 1 else ''} reading the files"
    lines.append(("green" if check.ok else "red", summary))
    return lines


def validate_command(workflow: str, as_json: bool) -> int:
    from dstack.cli.workflows import find_project_root

    root = find_project_root(Path.cwd())
    check = validate_project(root, workflow or None)
    if as_json:
        print(json.dumps(check.as_json(), indent=1))
    else:
        out = Term()
        for style, line in render(check):
            out.print((line, style))
    return 0 if check.ok else 1
