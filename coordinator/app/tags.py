"""Tags: names for runs whose artifacts other runs use."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dstack.coordinator.app.core import Core
from dstack.coordinator.app.ownership import Actor, check_owner
from dstack.coordinator.app.runs import check_tag_name


@dataclass(frozen=True)
class Tag:
    name: str
    run_name: str
    workflow: str
    created_at_ns: int


def _tag(r: Any) -> Tag:
    return Tag(r.name, r.run_name, r.workflow, r.created_at)


async def add(core: Core, actor: Actor, tag: str, run_name: str) -> Tag:
    check_tag_name(tag)
    run = await core.db(core.store.run_by_name, run_name)
    check_owner(actor, run.owner, f"tag run {run_name}")
    return _tag(await core.db(core.store.add_tag, tag, run_name))


async def list_tags(core: Core) -> list[Tag]:
    return [_tag(r) for r in await core.db(core.store.list_tags)]


async def delete(core: Core, actor: Actor, tag: str) -> None:
    tagged = await core.db(core.store.tag, tag)
    owner = (await core.db(core.store.run_by_name, tagged.run_name)).owner
    check_owner(actor, owner, f"delete tag {tag} (of run {tagged.run_name})")
    await core.db(core.store.delete_tag, tag)
