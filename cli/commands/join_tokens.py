"""`dstack join-tokens create|list|revoke` (admin only): what agents enrol with."""

from __future__ import annotations

import json
import re
import sys
import time

from dstack.cli.errors import CliError
from dstack.cli.render import iso

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_ttl(text: str) -> float:
    """`90s`, `30m`, `24h`, `7d`, `2w` or plain seconds; `0` or empty: never expires."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text or "0")
    if m is None:
        raise CliError(f"--ttl {text!r}: give a duration such as 90s, 30m, 24h or 7d")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def _as_json(t: object) -> dict[str, object]:
    from dstack.protos.v1 import client_pb2

    assert isinstance(t, client_pb2.JoinToken)
    return {
        "id": t.id,
        "created_at": iso(t.created_at_ns),
        "expires_at": iso(t.expires_at_ns),
        "uses": t.uses,
        "max_uses": t.max_uses or None,
        "revoked": bool(t.revoked_at_ns),
        "revoked_at": iso(t.revoked_at_ns),
        "expired": bool(t.expires_at_ns) and t.expires_at_ns <= time.time_ns(),
    }


def create_command(ttl: str, uses: int, as_json: bool) -> None:
    from dstack.cli.session import connect

    if uses < 0:
        raise CliError("--uses must be 1 or more (or 0: unlimited)")
    resp = connect().create_join_token(parse_ttl(ttl), uses)
    if as_json:
        json.dump({**_as_json(resp.join_token), "token": resp.token}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    t = resp.join_token
    limits = [f"expires {iso(t.expires_at_ns)}" if t.expires_at_ns else "never expires"]
    limits.append(f"{t.max_uses} use(s)" if t.max_uses else "unlimited uses")
    print(f"join token {t.id} ({', '.join(limits)}); it is shown this once:")
    print(resp.token)
    print(
        "on the GPU host: put it in a file only root can read and run"
        " `dstack agent --coordinator HOST:PORT --join-token-file FILE` (or set DSTACK_JOIN_TOKEN)",
        file=sys.stderr,
    )


def list_command(as_json: bool) -> None:
    from dstack.cli.session import connect

    tokens = connect().list_join_tokens()
    if as_json:
        json.dump([_as_json(t) for t in tokens], sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    from dstack.cli.render import ago
    from dstack.cli.term import Term

    now = time.time_ns()
    rows: list[list[str | tuple[str, str]]] = []
    for t in tokens:
        if t.revoked_at_ns:
            state = "revoked"
        elif t.expires_at_ns and t.expires_at_ns <= now:
            state = "expired"
        elif t.max_uses and t.uses >= t.max_uses:
            state = "used up"
        else:
            state = "valid"
        expires = iso(t.expires_at_ns) or "never"
        rows.append([t.id, ago(t.created_at_ns), expires, f"{t.uses}/{t.max_uses or 'unlimited'}", state])
    Term().table(("ID", "CREATED", "EXPIRES", "USES", "STATE"), rows)


def revoke_command(token_id: str) -> None:
    from dstack.cli.session import connect

    t = connect().revoke_join_token(token_id)
    print(f"join token {t.id} revoked: no agent can enrol with it (agents it enrolled keep their own credential)")
