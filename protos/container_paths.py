"""Absolute artifact paths (`artifacts: [{path: /opt/conda/envs/myenv}]`, as 2022 dstack's examples wrote them).

An absolute artifact path names a folder *inside the job's container*, never one on the agent's host: the
agent creates a folder of the job's own under the job's folder on the host and bind-mounts it there, saves
it at the end like any artifact, and mounts the saved files at the same path in the containers of the jobs
that depend on it. The rules live here because three parties check them: the CLI (file:line errors), the
coordinator (what it records) and the agent, which trusts nothing it receives.

A path is refused when it is not absolute, contains `..` (or a NUL), is `/` itself, lies in the
container's kernel and configuration trees (/proc, /sys, /dev, /etc: Docker mounts its own files there),
is one of the system folders whose masking breaks every image (/usr, /bin, /lib, ...), or overlaps a
folder dstack mounts itself (the code at /workflow, the Python environment cache). Two absolute artifacts
of one job may not overlap either (one inside the other would be saved twice, and mounted in an order
that decides which one the job sees).
"""

from __future__ import annotations

from collections.abc import Iterable

CODE_MOUNT = "/workflow"  # where the job's code (its folder on the host) is inside the container
# Mounted by dstack itself into containers (agent/envcache.py): the environment cache and its helper.
DSTACK_MOUNTS = (CODE_MOUNT, "/var/lib/dstack", "/usr/local/lib/dstack")
KERNEL_TREES = ("/proc", "/sys", "/dev", "/etc")
SYSTEM_FOLDERS = frozenset(
    {"/bin", "/boot", "/lib", "/lib32", "/lib64", "/libx32", "/sbin", "/usr", "/var", "/run", "/usr/bin", "/usr/lib"}
)
MAX_PATH = 4096  # PATH_MAX
# Where an absolute artifact's files are kept in the store and recorded in a run's artifact list: under
# runs/RUN/JOB/rootfs/ (relative artifacts are under runs/RUN/JOB/artifacts/), so `/opt/x` and a relative
# `opt/x` never meet. The recorded path keeps the leading `/`.
ROOTFS_PREFIX = "rootfs"


class BadContainerPath(ValueError):
    """An absolute artifact path that no job may use; the message says why."""


def is_container_path(path: str) -> bool:
    return path.startswith("/")


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def check_container_path(path: str) -> str:
    """The normalised absolute path (`//opt/./x/` -> `/opt/x`), or BadContainerPath saying why not."""
    if not is_container_path(path):
        raise BadContainerPath(f"artifact path {path!r} is not absolute")
    if "\x00" in path or len(path) > MAX_PATH:
        raise BadContainerPath(f"artifact path {path[:64]!r} is not a usable path")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise BadContainerPath(f"artifact path {path!r} contains '..'; write the folder as it is, e.g. /opt/envs/myenv")
    norm = "/" + "/".join(parts)
    if norm == "/":
        raise BadContainerPath("artifact path '/' is the whole container: name a folder, e.g. /opt/envs/myenv")
    for tree in KERNEL_TREES:
        if _inside(norm, tree):
            raise BadContainerPath(f"artifact path {path!r} is inside {tree}, which the container runtime owns")
    if norm in SYSTEM_FOLDERS:
        raise BadContainerPath(f"artifact path {path!r} is a system folder: mounting over it breaks the image")
    for mount in DSTACK_MOUNTS:
        if _inside(norm, mount) or _inside(mount, norm):
            what = "the job's code" if mount == CODE_MOUNT else "dstack's environment cache"
            raise BadContainerPath(
                f"artifact path {path!r} overlaps {mount}, where dstack mounts {what}; for files of the code"
                " use a relative path"
            )
    return norm


def check_disjoint(paths: Iterable[str]) -> None:
    """Refuses two normalised container paths where one is inside the other (or the same twice)."""
    seen: list[str] = []
    for p in paths:
        for q in seen:
            if _inside(p, q) or _inside(q, p):
                raise BadContainerPath(f"artifact paths {q!r} and {p!r} overlap: each must be a folder of its own")
        seen.append(p)


def owning_root(path: str, roots: Iterable[str]) -> str | None:
    """The root among `roots` that a file's absolute path lies in, if any."""
    return next((r for r in roots if _inside(path, r) and path != r), None)
