"""The agent's side of the Python environment cache: where it is, its bound, and what a job is told.

The work is done by `env_helper.py`, which each python-provider job runs with its own interpreter
(on the host, or in its container); the agent only makes the folder and passes the variables below.
See docs/lifecycle.md, "Python environments".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from dstack.agent import env_helper

HELPER = Path(env_helper.__file__).resolve()
DEFAULT_SIZE = "20GiB"
# Inside containers: fixed paths, since a venv only works at the path it was created at.
CONTAINER_CACHE = "/var/lib/dstack/envs"
CONTAINER_HELPER = "/usr/local/lib/dstack/env_helper.py"
HELPER_VAR = "DSTACK_ENV_HELPER"  # the provider's commands run the helper when this names a file

_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """`20GiB`, `500MB`, `10G`, `123` (bytes), `0` -> bytes (k/M/G/T are powers of 1000; with an i, of 1024)."""
    m = _SIZE.match(text)
    if m is None:
        raise ValueError(f"not a size: {text!r} (expected e.g. 20GiB, 500MB or 0)")
    number, unit, binary = m.groups()
    unit = unit.lower()
    if binary and not unit:
        raise ValueError(f"not a size: {text!r} (expected e.g. 20GiB, 500MB or 0)")
    scale = 1024 ** "kmgt".index(unit) * 1024 if binary else _UNITS[unit]
    return int(float(number) * scale)


@dataclass(frozen=True)
class EnvCache:
    folder: Path  # the agent's <home>/envs
    max_bytes: int  # 0: no cache, each job makes its own venv in its folder

    def host_env(self) -> dict[str, str]:
        return self._env(str(self.folder), str(HELPER))

    def container_env(self, image_id: str) -> dict[str, str]:
        # The image's id tells its Python apart from another image's with the same paths and version.
        return self._env(CONTAINER_CACHE, CONTAINER_HELPER) | {env_helper.ENV_SCOPE: image_id}

    def container_volumes(self) -> dict[str, dict[str, str]]:
        return {
            str(HELPER): {"bind": CONTAINER_HELPER, "mode": "ro"},
            str(self.folder): {"bind": CONTAINER_CACHE, "mode": "rw"},
        }

    def _env(self, folder: str, helper: str) -> dict[str, str]:
        return {
            HELPER_VAR: helper,
            env_helper.ENV_CACHE: folder,
            env_helper.ENV_MAX_BYTES: str(self.max_bytes),
        }


# Providers whose commands run the helper (cli/providers/python.py, cli/providers/devenv.py).
CACHED_PROVIDERS = frozenset({"python", "lab", "notebook"})


def applies_to(provider: str) -> bool:
    """Only the jobs of providers that use it get the cache (and, in containers, its mounts)."""
    return provider in CACHED_PROVIDERS
