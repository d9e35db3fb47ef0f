"""Tiny runs of the log and soak benchmarks, so that they do not rot (no figure is checked: the CI
machines are shared; the benchmarks print their figures with a baseline of their own)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO


def bench(*args: str, timeout: float = 240, codes: tuple[int, ...] = (0,)) -> str:
    r = subprocess.run(
        [sys.executable, "-m", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=timeout,
    )
    assert r.returncode in codes, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def test_bench_logs_follows_every_line_once_in_order() -> None:
    out = bench("bench.logs", "2000", "0")
    assert "job -> agent -> coordinator -> dstack logs -f: 2,000 lines at" in out, out
    assert out.count("(every line once, in order)") == 2, out


def test_bench_soak_samples_and_reports() -> None:
    # A few seconds say nothing of a slope: its verdict (the exit status) is not checked here.
    out = bench("bench.soak", "--minutes", "0.15", "--interval", "3", "--rate", "2", "--lines", "20", codes=(0, 1))
    assert "RSS slope" in out and "log rows" in out, out
    assert "submissions refused or failed" in out, out
