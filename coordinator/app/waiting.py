"""The queue as users see it: every waiting job in the order of the last scheduling pass, with why it
waits and when it is expected to start (the engine's in-memory wait info; names from the store)."""

from __future__ import annotations

from dataclasses import dataclass

from dstack.coordinator.app.core import Core
from dstack.coordinator.model import JobStatus


@dataclass(frozen=True)
class QueueEntry:
    position: int  # 1-based in the last pass's order; 0: not ordered (waiting for its dependencies)
    run_name: str
    job_name: str
    owner: str
    workflow: str
    repository: str
    status: JobStatus
    submitted_at_ns: int
    reason: str  # a short code (planner's constants), e.g. "resources", "dependencies"
    message: str  # the sentence `dstack ps` shows
    eta_ns: int  # estimated start; 0: unknown


async def queue(core: Core) -> list[QueueEntry]:
    engine = core.engine
    waiting = [w.job_id for w in engine.queue.snapshot()]
    rows = await core.db(core.store.queued_jobs, waiting)
    info, reasons = engine.wait_info, engine.pending_reasons
    out: list[QueueEntry] = []
    for job_id in waiting:
        row = rows.get(job_id)
        if row is None:  # left the queue while it was read
            continue
        wi = info.get(job_id)
        out.append(
            QueueEntry(
                position=wi.position if wi else 0,
                run_name=row.run_name,
                job_name=row.job_name,
                owner=row.owner,
                workflow=row.workflow,
                repository=row.repository,
                status=row.status,
                submitted_at_ns=row.submitted_at,
                reason=wi.reason if wi else "",
                message=(wi.message if wi and wi.message else reasons.get(job_id, "")),
                eta_ns=wi.eta_ns if wi else 0,
            )
        )
    # Ordered jobs first, in their order; then the unordered ones in submission order.
    out.sort(key=lambda e: (e.position == 0, e.position, e.submitted_at_ns))
    return out
