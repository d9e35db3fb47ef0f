"""The deep queue's path through the real coordinator: heads-only passes place (planner.place_heads),
and reasons, positions, estimates and reservations come from full passes beside them (Engine._refresh_info).

A coordinator takes that path only over more than FULL_QUEUE waiting jobs; here it takes it from the
first job (and the full passes have no cadence), and the fair-share, quota, priority, reservation,
estimate and preemption cases of test_fairshare.py and test_preemption.py must hold as they are.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dstack.coordinator import engine as engine_module
from dstack.coordinator.engine import Engine
from tests.inproc import test_fairshare as fairshare
from tests.inproc import test_preemption as preemption

pytestmark = pytest.mark.inproc

CASES: list[Callable[[Path], Awaitable[None]]] = [
    fairshare.test_b_submitting_after_a_flood_gets_the_next_free_gpu_within_one_job_duration,
    fairshare.test_fair_share_off_serves_first_come_first_served,
    fairshare.test_a_big_job_gets_a_host_reserved_after_reserve_after_and_starts_once_it_drains,
    fairshare.test_a_user_at_quota_waits_with_reason_quota_and_only_an_admin_sets_quotas,
    fairshare.test_priority_orders_a_users_own_jobs,
    fairshare.test_an_estimated_start_comes_from_the_running_jobs_expected_ends,
    preemption.test_a_user_below_fair_share_preempts_one_interruptible_job_which_runs_again_later,
    preemption.test_a_reservation_preempts_interruptible_jobs_on_the_reserved_host_only,
]


@pytest.fixture
def deep_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    monkeypatch.setattr(engine_module, "FULL_QUEUE", 0)
    monkeypatch.setattr(engine_module, "FULL_EVERY_S", 0.0)
    monkeypatch.setattr(engine_module, "FULL_SHARE", math.inf)
    counts = {"heads": 0, "info": 0, "small": 0}

    def counted(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(Engine, "_heads", counted("heads", Engine._heads))
    monkeypatch.setattr(Engine, "_info_snapshot", counted("info", Engine._info_snapshot))
    monkeypatch.setattr(Engine, "_plan", counted("small", Engine._plan))
    yield counts


@pytest.mark.parametrize("case", CASES, ids=[c.__name__.removeprefix("test_") for c in CASES])
async def test_scheduling_holds_on_the_deep_queue_path(
    case: Callable[[Path], Awaitable[None]], tmp_path: Path, deep_path: dict[str, int]
) -> None:
    await case(tmp_path)
    assert deep_path["heads"] and deep_path["info"]
    assert not deep_path["small"]
