"""A coordinator from before SubmitRuns, for the SDK's fallback (tests/integration/test_submit_batches.py):
the real coordinator, whose SubmitRuns answers UNIMPLEMENTED, as a server whose protocol lacks the method
does. Run as `python -m tests.old_coordinator` with the coordinator's own options."""

from __future__ import annotations

from typing import Any

import grpc

from dstack.coordinator.main import main
from dstack.coordinator.services.client import ClientService


async def _unimplemented(self: Any, request: Any, context: Any) -> None:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")


ClientService.SubmitRuns = _unimplemented  # type: ignore[method-assign,assignment]

if __name__ == "__main__":
    main()
