"""Each check of coordinator/app/agent_scope.py costs one indexed query (coordinator/store/scope.py):
every agent call pays it, so none may scan the jobs or runs tables."""

from __future__ import annotations

import logging
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


def test_dropped_messages_are_logged_at_most_once_a_minute_per_agent(caplog: pytest.LogCaptureFixture) -> None:
    """A rogue agent that floods forged lines gets one warning a minute, which counts the rest."""
    from dstack.coordinator.app import agent_scope

    with caplog.at_level(logging.WARNING, logger="dstack.coordinator"):
        for i in range(1000):
            agent_scope.dropped("rogue-x", "lines", "1 log line(s)", "j1", now=1000.0 + i * 0.01)
        agent_scope.dropped("other-y", "update", "a status update", "j2", now=1000.0)
        agent_scope.dropped("rogue-x", "lines", "1 log line(s)", "j1", now=1000.0 + 61)
    lines = [r.getMessage() for r in caplog.records]
    assert len([ln for ln in lines if "rogue-x" in ln]) == 2
    assert "(999 more dropped since the last warning)" in lines[-1]
    assert any("other-y" in ln for ln in lines)
