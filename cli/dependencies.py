"""A workflow's dependencies, in every form dstack accepted in 2022 (tests/corpus2022/MEANINGS.md §6).

    depends-on: [prepare, prepare:latest]             # April 2022: run `prepare` first / its run tagged latest
    depends-on: {repo: {include: [FILES]}, workflows: [prepare]}   # April 2022, the CLI's schema
    deps: [{tag: T}, {workflow: W, mount: true}]      # autumn 2022
    deps: [":T", "W", "W:T"]                          # autumn 2022 strings (`W:T` as in depends-on)

A bare NAME means "run it first, in this run" in `depends-on` and "the artifacts of its last run that finished
done" in `deps`, as 2022 dstack read them. Any name may be qualified with another repository, `OWNER/REPO/NAME`
(a tag: `:OWNER/REPO/TAG`, as 2022 wrote it); the coordinator resolves the qualifier
(coordinator/repositories.py `resolve_qualifier`).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import Any

from dstack.cli import fields
from dstack.cli.errors import Location, WorkflowError
from dstack.cli.yamlsrc import Node, Seq
from dstack.protos.repos import BadRef, Ref, split_ref

RUNTIME, TAG, WORKFLOW = "runtime", "tag", "workflow"
STRING_FORMS = "WORKFLOW, WORKFLOW:TAG, :TAG, or any of them as OWNER/REPO/NAME (:OWNER/REPO/TAG for a tag)"
DEPS_ITEM_FORMS = f"{{tag: TAG}}, {{workflow: WORKFLOW}} (either with mount: true), or a string: {STRING_FORMS}"


@dataclass
class Dependencies:
    runtime: list[str] = field(default_factory=list)  # workflows of this file run first, in the same run
    tags: list[str] = field(default_factory=list)  # TAG or OWNER/REPO/TAG: the tagged run's artifacts
    workflows: list[str] = field(default_factory=list)  # WORKFLOW or OWNER/REPO/WORKFLOW: its last done run's
    # `download:latest` -> {latest: download}; `org/repo/download:latest` -> {org/repo/latest: download}
    tag_workflows: dict[str, str] = field(default_factory=dict)
    # (kind, name) -> where it is written, for errors at the item's own line
    where: dict[tuple[str, str], Location] = field(default_factory=dict)
    # `depends-on: {repo: {include: [FILES]}}`: project files the job needs, relative to the project root
    include: list[tuple[str, Location]] = field(default_factory=list)

    def at(self, kind: str, name: str, default: Location) -> Location:
        return self.where.get((kind, name), default)

    def add(self, kind: str, name: str, loc: Location) -> None:
        target = {RUNTIME: self.runtime, TAG: self.tags, WORKFLOW: self.workflows}[kind]
        if name not in target:  # named twice (say in depends-on and in deps): one dependency
            target.append(name)
            self.where[(kind, name)] = loc


def dependencies(node: Node) -> Dependencies:
    deps = Dependencies()
    value = node.get("depends-on")
    if isinstance(value, Node):
        _depends_on_object(deps, value)
    elif value is not None:
        for text, loc in _strings(node, "depends-on"):
            _string_dep(deps, text, loc, bare=RUNTIME)
    _deps(deps, node)
    return deps


def _strings(node: Node, key: str) -> list[tuple[str, Location]]:
    """The items of a list of strings with their own locations (`- 2022` is "2022" as written)."""
    texts = fields.string_list(node, key)
    items = node.get(key)
    locations = items.item_locations if isinstance(items, Seq) else [node.at(key)] * len(texts)
    return list(zip(texts, locations, strict=True))


def _depends_on_object(deps: Dependencies, obj: Node) -> None:
    """`depends-on: {repo: {include: [FILES]}, workflows: [NAMES]}` (April 2022, dstackai/gpt-2).

    `workflows` are what a `depends-on` list holds. `repo.include` listed the repository files the job needs; the
    whole tree is sent with the job as for any workflow (a superset), and `dstack run` checks that each listed file
    is in it, at its line."""
    fields.check_unknown(obj, {"repo", "workflows"}, "depends-on")
    for text, loc in _strings(obj, "workflows"):
        _string_dep(deps, text, loc, bare=RUNTIME)
    repo = obj.get("repo")
    if repo is None:
        return
    if not isinstance(repo, Node):
        raise WorkflowError("'repo' must be a mapping like {include: [FILES]}", obj.at("repo"))
    fields.check_unknown(repo, {"include"}, "depends-on.repo")
    for path, loc in _strings(repo, "include"):
        norm = posixpath.normpath(path) if path.strip() else ""
        if not norm or path.startswith("/") or norm == ".." or norm.startswith("../"):
            raise WorkflowError(
                f"depends-on.repo.include {path!r} must be a path inside the project, relative to its root", loc
            )
        deps.include.append((norm, loc))


def _deps(deps: Dependencies, node: Node) -> None:
    items = node.get("deps")
    if items is None:
        return
    if not isinstance(items, Seq):
        raise WorkflowError(f"'deps' must be a list; each item {DEPS_ITEM_FORMS}", node.at("deps"))
    for i, item in enumerate(items):
        loc = items.item_locations[i]
        if isinstance(item, Node):
            _deps_mapping(deps, item, loc)
        elif isinstance(item, (str, int, float)) and not isinstance(item, bool):
            raw = items.item_raw[i]
            _string_dep(deps, item if isinstance(item, str) else str(raw), loc, bare=WORKFLOW)
        else:
            raise WorkflowError(f"each item of 'deps' must be {DEPS_ITEM_FORMS}", loc)


def _deps_mapping(deps: Dependencies, item: Node, loc: Location) -> None:
    kinds = [k for k in (TAG, WORKFLOW) if k in item]
    if len(kinds) != 1 or not set(item) <= {TAG, WORKFLOW, "mount"}:
        hint = ""
        if len(item) == 1 and not kinds:
            # `- download-data: train_val_test`: a space after the colon makes a mapping of what was meant as text
            key = next(iter(item))
            tag = fields.scalar_text(item, key)
            hint = f"; for the run of {key!r} tagged {tag!r}, write `- {key}:{tag}` (no space after ':')"
        raise WorkflowError(f"each item of 'deps' must be {DEPS_ITEM_FORMS}{hint}", loc)
    mount = item.get("mount", False)
    if not isinstance(mount, bool):
        raise WorkflowError("'mount' must be true or false", item.at("mount"))
    # `mount: true` (autumn 2022): its S3 backend mounted the dependency's artifacts instead of copying them
    # (its local backend copied them too); the job sees the same files either way, so it changes nothing here.
    kind = kinds[0]
    value = fields.string(item, kind, required=True)
    where = item.at(kind)
    if not value.strip():
        raise WorkflowError(f"'{kind}' is empty", where)
    if ":" in value:
        raise WorkflowError(
            f"{kind} {value!r}: ':' is not part of a {kind} name (in a string item, `- WORKFLOW:TAG` is a tag)", where
        )
    deps.add(kind, str(_ref(value, where)), where)


def _string_dep(deps: Dependencies, text: str, loc: Location, bare: str) -> None:
    """One string dependency; `bare`: what an unqualified WORKFLOW is (RUNTIME in depends-on, WORKFLOW in deps)."""
    invalid = WorkflowError(f"invalid dependency {text!r}: expected {STRING_FORMS}", loc)
    if not text.strip() or text != text.strip() or text.count(":") > 1:
        raise invalid
    if text.startswith(":"):  # `:TAG`, `:OWNER/REPO/TAG` (2022's `_parse_dep_spec`)
        if not text[1:]:
            raise invalid
        deps.add(TAG, str(_ref(text[1:], loc)), loc)
        return
    name, colon, tag = text.partition(":")
    if colon and name.endswith("/") and tag and "/" not in tag:
        # `OWNER/REPO/:TAG`: 2022 read it as a workflow named `:TAG`, which cannot exist; say how to write it
        raise WorkflowError(
            f"invalid reference {name!r}: a tag of another repository is written :{name}{tag}"
            f" (or {name}WORKFLOW:{tag} for one that must be on a run of WORKFLOW)",
            loc,
        )
    ref = _ref(name, loc)
    if colon:  # `WORKFLOW:TAG`: the run tagged TAG, which must be of WORKFLOW
        if not tag or "/" in tag:
            raise invalid
        qualified = str(Ref(ref.repository, tag))
        deps.add(TAG, qualified, loc)
        deps.tag_workflows[qualified] = ref.name
    elif ref.repository:  # another repository's workflow cannot run in this run: its last done run
        deps.add(WORKFLOW, name, loc)
    else:
        deps.add(bare, name, loc)


def _ref(text: str, loc: Location) -> Ref:
    try:
        return split_ref(text)
    except BadRef as e:
        raise WorkflowError(str(e), loc) from None


def strings_in(value: Any) -> list[str]:
    """Every string in a dependency field as written (for the `${{ }}` check: dependencies shape the run)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings_in(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings_in(v)]
    return []
