"""The coordinator's part of a tunnel (docs/tunnels.md): it pairs the CLI's stream with the one the
job's agent dials back, and relays frames between them.

1. The CLI's first frame names run, job and port; coordinator/app/tunnels.py checks the caller (the
   run's owner or an admin), that the job runs and declares the port, and finds its agent.
2. The agent gets `OpenTunnel` on its Connect stream with a fresh single-use id
   (coordinator/tunnel_registry.py), connects to the port, and dials back `AgentService.Tunnel`
   whose first frame names that id (or says why it could not connect: the CLI gets that message).
3. The CLI's handler relays both ways until both have sent `eof` (or one fails). Back-pressure: each
   direction forwards one frame at a time and awaits its write, which HTTP/2 flow control holds back
   while the receiver is slow: a tunnel holds at most a frame per direction here, never a queue.
4. Whoever ends first ends the other: the agent's handler waits on a future the CLI's handler sets
   with the outcome, and tells it when its own stream goes away.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import grpc

from dstack.coordinator.app import tunnels
from dstack.coordinator.app.core import Core
from dstack.coordinator.app.ownership import Actor
from dstack.coordinator.auth import agent_id, user_caller
from dstack.coordinator.errors import CoordinatorError
from dstack.coordinator.services.rpc import hold_stream, status_for
from dstack.protos.v1 import common_pb2

Ctx: TypeAlias = Any  # grpc.aio.ServicerContext: grpc ships no type information
Outcome: TypeAlias = "tuple[grpc.StatusCode, str] | None"  # None: the tunnel ended cleanly
log = logging.getLogger("dstack.coordinator")


def _future() -> asyncio.Future[Any]:
    return asyncio.get_running_loop().create_future()


@dataclass
class AgentSide:
    """The agent's stream of one tunnel, handed to the CLI's handler that relays it."""

    context: Ctx
    first: common_pb2.TunnelFrame
    outcome: asyncio.Future[Outcome] = field(default_factory=_future)  # set by the CLI's handler: end now
    gone: asyncio.Future[None] = field(default_factory=_future)  # set when the agent's handler ends


class _Broken(Exception):
    """A direction of the tunnel failed: (code, message) for the other side."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


async def client_tunnel(core: Core, context: Ctx) -> None:
    """ClientService.Tunnel."""
    who = user_caller()
    try:
        # Counted from the start: a client that opens tunnels and never names a target holds them too.
        hold_stream(core.streams, context, who.name, "a tunnel (dstack port-forward, attach)")
    except CoordinatorError as e:
        await context.abort(status_for(e) or grpc.StatusCode.UNKNOWN, str(e))
        return
    first = await context.read()
    if first is grpc.aio.EOF or not first.HasField("open"):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first frame must name the run and port (`open`)")
        return
    want = first.open
    if not 0 < want.port < 65536:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"port {want.port} is not a TCP port (1..65535)")
        return
    try:
        target = await tunnels.resolve(
            core, Actor(who.name, who.user_role, who.token_hash), want.run_name, want.job_name, want.port
        )
    except CoordinatorError as e:
        await context.abort(status_for(e) or grpc.StatusCode.UNKNOWN, str(e))
        return
    agent = await _dial_back(core, context, target)
    if agent is None:
        return
    what = f"port {target.port} of job {target.job_name} (run {target.run_name})"
    outcome: Outcome = (grpc.StatusCode.CANCELLED, "the client closed the tunnel")
    try:
        if agent.first.error:
            outcome = None
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{what}: {agent.first.error}")
            return
        outcome = await _relay(context, agent)
        if outcome is not None:
            code, message = outcome
            await context.abort(code, f"{what}: {message}")
    finally:
        if not agent.outcome.done():
            agent.outcome.set_result(outcome)


