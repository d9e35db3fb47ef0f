"""`dstack secrets add|list|delete`: values go to the coordinator and never come back."""

from __future__ import annotations

import getpass
import json
import sys

from dstack.cli.errors import CliError
from dstack.cli.render import ago, iso

MIN_MASKED_LENGTH = 4  # as the agent's log masking (agent/masking.py)


def add_command(name: str, value: str | None, personal: bool = False) -> None:
    from dstack.cli.session import connect

    if value is None:
        if not sys.stdin.isatty():
            value = sys.stdin.read().rstrip("\n")  # `echo $TOKEN | dstack secrets add NAME`
        else:
            value = getpass.getpass(f"value of {name} (hidden): ")
    if not value:
        raise CliError("a secret needs a value")
    s = connect().add_secret(name, value, personal)
    if s.personal:
        print(f"personal secret {s.name} saved; your jobs get it as the environment variable {s.name}")
    else:
        print(f"team secret {s.name} saved; every job gets it as the environment variable {s.name}")
    if len(value) < MIN_MASKED_LENGTH:
        print(
            f"warning: values shorter than {MIN_MASKED_LENGTH} characters are not masked in logs",
            file=sys.stderr,
        )


def list_command(as_json: bool) -> None:
    from dstack.cli.session import connect

    secrets = connect().list_secrets()
    if as_json:
        out = [
            {
                "name": s.name,
                "scope": "personal" if s.personal else "team",
                "created_at": iso(s.created_at_ns),
                "updated_at": iso(s.updated_at_ns),
            }
            for s in secrets
        ]
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    from dstack.cli.term import Term

    rows = [[s.name, "personal" if s.personal else "team", ago(s.created_at_ns), ago(s.updated_at_ns)] for s in secrets]
    Term().table(("SECRET", "SCOPE", "CREATED", "UPDATED"), rows)
