"""`dstack tags add|list|delete`: tags live in a repository (the current project's, see cli/repository.py)."""

from __future__ import annotations

import json
import sys

from dstack.cli.render import ago, iso


def add_command(tag: str, run: str) -> None:
    from dstack.cli.session import connect

    t = connect().add_tag(tag, run)
    print(f"{t.name} -> {t.run_name} ({t.workflow}) in {t.repository}")


def delete_command(tag: str) -> None:
    """Deletes TAG of the current repository, or OWNER/REPO/TAG."""
    from dstack.cli.repository import current_repository
    from dstack.cli.session import connect

    connect().delete_tag(tag, current_repository())
    print(f"deleted {tag}")


def list_command(as_json: bool, include_all: bool = False) -> None:
    from dstack.cli.repository import current_repository
    from dstack.cli.session import connect

    repository = "" if include_all else current_repository()
    tags = connect().list_tags(repository, include_all)
    if as_json:
        out = [
            {
                "name": t.name,
                "repository": t.repository,
                "run": t.run_name,
                "workflow": t.workflow,
                "created_at": iso(t.created_at_ns),
            }
            for t in tags
        ]
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    from dstack.cli.term import Term

    if include_all:
        rows = [[t.repository, t.name, t.run_name, t.workflow, ago(t.created_at_ns)] for t in tags]
        Term().table(("REPO", "TAG", "RUN", "WORKFLOW", "CREATED"), rows)
        return
    rows = [[t.name, t.run_name, t.workflow, ago(t.created_at_ns)] for t in tags]
    shown = tags[0].repository if tags else repository  # as stored: a local one with its user
    note = "" if tags else "no tags; "
    Term(stderr=True).print((f"repository {shown}: {note}`dstack tags list --all` lists every repository's", "dim"))
    Term().table(("TAG", "RUN", "WORKFLOW", "CREATED"), rows)
