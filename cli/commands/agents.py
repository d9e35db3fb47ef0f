"""`dstack agents`: the pool."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dstack.protos.v1 import client_pb2, common_pb2

GIB = 1 << 30
MIB = 1 << 20


def status_of(a: client_pb2.Agent) -> str:
    """The agent's status: `draining` while its disk is below its floor (no new job goes there)."""
    return "draining" if a.status == "online" and a.inventory.disk_full else a.status


def disk_of(inv: common_pb2.Inventory) -> str:
    """Free space in its work folder, and the floor it keeps there (`dstack agent --min-free-disk`)."""
    free, floor = inv.disk_free_bytes, inv.min_free_disk_bytes
    text = f"{free / GIB:.1f} GiB free" if free >= GIB else f"{free // MIB} MiB free"
    if inv.disk_full:
        return f"{text}: full (below {floor // MIB} MiB)"
    return text + (f" (keeps {floor // MIB} MiB)" if floor else "")


def agents_command(as_json: bool) -> None:
    from dstack.cli.session import connect

    agents = connect().list_agents()
    if as_json:
        out = []
        for a in agents:
            inv = a.inventory
            out.append(
                {
                    "name": a.name,
                    "host": inv.hostname,
                    "address": inv.advertise_address,
                    "status": a.status,
                    "runtime": inv.runtime,
                    "cpu": inv.cpu_count,
                    "memory_bytes": inv.memory_total_bytes,
                    "memory_available_bytes": inv.memory_available_bytes,
                    "running_jobs": a.running_jobs,
                    "disk_free_bytes": inv.disk_free_bytes,
                    "min_free_disk_bytes": inv.min_free_disk_bytes,
                    "work_dir": inv.work_dir,
                    "draining": "disk full" if inv.disk_full else "",
                    "gpus_free": len(inv.gpus) - len(a.busy_gpu_indices),
                    "gpus": [
                        {
                            "index": g.index,
                            "name": g.name,
                            "uuid": g.uuid,
                            "memory_bytes": g.memory_total_bytes,
                            "memory_total_bytes": g.memory_total_bytes,
                            "memory_used_bytes": g.memory_used_bytes,
                            "utilization_percent": g.utilization_percent,
                            "temperature_c": g.temperature_c,
                            "busy": g.index in a.busy_gpu_indices,
                            "simulated": g.simulated,
                        }
                        for g in inv.gpus
                    ],
                }
            )
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    from dstack.cli.term import Term

    rows: list[list[str | tuple[str, str]]] = []
    for a in agents:
        inv = a.inventory
        gpus = "-"
        if inv.gpus:
            names = sorted({g.name for g in inv.gpus})
            free = len(inv.gpus) - len(a.busy_gpu_indices)
            used = sum(g.memory_used_bytes for g in inv.gpus) / GIB
            total = sum(g.memory_total_bytes for g in inv.gpus) / GIB
            util = sum(g.utilization_percent for g in inv.gpus) / len(inv.gpus)
            gpus = f"{free}/{len(inv.gpus)} free, {', '.join(names)}"
            gpus += f"; memory {used:.0f}/{total:.0f} GiB used, util {util:.0f}%"
            if any(g.simulated for g in inv.gpus) and not any("simulated" in n for n in names):
                gpus += " (simulated)"
        rows.append(
            [
                a.name,
                inv.hostname,
                inv.advertise_address or "-",
                status_of(a),
                inv.runtime,
                gpus,
                str(inv.cpu_count),
                f"{inv.memory_available_bytes / GIB:.0f}/{inv.memory_total_bytes / GIB:.0f} GiB free",
                disk_of(inv),
                str(a.running_jobs),
            ]
        )
    headers = ("AGENT", "HOST", "ADDRESS", "STATUS", "RUNTIME", "GPUS", "CPU", "MEMORY", "DISK", "JOBS")
    Term().table(headers, rows, overflow="fold")


def remove_command(name: str) -> None:
    from dstack.cli.session import connect

    failed = connect().remove_agent(name)
    jobs = f"; {failed} running job(s) failed" if failed else ""
    print(f"agent {name} removed: its credential is revoked and its connection dropped{jobs}")


def approve_command(name: str) -> None:
    from dstack.cli.session import connect

    connect().approve_agent(name)
    print(f"agent {name} approved: it gets jobs from now on")
