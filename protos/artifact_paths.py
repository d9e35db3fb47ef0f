"""Where a job's relative artifact paths are: relative to its `working_dir`, in the job that saves them and in
every job that receives them. One rule for the CLI, the coordinator and the agent.

2022 evidence (dstackai/dstack bff1ac2, December 2022, `runner/internal/executor/executor.go`): the runner bound
each artifact, saved (`artifactsOut`) and received (`artifactsIn`), with `DockerBindings(path.Join("/workflow",
job.WorkingDir))`, and `runner/internal/artifacts/simple/simple.go` joins a relative artifact path to that folder;
the container's WorkDir was the same `/workflow/<working_dir>`. So `working_dir: sub` with `artifacts: [out]`
saved `sub/out`, recorded as `out`, and a dependant found it at `out` under *its own* working_dir.

Absolute artifact paths (`/opt/...`) are folders inside the container and do not depend on working_dir
(protos/container_paths.py).
"""

from __future__ import annotations

import posixpath

MAX_PATH = 4096


class BadWorkingDir(ValueError):
    """A working_dir that leaves the job's code (absolute, `..`, NUL); the message says why."""


def working_dir_prefix(working_dir: str) -> str:
    """The normalised working_dir relative to the code root: "" for the root itself ("", "."), else
    `sub/dir` (no leading or trailing slash). Refuses one that is absolute or leads out of the code."""
    if "\x00" in working_dir or len(working_dir) > MAX_PATH:
        raise BadWorkingDir(f"working_dir {working_dir[:64]!r} is not a usable path")
    norm = posixpath.normpath(working_dir or ".")
    if norm.startswith("/") or norm == ".." or norm.startswith("../"):
        raise BadWorkingDir(f"working_dir {working_dir!r} must be relative and stay inside the code")
    return "" if norm == "." else norm


def in_code(working_dir: str, path: str) -> str:
    """Where the relative artifact `path` (as the workflow writes it, and as it is recorded) is in the job's
    code: working_dir/path, normalised. A path that leaves working_dir is refused as the CLI refuses it."""
    norm = posixpath.normpath(path)
    if not path or path.startswith("/") or norm == ".." or norm.startswith("../") or "\x00" in path:
        raise ValueError(f"artifact path {path!r} must be relative and stay inside the working directory")
    prefix = working_dir_prefix(working_dir)
    return posixpath.join(prefix, norm) if prefix and norm != "." else (prefix or norm)


def recorded(working_dir: str, code_path: str) -> str:
    """The inverse of in_code: the path a file at `code_path` (relative to the code root, inside working_dir)
    is recorded under."""
    prefix = working_dir_prefix(working_dir)
    if not prefix:
        return code_path
    if not code_path.startswith(prefix + "/"):
        raise ValueError(f"{code_path!r} is not inside working_dir {prefix!r}")
    return code_path[len(prefix) + 1 :]
