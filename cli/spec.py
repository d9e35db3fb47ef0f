"""Typed workflow specs, as the loader produces them from workflows.yaml."""

from __future__ import annotations

from dataclasses import dataclass, field

from dstack.cli.errors import Location
from dstack.cli.yamlsrc import Node
from dstack.protos.v1 import common_pb2


@dataclass(frozen=True)
class Artifact:
    path: str
    mount: bool = False


@dataclass
class Workflow:
    name: str
    provider: str
    node: Node  # every field as written, with locations (providers read their own fields here)
    location: Location
    help: str = ""
    depends_on: list[str] = field(default_factory=list)  # runtime dependencies: workflows run first, in the same run
    input_tags: list[str] = field(default_factory=list)  # tag dependencies: artifacts of the tagged run
    input_workflows: list[str] = field(default_factory=list)  # the latest run of these that finished done
    artifacts: list[Artifact] = field(default_factory=list)
    resources: common_pb2.Resources = field(default_factory=common_pb2.Resources)
    env: dict[str, str] = field(default_factory=dict)
    working_dir: str = ""
    before_run: list[str] = field(default_factory=list)
    image: str = ""
    ports: list[tuple[int, int]] = field(default_factory=list)  # (host, container)
    port_count: int = 0  # `ports: N`: free ports the agent picks when the job starts
    run_args: list[str] = field(default_factory=list)
    retry: common_pb2.RetryPolicy | None = None  # `retry: {limit, on}`; None: no new attempts
    max_duration_s: int = 0  # `max_duration`; 0: no limit  # extra `dstack run` arguments, for the provider
    cache: bool = False  # `cache: true`: the step cache may reuse a done run's artifacts (docs/reproducibility.md)
