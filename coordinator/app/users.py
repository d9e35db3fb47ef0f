"""Users (admin only, but listing and rotating one's own token): add one with a role (its token is
returned once and only its sha256 stored), list them, remove one, rotate one's token, set one's fair share and quotas
(`dstack users set`). A removal or rotation is in force for the very next call
(coordinator/auth.py); a removed user's personal secrets go with them."""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

from dstack.coordinator.app.core import Core
from dstack.coordinator.app.ownership import Actor
from dstack.coordinator.errors import Conflict, Forbidden, InvalidRequest, Unauthenticated
from dstack.coordinator.store import UserLimitsRow, UserRow
from dstack.coordinator.store.users import MEMBER, ROLES, SERVER_ADMIN

User = UserRow  # as listed: never a token

log = logging.getLogger("dstack.coordinator")

USER_NAME = re.compile(r"[a-z][a-z0-9._-]{0,63}")
SERVER_ADMIN_HINT = (
    "the user admin holds the server's own token (STATE_DIR/admin-token or DSTACK_ADMIN_TOKEN), set again at"
    " every start: to replace it, change that and restart the coordinator"
)
REVOKED = "your token was revoked or replaced (the user was removed or its token rotated): ask an admin"


@dataclass(frozen=True)
class NewToken:
    user: UserRow
    token: str  # the value: the caller shows it once


def check_role(role: str) -> str:
    role = role or MEMBER
    if role not in ROLES:
        raise InvalidRequest(f"unknown role {role!r}: one of {', '.join(ROLES)}")
    return role


async def add(core: Core, name: str, role: str, by: str) -> NewToken:
    if not USER_NAME.fullmatch(name):
        raise InvalidRequest(
            f"invalid user name {name!r}: lowercase letters, digits, '.', '_' and '-', starting with a letter"
        )
    role = check_role(role)
    row, token = await core.db(core.store.add_user, name, role)
    log.info("user %s (%s) added by %s", name, role, by)
    return NewToken(row, token)


async def list_users(core: Core) -> list[UserRow]:
    return await core.db(core.store.list_users)


async def remove(core: Core, name: str, by: str) -> None:
    if name == SERVER_ADMIN:
        raise Conflict(f"cannot remove the user admin: {SERVER_ADMIN_HINT}")
    await core.db(core.store.remove_user, name)  # and their personal secrets, in one transaction
    core.engine.forget_secrets_of(name)
    log.info("user %s removed by %s", name, by)


async def rotate(core: Core, name: str, actor: Actor) -> NewToken:
    """A new token for `name`: any user may rotate their own (a token that leaked, or a routine change, needs
    no admin); another user's token is for admins."""
    if name != actor.name and not actor.is_admin:
        a = "an" if actor.role[:1] in "aeiou" else "a"
        raise Forbidden(
            f"rotating {name}'s token needs the admin role; you are {a} {actor.role} (user {actor.name});"
            f" your own: `dstack users rotate-token {actor.name}`"
        )
    by = actor.name
    if name == SERVER_ADMIN:
        raise Conflict(f"cannot rotate the token of the user admin: {SERVER_ADMIN_HINT}")
    row, token = await core.db(core.store.rotate_user_token, name)
    log.info("user %s's token rotated by %s", name, by)
    return NewToken(row, token)


class SignedIn:
    """Re-checks a long call's caller (a followed log stream): its token must still be the user's,
    with the same role. Free while no user changed (the store's users.generation); one indexed read
    after a change."""

    def __init__(self, core: Core, actor: Actor) -> None:
        self.core = core
        self.actor = actor
        self.generation = core.store.users.generation

    async def check(self) -> None:
        generation = self.core.store.users.generation
        if generation == self.generation:
            return
        found = await self.core.db(self.core.store.user_by_token_hash, self.actor.token_hash)
        if found != (self.actor.name, self.actor.role):
            raise Unauthenticated(REVOKED)
        self.generation = generation


# ---- fair share and quotas ----------------------------------------------------------------
ADMIN_ROLE = "admin"
MAX_LIMIT = 1_000_000


async def set_limits(
    core: Core, caller: str, name: str, share: float | None, max_gpus: int | None, max_running: int | None
) -> UserLimitsRow:
    """Sets what is given (None: unchanged); admins only. The next scheduling pass uses it."""
    # Checked here, at once, from the database: a demoted admin cannot change limits.
    if await core.db(core.store.user_role, caller) != ADMIN_ROLE:
        raise Forbidden(f"only an admin may set users' shares and quotas; {caller!r} is not one")
    if share is not None and (not math.isfinite(share) or share <= 0 or share > MAX_LIMIT):
        raise InvalidRequest(f"--share must be a positive number up to {MAX_LIMIT}, not {share:g}")
    for flag, value in (("--max-gpus", max_gpus), ("--max-running", max_running)):
        if value is not None and value > MAX_LIMIT:
            raise InvalidRequest(f"{flag} must be at most {MAX_LIMIT} (0: no limit)")
    row = await core.db(core.store.set_user_limits, name, share, max_gpus, max_running)
    core.engine.limits_changed()
    return row
