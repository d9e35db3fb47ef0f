"""YAML loading that remembers where every mapping and value came from (file, line, column).

Bounded against hostile files: a workflow file is small, so one over MAX_DOCUMENT_BYTES, nested deeper
than MAX_DEPTH, or whose aliases would expand to more than MAX_NODES values ("billion laughs") is
refused at its line before it is built, in time linear in the file's size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from dstack.cli.errors import Location, WorkflowError


class Node(dict[str, Any]):
    """A YAML mapping with the location of itself, of each key and of each value."""

    location: Location
    key_locations: dict[str, Location]
    value_locations: dict[str, Location]
    raw_values: dict[str, str]  # scalars as written (`3.10` stays "3.10", not the float 3.1)

    def at(self, key: str) -> Location:
        return self.value_locations.get(key) or self.key_locations.get(key) or self.location


class Seq(list[Any]):
    location: Location
    item_locations: list[Location]
    item_raw: list[str | None]  # scalars as written (`- true` stays "true"); None for collections


MAX_DOCUMENT_BYTES = 1 << 20
MAX_DEPTH = 64
MAX_NODES = 100_000
# libyaml's parser when PyYAML has it: 30 times faster over a long hostile file; the same events.
_FAST_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _loc(path: Path, node: yaml.Node) -> Location:
    return Location(path, node.start_mark.line + 1, node.start_mark.column + 1)


def _convert(path: Path, node: yaml.Node, open_nodes: frozenset[int] = frozenset()) -> Any:
    if id(node) in open_nodes:  # `- &w {x: *w}`: an alias inside itself
        raise WorkflowError("a YAML alias refers to the node that contains it", _loc(path, node))
    open_nodes = open_nodes | {id(node)}
    if isinstance(node, yaml.MappingNode):
        out = Node()
        out.location = _loc(path, node)
        out.key_locations, out.value_locations, out.raw_values = {}, {}, {}
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode):
                raise WorkflowError("mapping keys must be plain strings", _loc(path, k))
            # Keys as written: YAML 1.1 would make `on:` (retry.on) the boolean True, `yes:` True.
            key = k.value
            if key in out:
                raise WorkflowError(f"duplicate key {key!r}", _loc(path, k))
            out[key] = _convert(path, v, open_nodes)
            out.key_locations[key] = _loc(path, k)
            out.value_locations[key] = _loc(path, v)
            if isinstance(v, yaml.ScalarNode):
                out.raw_values[key] = v.value
        return out
    if isinstance(node, yaml.SequenceNode):
        seq = Seq(_convert(path, n, open_nodes) for n in node.value)
        seq.location = _loc(path, node)
        seq.item_locations = [_loc(path, n) for n in node.value]
        seq.item_raw = [n.value if isinstance(n, yaml.ScalarNode) else None for n in node.value]
        return seq
    assert isinstance(node, yaml.ScalarNode)
    return _scalar(path, node)


_CONSTRUCTOR = yaml.constructor.SafeConstructor()


def _scalar(path: Path, node: yaml.ScalarNode) -> Any:
    """The typed value of a scalar (int, float, bool, null, str...) as YAML 1.1 resolves it."""
    if node.tag == "tag:yaml.org,2002:str":
        return node.value
    try:
        return _CONSTRUCTOR.construct_object(node, deep=True)
    except (ValueError, OverflowError, yaml.YAMLError) as e:  # e.g. `2024-13-45` looks like a date
        raise WorkflowError(
            f"invalid value {node.value!r} ({e}); quote it to use it as text", _loc(path, node)
        ) from None


def _check_bounds(path: Path, text: str) -> None:
    """One pass over the parser's events (the parser keeps an explicit stack: no recursion however deep
    the file nests): the nesting depth, and the number of values once every alias is expanded."""
    sizes: dict[str, int] = {}  # anchor -> values in its node, aliases expanded
    frames: list[tuple[str | None, int]] = [(None, 0)]  # open collections: (anchor, values so far)
    for loader in dict.fromkeys([_FAST_LOADER, yaml.SafeLoader]):
        sizes.clear()
        del frames[1:]
        frames[0] = (None, 0)
        try:
            for event in yaml.parse(text, Loader=loader):
                _count(path, event, sizes, frames)
            return
        except yaml.YAMLError:
            # libyaml refuses some documents PyYAML reads (its own nesting limit among them): the Python
            # parser then counts; invalid YAML is left to compose, which reports it in its own words.
            continue


def _count(path: Path, event: yaml.Event, sizes: dict[str, int], frames: list[tuple[str | None, int]]) -> None:
    anchor: str | None = None
    if isinstance(event, yaml.CollectionStartEvent):
        if len(frames) > MAX_DEPTH:
            raise WorkflowError(f"the YAML nests deeper than {MAX_DEPTH} levels", _mark(path, event))
        frames.append((event.anchor, 0))
        return
    if isinstance(event, yaml.CollectionEndEvent):
        anchor, count = frames.pop()
        added = count + 1
    elif isinstance(event, yaml.AliasEvent):
        added = sizes.get(event.anchor or "", 1)  # an alias inside its own anchor: _convert reports it
    elif isinstance(event, yaml.ScalarEvent):
        anchor, added = event.anchor, 1
    else:
        return
    if anchor is not None:
        sizes[anchor] = added
    parent_anchor, total = frames[-1]
    frames[-1] = (parent_anchor, total + added)
    if total + added > MAX_NODES:
        raise WorkflowError(
            f"the YAML holds more than {MAX_NODES} values (an alias counts as all it repeats)",
            _mark(path, event),
        )


def _mark(path: Path, event: yaml.Event) -> Location:
    mark = event.start_mark
    return Location(path, mark.line + 1, mark.column + 1) if mark else Location(path, 1, 1)


# The last composed text of each file: `dstack run` reads workflows.yaml more than once, and the SDK (dstack.api)
# builds a request per run from the same files; composing is most of the time (pure-Python YAML). Keyed by the
# text itself, so an edited file is composed anew. The graph is only read (_convert builds the values).
_COMPOSED: dict[Path, tuple[str, yaml.Node | None]] = {}
_COMPOSED_MAX = 64


def _compose(path: Path, text: str) -> yaml.Node | None:
    hit = _COMPOSED.get(path)
    if hit is not None and hit[0] == text:
        return hit[1]
    _check_bounds(path, text)  # before composing: a hostile file is refused, not built (a cached one passed)
    root: yaml.Node | None = yaml.compose(text, Loader=yaml.SafeLoader)
    if len(_COMPOSED) >= _COMPOSED_MAX:
        _COMPOSED.clear()
    _COMPOSED[path] = (text, root)
    return root


def load(path: Path) -> Any:
    try:
        size = path.stat().st_size
        if size > MAX_DOCUMENT_BYTES:
            raise WorkflowError(
                f"the file is {size} bytes; a workflow file may be at most {MAX_DOCUMENT_BYTES} bytes",
                Location(path, 1, 1),
            )
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise WorkflowError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise WorkflowError(f"{path} is not UTF-8 text") from None
    try:
        root = _compose(path, text)
    except RecursionError:  # a backstop: _check_bounds stops nesting far below Python's own limit
        raise WorkflowError(f"the YAML nests deeper than {MAX_DEPTH} levels", Location(path, 1, 1)) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        loc = Location(path, mark.line + 1, mark.column + 1) if mark else None
        message = f"invalid YAML: {e.problem or e.context}"
        if e.problem and e.context and e.context_mark is not None and e.context_mark is not mark:
            message += f" ({e.context} at line {e.context_mark.line + 1})"  # e.g. where a bracket was opened
        raise WorkflowError(message, loc) from None
    except yaml.YAMLError as e:
        raise WorkflowError(f"invalid YAML: {e}", Location(path, 1, 1)) from None
    if root is None:
        return None
    return _convert(path, root)
