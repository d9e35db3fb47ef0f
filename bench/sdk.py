"""Runs/s submitted from Python through the SDK (dstack.api) against `dstack run -d` subprocesses, in one run.

A coordinator and one agent with the null runtime (each job ends at once), so what is measured is the client
side and the control plane: each way submits runs of a one-job workflow from a git-less project and waits until
they are all done. The CLI pays an interpreter start, a config read, a pack of the code and a channel per run;
the SDK one channel, one pack of an unchanged tree (sent once) and a request per run.
Usage: python -m bench.sdk [SDK_RUNS] [CLI_RUNS]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench._harness import ADMIN, Services
from dstack.api import Client, Run

WORKFLOWS = "workflows:\n  - name: noop\n    provider: bash\n    commands: ['true']\n"


def project() -> Path:
    root = Path(tempfile.mkdtemp(prefix="dstack-bench-sdk-"))
    (root / ".dstack").mkdir()
    (root / ".dstack" / "workflows.yaml").write_text(WORKFLOWS)
    (root / "train.py").write_text("print('hello')\n")
    return root


def timed(label: str, n: int, submit: Callable[[], list[Run]], client: Client) -> tuple[str, int, float, float]:
    t0 = time.monotonic()
    runs = submit()
    submitted = time.monotonic() - t0
    statuses = client.runs.wait(runs, timeout=1800)
    wall = time.monotonic() - t0
    bad = sum(s != "done" for s in statuses)
    if bad:
        raise SystemExit(f"{label}: {bad} of {n} runs did not end done")
    return label, n, n / submitted, n / wall


def main() -> None:
    sdk_runs = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    cli_runs = int(sys.argv[2]) if len(sys.argv) > 2 else 30
    svc = Services()
    root = project()
    try:
        svc.start_coordinator()
        svc.start_agent("bench-null", "--runtime", "null", "--max-jobs", "1000")
        svc.wait_agents(1)
        env = {**os.environ, **svc.cli_env(), "DSTACK_HOME": str(svc.tmp / "cli-home")}
        with Client(address=svc.address, token=ADMIN, ca_file=svc.ca_file, timeout=120) as client:
            client.runs.submit("noop", repo=root).wait(timeout=60)  # warm: the code is on the coordinator

            def cli() -> list[Run]:
                names = []
                for _ in range(cli_runs):
                    r = subprocess.run(
                        [sys.executable, "-m", "dstack.cli", "run", "-d", "noop"],
                        cwd=root,
                        env=env,
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                    names.append(r.stdout.strip())
                return [client.runs.get(n) for n in names]

            rows = [
                timed("`dstack run -d` (a process per run)", cli_runs, cli, client),
                timed(
                    "SDK runs.submit (one per call)",
                    sdk_runs,
                    lambda: [client.runs.submit("noop", repo=root) for _ in range(sdk_runs)],
                    client,
                ),
                timed(
                    "SDK runs.submit_many (SubmitRuns)",
                    sdk_runs,
                    lambda: client.runs.submit_many("noop", [[]] * sdk_runs, repo=root),
                    client,
                ),
            ]
    finally:
        svc.stop()
    base = rows[0][3]
    print(f"{'how':38} {'runs':>6} {'submitted/s':>12} {'done/s':>8} {'vs CLI':>7}")
    for label, n, sub, done in rows:
        print(f"{label:38} {n:>6} {sub:>12.1f} {done:>8.1f} {done / base:>6.1f}x")


if __name__ == "__main__":
    main()
