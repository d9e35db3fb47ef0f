"""Per-user fair share and quotas (`dstack users set`); managing users themselves comes separately."""

from __future__ import annotations

import math

from dstack.coordinator.app.core import Core
from dstack.coordinator.errors import Forbidden, InvalidRequest
from dstack.coordinator.store import UserLimitsRow

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
