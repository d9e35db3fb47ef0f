"""The cluster fixture's waits (tests/conftest.py): generous bounds for a loaded machine's slow starts
(a coordinator or agent took over 20 s at load 60+), so a process that exited must end the wait at once,
with its output, rather than after the bound."""

from __future__ import annotations

import time

import pytest

from tests.conftest import START_TIMEOUT_S, Cluster

pytestmark = pytest.mark.integration


def test_an_agent_that_exits_at_its_start_fails_the_wait_at_once_with_its_output(cluster: Cluster) -> None:
    began = time.monotonic()
    with pytest.raises(AssertionError, match=r"agent agent-1 exited with 2:[\s\S]*--no-such-option"):
        cluster.start_agent("agent-1", "--no-such-option")  # no coordinator either: it never answers
    assert time.monotonic() - began < START_TIMEOUT_S / 2


def test_a_coordinator_that_exits_at_its_start_fails_the_wait_at_once_with_its_output(cluster: Cluster) -> None:
    began = time.monotonic()
    with pytest.raises(AssertionError, match=r"the coordinator exited with 2:[\s\S]*--no-such-option"):
        cluster.start_coordinator("--no-such-option")
    assert time.monotonic() - began < START_TIMEOUT_S / 2
