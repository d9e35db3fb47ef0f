"""What every use case works with: the engine, the store on its DB thread, and the object store."""

from __future__ import annotations

from dataclasses import dataclass, field

from dstack.coordinator.artifacts import Artifacts
from dstack.coordinator.convert import run_to_proto
from dstack.coordinator.engine import Engine
from dstack.coordinator.store import Store
from dstack.coordinator.store.executor import DbExecutor
from dstack.protos.v1 import client_pb2
from dstack.storage import ArtifactStore


@dataclass
class Core:
    engine: Engine
    artifacts: Artifacts
    store: Store = field(init=False)
    db: DbExecutor = field(init=False)
    objects: ArtifactStore = field(init=False)

    def __post_init__(self) -> None:
        self.store = self.engine.store
        self.db = self.engine.db
        self.objects = self.artifacts.store

    @property
    def local_mode(self) -> bool:
        return self.engine.config.local_mode

    def load_run(self, name: str) -> client_pb2.Run:
        """A run as clients see it (on the DB thread)."""
        row = self.store.run_by_name(name)
        jobs = self.store.jobs_of_runs([row.id])[row.id]
        tags = self.store.tags_of_runs([row.id])[row.id]
        return run_to_proto(row, jobs, tags, self.engine.pending_reasons)

    async def run(self, name: str) -> client_pb2.Run:
        return await self.db(self.load_run, name)
