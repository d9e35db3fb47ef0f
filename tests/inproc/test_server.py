"""server.start(): what serve() and this tier share, started and stopped within one process."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from dstack.coordinator.server import ADDRESS_IN_USE, StartError, start
from tests.inproc.factories import coordinator

pytestmark = pytest.mark.inproc


async def test_a_refused_start_lets_go_of_the_state_directory(tmp_path: Path) -> None:
    async with coordinator(tmp_path / "first") as h:
        # The same state directory while its coordinator runs: refused by the lock.
        with pytest.raises(StartError, match="another coordinator"):
            await start(dataclasses.replace(h.config, listen="127.0.0.1:0"))
        # Another state directory on the busy port: refused after taking that directory's lock...
        other = dataclasses.replace(h.config, state_dir=tmp_path / "second", listen=h.address)
        with pytest.raises(StartError, match=re.escape(ADDRESS_IN_USE)):
            await start(other)
        # ...which it gave back: the next start there succeeds.
        second = await start(dataclasses.replace(other, listen="127.0.0.1:0"))
        assert second.port not in (0, h.coordinator.port)
        await second.stop()
