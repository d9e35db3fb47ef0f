"""The two ends of a tunnel: one TCP connection relayed over one gRPC stream of `TunnelFrame`s.

The CLI (a local connection it accepted) and the agent (its connection to the job's port) run the same
relay (docs/tunnels.md): bytes read from the socket go out as `data` frames, the socket's EOF as an
`eof` frame (a TCP half-close: the other way stays open, so "send a request, close, read the answer"
works); frames read from the stream are written to the socket, with the socket's `drain` as
back-pressure, and an `eof` frame half-closes it. The relay ends once both ways are closed, or at the
first error (then the socket is reset and the call cancelled, so the far end sees it).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Sequence
from typing import Any

import grpc

from dstack.protos.v1 import common_pb2

# Bytes per data frame: large enough that per-frame costs (protobuf, HTTP/2 framing, a task switch) are
# small next to the copy, small enough to keep the memory a tunnel holds bounded (one frame per hop).
FRAME_BYTES = 256 << 10

# HTTP/2 windows for tunnel channels: gRPC's default starts at 64 KiB and grows by BDP probing, which
# on a fast link takes many round trips; a tunnel frame is 256 KiB.
CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.http2.lookahead_bytes", 4 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]


class TunnelError(Exception):
    """The far end reported why the tunnel closed (its `error` frame)."""


def tune(sock: socket.socket | None) -> None:
    """No Nagle delay on small writes (an interactive protocol's round trip must not wait 40 ms)."""
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def relay(
    call: Any,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    closing: asyncio.Future[str] | None = None,
) -> None:
    """Relays between `writer`/`reader` (one TCP connection) and `call` (a grpc.aio stream-stream call
    whose first frames were exchanged already) until both directions are closed.

    Raises TunnelError when the far end sent an `error` frame, grpc.aio.AioRpcError when the stream
    failed; either way the socket is reset (not closed cleanly), so the local peer knows. `closing`,
    once set to a reason, ends the relay: the far end gets the reason as an `error` frame."""
    tune(writer.get_extra_info("socket"))

    async def outbound() -> None:  # socket -> stream
        while True:
            data = await reader.read(FRAME_BYTES)
            if not data:
                await call.write(common_pb2.TunnelFrame(eof=True))
                return
            await call.write(common_pb2.TunnelFrame(data=data))

    async def inbound() -> None:  # stream -> socket
        while True:
            frame = await call.read()
            if frame is grpc.aio.EOF:
                break
            if frame.error:
                raise TunnelError(frame.error)
            if frame.data:
                writer.write(frame.data)
                await writer.drain()
            if frame.eof:
                break
        if writer.can_write_eof():
            writer.write_eof()

    tasks = [asyncio.ensure_future(outbound()), asyncio.ensure_future(inbound())]
    try:
        pending: set[asyncio.Future[Any]] = set(tasks)
        while pending:
            done, pending = await asyncio.wait(
                pending if closing is None else {*pending, closing}, return_when=asyncio.FIRST_COMPLETED
            )
            if closing is not None and closing.done():
                await _close_with(call, tasks, writer, closing.result())
                return
            for t in done:
                t.result()  # the first error ends the relay
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await call.done_writing()
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        reset(writer)
        call.cancel()
        raise


async def _close_with(call: Any, tasks: Sequence[asyncio.Future[None]], writer: asyncio.StreamWriter, why: str) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    with contextlib.suppress(Exception):  # best effort: the stream may be gone already
        await asyncio.wait_for(call.write(common_pb2.TunnelFrame(error=why)), 2.0)
    reset(writer)
    call.cancel()


def reset(writer: asyncio.StreamWriter) -> None:
    """Closes the connection with a reset: its peer learns the tunnel broke, not that the data ended."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