async def _dial_back(core: Core, context: Ctx, target: tunnels.Target) -> AgentSide | None:
    """Asks the job's agent to open the tunnel and waits for its stream (None: aborted with why not)."""
    tunnel_id, answer = core.tunnels.expect(target.agent_id)
    try:
        if not tunnels.ask_agent(core, target, tunnel_id):
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"the agent {target.agent_name} of job {target.job_name} is not connected right now; try again"
                " when it is back (`dstack agents`)",
            )
            return None
        try:
            side: AgentSide = await asyncio.wait_for(answer, tunnels.DIAL_BACK_S)
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"the agent {target.agent_name} did not open the tunnel within {tunnels.DIAL_BACK_S:.0f} s",
            )
            return None
        return side
    except BaseException:
        # Cancelled (the client went) just as the agent answered: its stream must not wait forever.
        if answer.done() and not answer.cancelled():
            claimed: AgentSide = answer.result()
            if not claimed.outcome.done():
                claimed.outcome.set_result((grpc.StatusCode.CANCELLED, "the client closed the tunnel"))
        raise
    finally:
        core.tunnels.forget(tunnel_id)


async def _pump(src: Ctx, dst: Ctx, from_agent: bool) -> None:
    """Forwards frames from one stream to the other until the sender's `eof` (or the stream's end)."""
    while True:
        try:
            frame = await src.read()
        except Exception as e:
            raise _Broken(
                grpc.StatusCode.UNAVAILABLE, f"the {'agent' if from_agent else 'client'} went away ({e})"
            ) from None
        if frame is grpc.aio.EOF:
            frame = common_pb2.TunnelFrame(eof=True)  # a sender that just ended its stream: the same as eof
        elif from_agent and frame.error:
            raise _Broken(grpc.StatusCode.FAILED_PRECONDITION, frame.error)
        elif frame.HasField("open") or frame.tunnel_id:
            raise _Broken(grpc.StatusCode.INVALID_ARGUMENT, "only the first frame of a tunnel names its target")
        try:
            await dst.write(frame)
        except Exception as e:
            raise _Broken(
                grpc.StatusCode.UNAVAILABLE, f"the {'client' if from_agent else 'agent'} went away ({e})"
            ) from None
        if frame.eof:
            return


async def _relay(client: Ctx, agent: AgentSide) -> Outcome:
    """Relays until both directions ended; the first failure, or the agent's stream ending, stops both."""
    up = asyncio.ensure_future(_pump(client, agent.context, from_agent=False))
    down = asyncio.ensure_future(_pump(agent.context, client, from_agent=True))
    try:
        while not (up.done() and down.done()):
            await asyncio.wait({up, down, agent.gone}, return_when=asyncio.FIRST_COMPLETED)
            for t in (up, down):
                if t.done() and t.exception() is not None:
                    e = t.exception()
                    if isinstance(e, _Broken):
                        return e.code, str(e)
                    raise e  # type: ignore[misc]
            if agent.gone.done() and not (up.done() and down.done()):
                return grpc.StatusCode.UNAVAILABLE, "the agent closed the tunnel"
        return None
    finally:
        for t in (up, down):
            t.cancel()
        await asyncio.gather(up, down, return_exceptions=True)


async def agent_tunnel(core: Core, context: Ctx) -> None:
    """AgentService.Tunnel: the agent's side, kept open until the CLI's handler says how it ended."""
    me = agent_id()
    first = await context.read()
    if first is grpc.aio.EOF or not first.tunnel_id:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first frame must carry the tunnel id")
        return
    side = AgentSide(context, first)
    try:
        core.tunnels.claim(first.tunnel_id, me, side)
    except CoordinatorError as e:
        log.warning("agent %s named a tunnel it was not asked to open: refused", me)
        await context.abort(status_for(e) or grpc.StatusCode.UNKNOWN, str(e))
        return
    try:
        outcome = await side.outcome
    finally:
        if not side.gone.done():
            side.gone.set_result(None)
    if outcome is not None:
        await context.abort(outcome[0], outcome[1])
