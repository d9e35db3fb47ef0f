"""The `dstack` module a 2022 custom provider program imports (`from dstack import Provider, Job`).

Put on the PYTHONPATH of a providers.yaml program's job by the agent (agent/provider_jobs.py), read-only.
The API is 2022's (dstackai/dstack 007d79a `cli/dstack/__init__.py`, June 2022, which ivan-bokov's
`providers/torchrun/main.py` was written against; `image_name` is April 2022's name for `image`, 2a45e5a):
`Provider(schema=...)` with `self.workflow.data`, `create_jobs()`, `start()`, `_resources()`; `Job`,
`Resources`, `Gpu`, `JobRef`. One difference: 2022's `start()` posted each job to dstack's server with the
user's token; this one writes them as JSON to the file named by $DSTACK_PROVIDER_JOBS_FILE, which the
agent reads when the program exits 0 (no credential in the job, nothing sent over the network).
Standard library only: the program's image needs nothing installed for it.
"""

from __future__ import annotations

import json
import os
import sys
from abc import abstractmethod
from pathlib import Path
from typing import Any

JOBS_VAR = "DSTACK_PROVIDER_JOBS_FILE"
DATA_VAR = "DSTACK_WORKFLOW_DATA"


class Gpu:
    def __init__(self, count: int | None = None, memory: str | None = None, name: str | None = None) -> None:
        self.count = count
        self.memory = memory
        self.name = name


class Resources:
    def __init__(
        self,
        cpu: int | None = None,
        memory: str | None = None,
        gpu: Gpu | None = None,
        shm_size: str | None = None,
        interruptible: bool | None = None,
    ) -> None:
        self.cpu = cpu
        self.memory = memory
        self.gpu = gpu
        self.shm_size = shm_size
        self.interruptible = interruptible


class JobRef:
    @abstractmethod
    def get_id(self) -> str | None: ...

    @abstractmethod
    def set_id(self, id: str | None) -> None: ...


class Job(JobRef):
    def __init__(
        self,
        image: str | None = None,
        commands: list[str] | None = None,
        environment: dict[str, str] | None = None,
        working_dir: str | None = None,
        artifacts: list[str] | None = None,
        port_count: int | None = None,
        ports: list[int] | None = None,
        resources: Resources | None = None,
        depends_on: list[JobRef] | None = None,
        master: JobRef | None = None,
        image_name: str | None = None,  # April 2022's keyword for `image`
    ) -> None:
        self.id: str | None = None
        self.image = image if image is not None else image_name
        self.commands = commands
        self.environment = environment
        self.working_dir = working_dir
        self.port_count = port_count
        self.ports = ports
        self.artifacts = artifacts
        self.resources = resources
        self.depends_on = depends_on
        self.master = master

    @property
    def image_name(self) -> str | None:
        return self.image

    def get_id(self) -> str | None:
        return self.id

    def set_id(self, id: str | None) -> None:
        self.id = id


class Workflow:
    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data


class Provider:
    def __init__(self, schema: str | None = None) -> None:
        self.workflow = Workflow(self._load_workflow_data())
        self.schema = schema
        self._validate_schema()

    @abstractmethod
    def create_jobs(self) -> list[Job]: ...

    def start(self) -> None:
        jobs = self.create_jobs()
        for i, job in enumerate(jobs):
            job.set_id(str(i))
        index = {id(j): i for i, j in enumerate(jobs)}

        def ref(j: JobRef) -> int:
            if id(j) not in index:
                sys.exit("depends_on and master must name jobs that create_jobs() returns")
            return index[id(j)]

        out = [_job_json(j, [ref(d) for d in j.depends_on or []], ref(j.master) if j.master else None) for j in jobs]
        path = os.environ.get(JOBS_VAR)
        if not path:
            sys.exit(f"{JOBS_VAR} is not set: run this provider with `provider: NAME` in .dstack/workflows.yaml")
        Path(path).write_text(json.dumps({"jobs": out}))
        print(f"dstack: {len(out)} job(s) for this run")

    def _validate_schema(self) -> None:
        if not self.schema:
            return
        if not Path(self.schema).is_file():
            sys.exit(f"{self.schema} is missing")
        try:  # as 2022 did, when the program's image has them (2022's providers listed them in requirements)
            import jsonschema
            import yaml
        except ImportError:
            print(f"dstack: {self.schema} not checked (jsonschema and pyyaml are not installed)", file=sys.stderr)
            return
        data = {k: v for k, v in self.workflow.data.items() if k not in ("name", "provider", "help", "deps")}
        if data.get("working_dir") == "":
            del data["working_dir"]
        with open(self.schema) as f:
            try:
                jsonschema.validate(data, yaml.safe_load(f))
            except jsonschema.ValidationError as e:
                sys.exit(f"There a syntax error in {os.getcwd()}/.dstack/workflows.yaml:\n\n{e}")

    def _resources(self) -> Resources | None:
        data = self.workflow.data.get("resources")
        if not data:
            return None
        resources = Resources()
        if data.get("cpu"):
            if not str(data["cpu"]).isnumeric():
                sys.exit("resources.cpu in workflows.yaml should be an integer")
            if int(data["cpu"]) > 0:
                resources.cpu = int(data["cpu"])
        if data.get("memory"):
            resources.memory = data["memory"]
        if str(data.get("gpu")).isnumeric() and int(data["gpu"]) > 0:
            resources.gpu = Gpu(int(data["gpu"]))
        for key in data:
            if key.endswith("/gpu") and len(key) > 4:
                if not str(data[key]).isnumeric():
                    sys.exit(f"resources.'{key}' in workflows.yaml should be an integer")
                if int(data[key]) > 0:
                    resources.gpu = Gpu(int(data[key]), name=key[:-4])
        if data.get("shm_size"):
            resources.shm_size = data["shm_size"]
        if data.get("interruptible"):
            resources.interruptible = data["interruptible"]
        if resources.cpu or resources.memory or resources.gpu or resources.shm_size or resources.interruptible:
            return resources
        return None

    @staticmethod
    def _load_workflow_data() -> dict[str, Any]:
        raw = os.environ.get(DATA_VAR)
        if raw is None:
            sys.exit(f"{DATA_VAR} is not set: run this provider with `provider: NAME` in .dstack/workflows.yaml")
        data = json.loads(raw)
        if not isinstance(data, dict):
            sys.exit(f"{DATA_VAR} is not a mapping")
        return data


def _job_json(job: Job, depends_on: list[int], master: int | None) -> dict[str, Any]:
    r = job.resources
    resources = None
    if r is not None:
        gpu = r.gpu
        resources = {
            "cpu": r.cpu,
            "memory": r.memory,
            "gpu": None if gpu is None else {"count": gpu.count, "memory": gpu.memory, "name": gpu.name},
            "shm_size": r.shm_size,
            "interruptible": r.interruptible,
        }
    return {
        "image": job.image,
        "commands": job.commands,
        "environment": job.environment,
        "working_dir": job.working_dir,
        "artifacts": job.artifacts,
        "port_count": job.port_count,
        "ports": job.ports,
        "resources": resources,
        "depends_on": depends_on,
        "master": master,
    }
