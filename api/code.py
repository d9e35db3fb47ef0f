"""The code a run gets, packed once per state of a tree: many submissions from one process pack it once, and
ask the coordinator once whether it holds it (content-addressed by sha256; HasCode)."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dstack.cli.packing import PackedCode, list_files, pack_listed

if TYPE_CHECKING:
    from dstack.cli.providers.custom import RepoRef

# (path, size, mtime, mode) of each file to send, the workflows' artifact folders, and git's view (commit,
# branch, dirty): what the packed bytes depend on. A file edited in place changes its size or mtime.
# The custom providers' commits shipped with it (their folders in the code) too.
TreeState = tuple[bytes, tuple[str, ...], tuple[tuple[str, int, int, int], ...], tuple[str, ...]]


@dataclass
class _Packed:
    state: TreeState
    packed: PackedCode


class CodeCache:
    """The last pack of each project root, reused while the tree is unchanged; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._packs: dict[Path, _Packed] = {}
        self.uploaded: set[str] = set()  # hashes the coordinator said it holds, or that were sent to it

    def pack(self, root: Path, provider_repos: Sequence[RepoRef] = ()) -> PackedCode:
        """`provider_repos`: custom providers' pinned commits, whose files are packed with the code."""
        from dstack.cli.home import dstack_home
        from dstack.cli.providers.custom import archive
        from dstack.cli.workflows import output_paths

        root = root.resolve()
        names, tracked, ref = list_files(root, exclude=(dstack_home(),))
        outputs = output_paths(root)
        commits = tuple(r.folder for r in provider_repos)
        state: TreeState = (ref.SerializeToString(deterministic=True), tuple(outputs), _stats(root, names), commits)
        with self._lock:
            hit = self._packs.get(root)
            if hit is not None and hit.state == state:
                return hit.packed
        trees = {r.folder: archive(r) for r in provider_repos}
        packed = pack_listed(root, names, tracked, ref, outputs, trees)
        with self._lock:
            self._packs[root] = _Packed(state, packed)
        return packed


def _stats(root: Path, names: list[str]) -> tuple[tuple[str, int, int, int], ...]:
    out = []
    for n in names:
        try:
            st = os.lstat(root / n)
        except OSError:
            continue
        out.append((n, st.st_size, st.st_mtime_ns, st.st_mode))
    return tuple(out)
