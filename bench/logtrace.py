"""Per-stage timestamps of `bench.logs` lines, in the agent, the coordinator and the `dstack logs -f` CLI.

Usage: python -m bench.logtrace ROLE MODULE [ARGS...]  (ROLE names the trace file; MODULE runs as __main__)

`bench.logs --trace` starts the agent, the coordinator and the follower through this module. It patches a
few of their functions (the product code is unchanged) to note, for every block of lines that passes, the
bench line numbers it holds (the job prints `<i> <ns>`) and when it passed, on CLOCK_MONOTONIC, which
every process on the host shares: so each stage's lag is that time minus the line's write time. A stage
is noted once per block, not per line. The notes go to $DSTACK_LOGTRACE_DIR/<role>-<pid>.tsv, written by
a thread every 50 ms: `stage first_line last_line monotonic_ns` per row.

Stages, in path order (what each time is):
  agent_read     the agent made a block of what it read from the job's pipe (Outbox.add_text)
  agent_sent     the block went into a log batch handed to the stream (Outbox.take_logs)
  coord_read     the coordinator read the agent's message off its stream (AgentService.Connect)
  handled        the stream's handler took the message from its inbox (agent_stream.Session.receive)
  db_start       the DB thread began storing the batch (Engine._insert_logs)
  stored         the batch is committed, acknowledged and followers notified (Engine.on_message returned)
  follower_read  the follower's read of the store returned the block (before its write to the client)
  follower_sent  the write of that response to the client's stream returned (services.rpc.write_or_drop)
  cli_received   the CLI's stream gave it the block (cli.commands.logs.log_batches)
and bench.logs adds `printed`: the bench read the line from the CLI's stdout.
"""

from __future__ import annotations

import atexit
import os
import runpy
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

STAGES = (
    "agent_read",
    "agent_sent",
    "coord_read",
    "handled",
    "db_start",
    "stored",
    "follower_read",
    "follower_sent",
    "cli_received",
    "printed",
)

_notes: list[tuple[str, int, int, int]] = []
_lock = threading.Lock()


def _index(line: str) -> int:
    head = line.split(" ", 1)[0]
    return int(head) if head.isdigit() else -1


def _span(text: str) -> tuple[int, int]:
    """The bench line numbers of the first and last line of a block's text (-1 where not a bench line)."""
    nl = text.rfind("\n")
    return _index(text[:80]), _index(text[nl + 1 : nl + 81] if nl >= 0 else text[:80])


def note(stage: str, texts: Iterable[str]) -> None:
    now = time.monotonic_ns()
    rows = [(stage, *_span(t), now) for t in texts]
    with _lock:
        _notes.extend(r for r in rows if r[1] >= 0)


def note_blocks(stage: str, blocks: Iterable[Any]) -> None:
    note(stage, (b.text for b in blocks))


def _flush(path: str) -> None:
    with _lock:
        rows, _notes[:] = list(_notes), []
    if rows:
        with open(path, "a") as f:
            f.write("".join(f"{s}\t{a}\t{b}\t{t}\n" for s, a, b, t in rows))


def _writer(path: str) -> None:
    while True:
        time.sleep(0.05)
        _flush(path)


def install_agent() -> None:
    from dstack.agent.outbox import Outbox

    add_text, take_logs = Outbox.add_text, Outbox.take_logs

    def traced_add_text(self: Outbox, job_id: str, stream: Any, text: str) -> None:
        note("agent_read", [text])
        add_text(self, job_id, stream, text)

    def traced_take_logs(self: Outbox) -> Any:
        msg = take_logs(self)
        if msg is not None:
            note_blocks("agent_sent", (blk for b in msg.logs for blk in b.blocks))
        return msg

    Outbox.add_text = traced_add_text  # type: ignore[method-assign]
    Outbox.take_logs = traced_take_logs  # type: ignore[method-assign]


def install_coordinator() -> None:
    from dstack.coordinator.app.agent_stream import Session
    from dstack.coordinator.engine import Engine
    from dstack.coordinator.services import client as client_service
    from dstack.coordinator.services.agent import AgentService

    connect, insert, on_message = AgentService.Connect, Engine._insert_logs, Engine.on_message
    receive = Session.receive
    write_or_drop = getattr(client_service, "write_or_drop")  # noqa: B009  (imported there, not exported)

    def blocks_of(msg: Any) -> Iterator[Any]:
        return (blk for b in msg.logs for blk in b.blocks)

    async def read_noting(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for msg in requests:
            note_blocks("coord_read", blocks_of(msg))
            yield msg

    async def traced_connect(self: Any, request_iterator: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        # An async generator function itself: grpc.aio tells a streaming handler by its kind.
        async for reply in connect(self, read_noting(request_iterator), context):
            yield reply

    async def traced_receive(self: Session, msg: Any, *args: Any) -> None:
        note_blocks("handled", blocks_of(msg))
        await receive(self, msg, *args)

    # *args: the same for trees whose engine takes more (or fewer) arguments.
    def traced_insert(self: Engine, logs: Any, *args: Any) -> Any:
        note_blocks("db_start", (blk for b in logs for blk in b.blocks))
        return insert(self, logs, *args)

    async def traced_on_message(self: Engine, agent_id: str, msg: Any, *args: Any, **kwargs: Any) -> Any:
        reply = await on_message(self, agent_id, msg, *args, **kwargs)
        note_blocks("stored", blocks_of(msg))
        return reply

    async def traced_write(limits: Any, context: Any, message: Any, what: str) -> None:
        blocks = [blk for j in getattr(message, "jobs", ()) for blk in j.blocks]
        note_blocks("follower_read", blocks)
        await write_or_drop(limits, context, message, what)
        note_blocks("follower_sent", blocks)

    AgentService.Connect = traced_connect  # type: ignore[method-assign]
    setattr(Session, "receive", traced_receive)  # noqa: B010  (any tree's signature)
    setattr(Engine, "_insert_logs", traced_insert)  # noqa: B010  (any tree's signature)
    setattr(Engine, "on_message", traced_on_message)  # noqa: B010
    setattr(client_service, "write_or_drop", traced_write)  # noqa: B010


def install_cli() -> None:
    from dstack.cli.commands import logs

    log_batches = logs.log_batches

    def traced(*args: Any, **kwargs: Any) -> Iterator[Any]:
        for batch in log_batches(*args, **kwargs):
            note_blocks("cli_received", (b for part in batch.jobs for b in part.blocks))
            yield batch

    logs.log_batches = traced


INSTALL = {"agent": install_agent, "coordinator": install_coordinator, "cli": install_cli}


def main() -> None:
    role, module, *args = sys.argv[1:]
    path = os.path.join(os.environ["DSTACK_LOGTRACE_DIR"], f"{role}-{os.getpid()}.tsv")
    INSTALL[role]()
    threading.Thread(target=_writer, args=(path,), daemon=True).start()
    atexit.register(_flush, path)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
