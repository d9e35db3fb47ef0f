"""Tags: names for runs whose artifacts other runs use, unique within a repository."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dstack.coordinator.app.core import Core
from dstack.coordinator.app.ownership import Actor, check_owner
from dstack.coordinator.app.runs import check_tag_name
from dstack.coordinator.repositories import run_repository
from dstack.coordinator.store import TagRow


@dataclass(frozen=True)
class Tag:
    name: str
    run_name: str
    workflow: str
    created_at_ns: int
    repository: str = ""


def _tag(r: Any) -> Tag:
    return Tag(r.name, r.run_name, r.workflow, r.created_at, r.repository)


def _repository(sent: str, user: str) -> str:
    """A repository a client names (the rule of a submission: `local/FOLDER` is the user's own)."""
    return run_repository(sent, "", user)


async def add(core: Core, actor: Actor, tag: str, run_name: str) -> Tag:
    """Tags a run in the run's repository (its owner or an admin)."""
    check_tag_name(tag)
    run = await core.db(core.store.run_by_name, run_name)
    check_owner(actor, run.owner, f"tag run {run_name}")
    return _tag(await core.db(core.store.add_tag, tag, run_name))


async def get(core: Core, user: str, repository: str, ref: str) -> Tag:
    """The tag a dependency `ref` names from a run of `repository` (as a submission resolves it)."""
    return _tag(await core.db(core.store.resolve_tag, _repository(repository, user), ref))


async def list_tags(core: Core, user: str, repository: str = "", include_all: bool = False) -> list[Tag]:
    """The tags of one repository; of all with `include_all` or without a repository (older clients)."""
    where = None if include_all or not repository else _repository(repository, user)
    return [_tag(r) for r in await core.db(core.store.list_tags, where)]


async def delete(core: Core, actor: Actor, ref: str, repository: str = "") -> Tag:
    """Deletes `TAG` of `repository`, or `OWNER/REPO/TAG` (the tagged run's owner or an admin);
    returns what it was."""
    where = _repository(repository, actor.name) if repository else None

    def owned(row: TagRow) -> None:  # on the DB thread, between finding the tag and deleting it
        owner = core.store.run_by_name(row.run_name).owner
        check_owner(actor, owner, f"delete tag {row.name} (of run {row.run_name})")

    return _tag(await core.db(core.store.delete_tag, where, ref, owned))
