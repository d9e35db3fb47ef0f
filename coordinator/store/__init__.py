from dstack.coordinator.store.db import Store
from dstack.coordinator.store.schema import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION", "Store"]
