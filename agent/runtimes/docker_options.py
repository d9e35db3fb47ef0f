"""What the agent knows of Docker before it uses it: its options and the engine's address. Apart from
runtimes/docker.py so that an agent of another runtime (host, null) starts without importing the Docker
SDK and requests (about 0.15 s of CPU per start: the test suite starts agents some 150 times)."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class DockerOptions:
    """Per agent (`dstack agent --docker-*`): the images and the network its containers get."""

    bash_image: str = "debian:bookworm-slim"
    python_image: str = "python:{version}-slim"  # {version}: the python provider's `version`
    cuda_image: str = "nvidia/cuda:12.4.1-base-ubuntu22.04"  # jobs with GPUs and no image of their own
    network: str = "bridge"  # bridge (ports published HOST:CONTAINER), host (no mapping), none
    base_url: str = ""  # empty: DOCKER_HOST, else the default socket


def engine_address(base_url: str = "") -> str:
    return base_url or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
