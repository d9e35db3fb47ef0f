"""The repository the current project belongs to: what `dstack run`, `tags` and `artifacts upload` send.

The project is the nearest folder with .dstack/ at or above the current one (else the current folder);
its repository is its git `origin` remote, normalised (protos/repos.py), else `local/<folder name>`,
which the coordinator makes the user's own (`local/<user>/<folder>`).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from dstack.cli.errors import CliError
from dstack.protos.repos import folder_repository, repository_from_remote


def project_folder(cwd: Path) -> Path:
    from dstack.cli.workflows import find_project_root

    try:
        return find_project_root(cwd)
    except CliError:
        return cwd


def origin_url(root: Path) -> str:
    """`remote.origin.url` of the git checkout holding `root`, or "" (no git, no remote)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "config", "--get", "remote.origin.url"],
            capture_output=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.decode("utf-8", errors="replace").strip() if out.returncode == 0 else ""


def repository_of(root: Path, remote_url: str) -> str:
    """The repository of the project at `root` whose origin remote is `remote_url` ("" for none)."""
    return repository_from_remote(remote_url) or folder_repository(root.resolve().name or "root")


def current_repository(cwd: Path | None = None) -> str:
    root = project_folder(cwd or Path.cwd())
    return repository_of(root, origin_url(root))
