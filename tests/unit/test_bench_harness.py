"""bench/_harness.py: a bench's processes' folder goes with `stop` (about 1,000 were left in /tmp in one
session), and waiting for agents ends at once when one exited, with its log, instead of after a bound that
a loaded machine's slow starts outgrew (30 s at load 60)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from bench._harness import Services


def test_stop_removes_the_folder_unless_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    svc = Services()
    (svc.tmp / "server").mkdir()
    (svc.tmp / "server" / "coordinator.db").write_bytes(b"x")
    svc.stop()
    assert not svc.tmp.exists()
    monkeypatch.setenv("DSTACK_BENCH_KEEP", "1")
    kept = Services()
    kept.stop()
    assert kept.tmp.is_dir()
    kept.tmp.rmdir()


def test_waiting_for_agents_ends_at_once_when_one_exited_and_shows_its_log() -> None:
    svc = Services()
    try:
        log = svc.tmp / "agent-1.log"
        with log.open("wb") as f:
            agent = subprocess.Popen([sys.executable, "-c", "print('no such option'); raise SystemExit(2)"], stdout=f)
        svc.procs.append(agent)
        svc.logs[agent.pid] = log
        agent.wait()
        began = time.monotonic()
        with pytest.raises(RuntimeError, match=r"exited with 2:\nno such option"):
            svc.wait_agents(1, timeout=600)  # no coordinator either: the exit is seen before any call
        assert time.monotonic() - began < 5
    finally:
        svc.stop()
