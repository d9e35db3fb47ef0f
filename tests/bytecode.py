"""The checkout's bytecode, compiled once before the tests start their processes.

Every coordinator, agent and CLI that a test starts imports `dstack` from this checkout (tests/conftest.py sets
PYTHONPATH). Where PYTHONDONTWRITEBYTECODE is set (as on the CI machines) or the checkout is fresh, nothing is
cached, and each of those processes compiled every module it imports from source again: about a quarter of
the CPU it takes to start a coordinator or an agent (0.69 -> 0.51 CPU-s for `python -m dstack.coordinator
--help`, 0.55 -> 0.41 for the agent, 0.38 -> 0.31 for a `dstack run` that stops at a bad workflow file), times
thousands of processes a run. Python reads __pycache__ even when it may not write it, and checks each .pyc
against its source's size and mtime, so an edited file is never run from stale bytecode. An installed
dstack has its bytecode too (pip compiles at install), so the processes under test start as a user's do.
"""

from __future__ import annotations

import compileall
from pathlib import Path

# What is not the project's own code: environments, build outputs, caches (.git and other dot-folders too).
SKIP = {".venv", "build", "dist", "node_modules", "__pycache__"}


def compile_checkout(repo: Path) -> None:
    """Writes __pycache__ for every .py file under `repo`'s own folders (git ignores __pycache__). Once compiled,
    a call only compares timestamps; two xdist workers doing it at once are safe (each .pyc is written to a
    temporary file and renamed into place)."""
    for folder in sorted(repo.iterdir()):
        # Not the symlinks of dstack/ (they lead to these same folders) and nothing hidden.
        if folder.is_dir() and not folder.is_symlink() and not folder.name.startswith(".") and folder.name not in SKIP:
            compileall.compile_dir(folder, quiet=2, workers=1)
