"""Join tokens (admin only, coordinator/auth.py): create one with an expiry and a use limit (its value
is shown once and never stored), list them, revoke one."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from dstack.coordinator.app.core import Core
from dstack.coordinator.errors import InvalidRequest
from dstack.coordinator.store import JoinTokenRow

JoinToken = JoinTokenRow  # as listed: never the value

log = logging.getLogger("dstack.coordinator")

MAX_USES = 1_000_000


@dataclass(frozen=True)
class NewJoinToken:
    row: JoinTokenRow
    token: str  # the value: the caller shows it once


async def create(core: Core, ttl_s: float, max_uses: int, by: str) -> NewJoinToken:
    if ttl_s < 0 or ttl_s != ttl_s:
        raise InvalidRequest("a join token's time to live must be positive (or 0: it never expires)")
    if not 0 <= max_uses <= MAX_USES:
        raise InvalidRequest(f"a join token's uses must be between 1 and {MAX_USES} (or 0: unlimited)")
    row, token = await core.db(core.store.create_join_token, int(ttl_s * 1e9), max_uses)
    log.info("join token %s created by %s (ttl %gs, uses %s)", row.id, by, ttl_s, max_uses or "unlimited")
    return NewJoinToken(row, token)


async def list_tokens(core: Core) -> list[JoinTokenRow]:
    return await core.db(core.store.list_join_tokens)


async def revoke(core: Core, token_id: str, by: str) -> JoinTokenRow:
    row = await core.db(core.store.revoke_join_token, token_id)
    log.info("join token %s revoked by %s", token_id, by)
    return row
