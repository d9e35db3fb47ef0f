"""Secrets: values go in, never out (only the job hand-off to an agent carries them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dstack.coordinator.app.core import Core
from dstack.coordinator.errors import InvalidRequest
from dstack.coordinator.secrets import check_secret_name


@dataclass(frozen=True)
class Secret:
    name: str
    created_at_ns: int
    updated_at_ns: int


def _secret(r: Any) -> Secret:
    return Secret(r.name, r.created_at, r.updated_at)


async def add(core: Core, name: str, value: str) -> Secret:
    check_secret_name(name)
    if not value:
        raise InvalidRequest("a secret needs a value")
    row = await core.db(core.store.put_secret, name, core.engine.seal_secret(value))
    core.engine.remember_secret(name, value)
    return _secret(row)


async def list_secrets(core: Core) -> list[Secret]:
    return [_secret(r) for r in await core.db(core.store.list_secrets)]


async def delete(core: Core, name: str) -> None:
    await core.db(core.store.delete_secret, name)
    core.engine.forget_secret(name)
