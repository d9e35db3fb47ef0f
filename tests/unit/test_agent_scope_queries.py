"""Each check of coordinator/app/agent_scope.py costs one indexed query (coordinator/store/scope.py):
every agent call pays it, so none may scan the jobs or runs tables."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dstack.coordinator.store import Store


@pytest.mark.parametrize(
    "check",
    [
        lambda s: s.agent_acting_job("agent", "job"),
        lambda s: s.agent_reportable("agent", ["job-1", "job-2-a2", "job-1"]),
        lambda s: s.agent_has_code("agent", "0" * 64),
        lambda s: s.agent_input_sources("agent"),
    ],
    ids=["acting_job", "reportable", "has_code", "input_sources"],
)
def test_a_scope_check_is_one_indexed_query(tmp_path: Path, check: Callable[[Store], Any]) -> None:
    store = Store(tmp_path / "state.db")
    statements: list[str] = []
    store.conn.set_trace_callback(statements.append)
    check(store)
    store.conn.set_trace_callback(None)
    assert len(statements) == 1, statements
    plan = [r[3] for r in store.conn.execute("EXPLAIN QUERY PLAN " + statements[0])]
    scans = [step for step in plan if step.startswith("SCAN") and "VIRTUAL TABLE" not in step]
    assert not scans, plan
    store.close()
