"""Services added to the gRPC server as generic handlers only, not as registered methods.

The generated `add_*Servicer_to_server` calls both `add_generic_rpc_handlers` and
`add_registered_method_handlers`. grpc.aio's server (grpcio 1.6x and later) keeps one pending
"request a call" task per registered method, and for every call it accepts it waits on all of them
(`asyncio.wait(..., FIRST_COMPLETED)`): a done-callback added to and removed from each, per RPC. The
coordinator serves about 55 methods, so each SubmitRun or GetRun paid for 55 (measured: about 60 us of
the server's CPU per unary call, 20% of a trivial call's cost). With generic handlers alone the server
waits on one pending request, and finds the method by name in a dict, as the generic handler always
did: every method is served exactly as before, with the same interceptors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import grpc


class _GenericOnly:
    """Stands in for the server in a generated `add_*Servicer_to_server` call."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        """Left out on purpose (see the module's docstring): the generic handler serves these methods."""


def generic_only(server: grpc.aio.Server) -> grpc.aio.Server:
    """`server`, as the generated adders should see it: they register generic handlers only."""
    return cast(grpc.aio.Server, _GenericOnly(server))
