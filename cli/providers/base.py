"""The provider interface and the parts every provider shares."""

from __future__ import annotations

import abc
from typing import Any

from dstack.cli.spec import Workflow
from dstack.protos.container_paths import is_container_path
from dstack.protos.v1 import common_pb2


class Provider(abc.ABC):
    name: str
    schema: dict[str, Any] = {}  # the provider's own workflow fields, as JSON Schema
    required: tuple[str, ...] = ()
    needs_container: bool = False  # its jobs run only on agents with a container runtime
    # `dstack run WORKFLOW ARGS...`: the provider hands ARGS to the job (else only `${{ run.args }}` uses them).
    passes_run_args: bool = False
    # Fields that name a file of the project (relative to the working directory): checked before submitting.
    code_file_fields: tuple[str, ...] = ()
    # Takes fields of its own that the CLI does not know (2022 custom providers: `nodes`, `resources.nodes`...).
    open_fields: bool = False

    @property
    def fields(self) -> frozenset[str]:
        return frozenset(self.schema)

    def validate(self, wf: Workflow) -> None:
        """Raises ProviderError (with the field's location) for a workflow it cannot run."""
        self.commands(wf)

    @abc.abstractmethod
    def commands(self, wf: Workflow) -> list[str]:
        """The shell commands that run the workflow."""

    def image(self, wf: Workflow) -> str:
        """The image when the workflow names none; empty: the agent's default for the provider."""
        return ""

    def code_file(self, wf: Workflow, key: str) -> str:
        """The project file that field `key` of `code_file_fields` names (empty: none)."""
        value = wf.node.get(key)
        return value if isinstance(value, str) else ""

    def python_version(self, wf: Workflow) -> str:
        """The Python version a container runtime picks its image by (the agent maps it to an image)."""
        return ""

    def job_specs(self, wf: Workflow) -> list[common_pb2.JobSpec]:
        return [
            common_pb2.JobSpec(
                job_name=wf.name,
                workflow=wf.name,
                provider=self.name,
                commands=[*wf.before_run, *self.commands(wf)],
                env=wf.env,
                working_dir=wf.working_dir,
                artifacts=[common_pb2.ArtifactSpec(path=a.path, mount=a.mount) for a in wf.artifacts],
                resources=wf.resources,
                image=wf.image or self.image(wf),
                python_version=self.python_version(wf),
                # An absolute artifact path is a folder inside the job's container (protos/container_paths.py).
                needs_container=self.needs_container or any(is_container_path(a.path) for a in wf.artifacts),
                ports=[common_pb2.PortSpec(host_port=h, container_port=c) for h, c in wf.ports],
                port_count=wf.port_count,
                depends_on=wf.depends_on,
                input_tags=wf.input_tags,
                input_workflows=wf.input_workflows,
                retry=wf.retry,
                max_duration_s=wf.max_duration_s,
            )
        ]
