from coordinator.store.db import Store
from coordinator.store.schema import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION", "Store"]
