"""The in-process tier: `async def` tests run on an event loop of their own (no pytest plugin needed)."""

from __future__ import annotations

import asyncio
import inspect

import pytest

# A hung test fails with a traceback instead of blocking the suite; no test here needs a tenth of it.
TEST_TIMEOUT_S = 60.0


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    args = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}

    async def bounded() -> None:
        async with asyncio.timeout(TEST_TIMEOUT_S):
            await pyfuncitem.obj(**args)

    asyncio.run(bounded())
    return True
