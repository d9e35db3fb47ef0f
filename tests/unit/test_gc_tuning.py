"""The coordinator process raises CPython's collection thresholds before it serves (coordinator/gc_tuning.py:
at 5,000 agents and 100,000 queued jobs the defaults ran a full collection every 3-4 s that stopped the
event loop for up to seconds); importing the coordinator changes nothing."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import dstack.coordinator.main as coordinator_main
from dstack.coordinator.gc_tuning import GEN0, GEN1, GEN2


@pytest.fixture
def thresholds() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.set_threshold(*before)


def test_the_coordinator_sets_its_thresholds_before_it_serves(
    thresholds: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gc.set_threshold(700, 10, 10)  # CPython's defaults
    seen: list[tuple[int, int, int]] = []

    async def serve(config: Any, on_started: Any = None) -> None:
        seen.append(gc.get_threshold())

    monkeypatch.setattr(coordinator_main, "serve", serve)
    coordinator_main.main(["--state-dir", str(tmp_path / "state")])
    assert seen == [(GEN0, GEN1, GEN2)]


def test_importing_the_coordinator_leaves_the_thresholds_alone(thresholds: None) -> None:
    gc.set_threshold(700, 10, 10)
    import dstack.coordinator.server  # noqa: F401

    assert gc.get_threshold() == (700, 10, 10)
