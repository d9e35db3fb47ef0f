"""The outbox beyond its memory bound: lines spool to disk in order, come back as acknowledgements make
room, are sent once (again only after a reconnect, from the acknowledged position), and a job owing
its bound waits instead of growing memory or losing lines."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from dstack.agent.outbox import LINE_OVERHEAD, Outbox, OutboxBounds
from dstack.agent.spool import Spool
from dstack.protos.v1 import common_pb2

OUT = common_pb2.LOG_STREAM_STDOUT
LINE = 10 + LINE_OVERHEAD  # the cost of one "line-NNNNN"
BOUNDS = OutboxBounds(
    memory_bytes=40 * LINE, job_memory_bytes=20 * LINE, job_bytes=10_000 * LINE, total_bytes=20_000 * LINE
)


def outbox(tmp_path: Path, bounds: OutboxBounds = BOUNDS) -> Outbox:
    return Outbox(max_lines_per_message=7, spool_dir=tmp_path / "outbox", bounds=bounds)


async def add(ob: Outbox, job: str, first: int, n: int) -> None:
    for i in range(first, first + n):
        ob.add_line(job, OUT, f"line-{i:05d}")
        if i % 50 == 0:
            await ob.room(job)  # what the job's reader does after each chunk
    await ob.room(job)


async def drain(ob: Outbox, ack: bool = True) -> dict[str, list[tuple[int, str]]]:
    """What the session would send (and the coordinator acknowledge) until nothing is left."""
    got: dict[str, list[tuple[int, str]]] = {}
    while True:
        await ob.refill()
        msg = ob.take_logs()
        if msg is None:
            return got
        for batch in msg.logs:
            got.setdefault(batch.job_id, []).extend((ln.seq, ln.text) for ln in batch.lines)
            if ack:
                ob.ack_logs(batch.job_id, batch.lines[-1].seq)


def test_lines_beyond_memory_spool_to_disk_and_arrive_once_in_order(tmp_path: Path) -> None:
    async def main() -> None:
        ob = outbox(tmp_path)
        await add(ob, "j", 0, 1000)
        assert ob.memory_bytes() <= BOUNDS.job_memory_bytes  # the rest waits on disk
        assert list((tmp_path / "outbox" / "j").iterdir())
        got = await drain(ob)
        assert got["j"] == [(i + 1, f"line-{i:05d}") for i in range(1000)]
        ob.mark_finished("j")
        await asyncio.sleep(0.1)  # the spool's folder is removed in the background
        assert ob.jobs_with_pending() == set()
        assert not (tmp_path / "outbox" / "j").exists()

    asyncio.run(main())


def test_memory_stays_bounded_across_jobs_while_nothing_is_acknowledged(tmp_path: Path) -> None:
    async def main() -> None:
        ob = outbox(tmp_path)
        for job in ("a", "b", "c"):
            await add(ob, job, 0, 500)
        # Each job keeps at least one line in memory (so it always makes progress), whatever the others hold.
        assert ob.memory_bytes() <= BOUNDS.memory_bytes + 3 * LINE
        got = await drain(ob)
        for job in ("a", "b", "c"):
            assert [t for _, t in got[job]] == [f"line-{i:05d}" for i in range(500)]

    asyncio.run(main())


def test_a_reconnect_resends_from_the_acknowledged_position_and_the_spool_follows(tmp_path: Path) -> None:
    async def main() -> None:
        ob = outbox(tmp_path)
        await add(ob, "j", 0, 300)
        first = await drain(ob, ack=False)  # written, never acknowledged: the stream broke
        sent = [seq for seq, _ in first["j"]]
        assert sent == list(range(1, len(sent) + 1)) and len(sent) < 300  # memory holds what is unacknowledged
        ob.on_new_stream({"j": 5})  # the coordinator stored 5 lines before the break
        await add(ob, "j", 300, 100)
        got = await drain(ob)
        assert got["j"] == [(i + 1, f"line-{i:05d}") for i in range(5, 400)]

    asyncio.run(main())


def test_a_job_owing_its_bound_waits_for_acknowledgements_instead_of_growing(tmp_path: Path) -> None:
    async def main() -> None:
        bounds = OutboxBounds(memory_bytes=40 * LINE, job_memory_bytes=20 * LINE, job_bytes=100 * LINE)
        ob = outbox(tmp_path, bounds)
        for i in range(100):
            ob.add_line("j", OUT, f"line-{i:05d}")
        assert ob.throttled("j")
        waiting = asyncio.create_task(ob.room("j"))
        await asyncio.sleep(0.1)
        assert not waiting.done()  # the job's output is not read meanwhile
        got = await drain(ob)  # the coordinator takes them
        await asyncio.wait_for(waiting, 5)
        assert len(got["j"]) == 100 and not ob.throttled("j")

    asyncio.run(main())


def test_the_total_bound_pauses_every_job(tmp_path: Path) -> None:
    async def main() -> None:
        bounds = OutboxBounds(memory_bytes=40 * LINE, job_memory_bytes=20 * LINE, total_bytes=100 * LINE)
        ob = outbox(tmp_path, bounds)
        for i in range(100):
            ob.add_line("big", OUT, f"line-{i:05d}")
        ob.add_line("small", OUT, "line-00000")
        assert ob.throttled("small")
        await drain(ob)
        assert not ob.throttled("small")

    asyncio.run(main())


def test_log_batches_stop_at_the_in_flight_bound_until_acknowledged(tmp_path: Path) -> None:
    async def main() -> None:
        bounds = OutboxBounds(inflight_bytes=14 * LINE)
        ob = Outbox(max_lines_per_message=7, bounds=bounds)
        for i in range(50):
            ob.add_line("j", OUT, f"line-{i:05d}")
        assert ob.take_logs() is not None and ob.take_logs() is not None
        assert ob.take_logs() is None  # 14 lines written and not acknowledged
        ob.ack_logs("j", 7)
        msg = ob.take_logs()
        assert msg is not None and msg.logs[0].lines[0].seq == 15

    asyncio.run(main())


def test_updates_are_taken_apart_from_logs(tmp_path: Path) -> None:
    from dstack.protos.v1 import agent_pb2

    async def main() -> None:
        ob = outbox(tmp_path)
        await add(ob, "j", 0, 100)
        ob.add_update(agent_pb2.JobUpdate(job_id="j", status=common_pb2.JOB_STATUS_RUNNING))
        ob.add_update(agent_pb2.JobUpdate(job_id="j", status=common_pb2.JOB_STATUS_DONE))
        control = ob.take_control()  # RUNNING at once, whatever the logs; DONE only after every line
        assert control is not None and [u.status for u in control.updates] == [common_pb2.JOB_STATUS_RUNNING]
        await drain(ob)
        control = ob.take_control()
        assert control is not None and [u.status for u in control.updates] == [common_pb2.JOB_STATUS_DONE]

    asyncio.run(main())


def test_spool_segments_are_deleted_once_read(tmp_path: Path) -> None:
    spool: Spool[common_pb2.LogLine] = Spool(tmp_path / "s", segment_bytes=1000)
    lines = [common_pb2.LogLine(seq=i, text="x" * 100) for i in range(1, 101)]
    for i in range(0, 100, 10):
        spool.append(lines[i : i + 10])
    assert len(list((tmp_path / "s").iterdir())) > 3
    back: list[common_pb2.LogLine] = []
    while chunk := spool.read(500):
        back.extend(chunk)
    assert [ln.seq for ln in back] == list(range(1, 101))
    assert list((tmp_path / "s").iterdir()) == []
    spool.append(lines[:3])  # writing again after catching up starts a fresh segment
    assert [ln.seq for ln in spool.read(10_000)] == [1, 2, 3]
    spool.remove()
    assert not (tmp_path / "s").exists()


def test_a_sender_cancelled_mid_refill_loses_no_line(tmp_path: Path) -> None:
    """The session's sender is cancelled when the stream breaks, maybe while lines are being read back
    from disk: they are accounted for all the same."""

    async def main() -> None:
        ob = outbox(tmp_path)
        await add(ob, "j", 0, 1000)
        got: list[int] = []
        for _ in range(200):
            refill = asyncio.create_task(ob.refill())
            await asyncio.sleep(0)  # the read is under way in its thread
            refill.cancel()
            await asyncio.gather(refill, return_exceptions=True)
            ob.on_new_stream({"j": got[-1] if got else 0})
            if (msg := ob.take_logs()) is not None:
                got.extend(ln.seq for ln in msg.logs[0].lines)
                ob.ack_logs("j", got[-1])
        got.extend(seq for seq, _ in (await drain(ob)).get("j", []))
        assert got == list(range(1, 1001))

    asyncio.run(main())


def test_a_full_disk_keeps_the_lines_in_memory_and_spools_them_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        ob = outbox(tmp_path)
        real = Spool.append
        failures = iter([True, True])

        def append(self: Spool[common_pb2.LogBlock], lines: list[common_pb2.LogBlock]) -> None:
            if next(failures, False):
                raise OSError(28, "No space left on device")
            real(self, lines)

        monkeypatch.setattr(Spool, "append", append)
        await add(ob, "j", 0, 1000)
        got = await drain(ob)
        assert got["j"] == [(i + 1, f"line-{i:05d}") for i in range(1000)]

    asyncio.run(main())
