"""The coordinator's SQLite database: one module per resource, typed rows, one `Store` handle."""

from dstack.coordinator.store.db import *  # noqa: F403
from dstack.coordinator.store.db import __all__ as _rows
from dstack.coordinator.store.schema import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION", *_rows]
