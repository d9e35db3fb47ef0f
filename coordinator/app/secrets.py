"""Secrets: values go in, never out (only the job hand-off to an agent carries them).

Two scopes: team secrets (admins add and delete them; every job gets them) and personal secrets
(any member, each user's own: only that user's jobs get them, overriding a team secret of the
same name). `list_secrets` shows the team's and the caller's own, names only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dstack.coordinator.app.core import Core
from dstack.coordinator.app.ownership import Actor, check_admin
from dstack.coordinator.errors import InvalidRequest
from dstack.coordinator.secrets import check_secret_name
from dstack.coordinator.store.secrets import TEAM

PERSONAL_HINT = " (add your own with `dstack secrets add NAME --personal`)"


@dataclass(frozen=True)
class Secret:
    name: str
    created_at_ns: int
    updated_at_ns: int
    personal: bool = False


def _secret(r: Any) -> Secret:
    return Secret(r.name, r.created_at, r.updated_at, r.personal)


def _owner(actor: Actor, personal: bool, action: str) -> str:
    if personal:
        return actor.name
    check_admin(actor, action, PERSONAL_HINT)
    return TEAM


async def add(core: Core, actor: Actor, name: str, value: str, personal: bool = False) -> Secret:
    check_secret_name(name)
    if not value:
        raise InvalidRequest("a secret needs a value")
    owner = _owner(actor, personal, "adding a team secret")
    row = await core.db(core.store.put_secret, name, core.engine.seal_secret(value), owner)
    core.engine.remember_secret(name, value, owner)
    return _secret(row)


async def list_secrets(core: Core, actor: Actor) -> list[Secret]:
    return [_secret(r) for r in await core.db(core.store.secret_names, actor.name)]


async def delete(core: Core, actor: Actor, name: str, personal: bool = False) -> None:
    owner = _owner(actor, personal, "deleting a team secret")
    await core.db(core.store.delete_secret, name, owner)
    core.engine.forget_secret(name, owner)
