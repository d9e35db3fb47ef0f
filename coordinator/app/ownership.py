"""Who may change what: the one place where a use case checks that the caller owns the run it
changes (stop, remove, tag, finish an upload) or is an admin. Which role each RPC needs at all is
the permission table's business (coordinator/auth.py); this is the second, per-object step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dstack.coordinator.errors import Forbidden
from dstack.coordinator.store.users import ADMIN


@dataclass(frozen=True)
class Actor:
    """The user a use case acts for."""

    name: str
    role: str  # admin, member or viewer
    token_hash: str = field(default="", repr=False)  # to re-check a long stream's caller (app/users.py)

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN


def check_owner(actor: Actor, owner: str, action: str) -> None:
    """Forbidden (PERMISSION_DENIED) unless `actor` is `owner` or an admin; `action` reads "stop run X"."""
    if actor.is_admin or actor.name == owner:
        return
    raise Forbidden(f"only the owner ({owner}) or an admin can {action}; you are {actor.name}")


def check_admin(actor: Actor, action: str, hint: str = "") -> None:
    if actor.is_admin:
        return
    a = "an" if actor.role[:1] in "aeiou" else "a"
    raise Forbidden(f"{action} needs the admin role; you are {a} {actor.role}{hint}")
