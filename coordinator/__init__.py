"""The coordinator: owns all state (SQLite) and every scheduling decision.

Public surface: `CoordinatorConfig` and `serve` (used by `dstack server` and the embedded local mode).
"""

from dstack.coordinator.config import CoordinatorConfig
from dstack.coordinator.server import serve

__all__ = ["CoordinatorConfig", "serve"]
