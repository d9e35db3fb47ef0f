"""The agent's side of the lease: when it must stop its jobs itself (self-fencing, docs/lifecycle.md).

The coordinator requeues a lost agent's jobs `lease + fence margin` after the last message it received
from the agent, on its monotonic clock. The agent counts on its own monotonic clock from when it *sent*
the last renewal the coordinator acknowledged (a hello answered by its ack, or a heartbeat named by a
`lease_ack`): that send came before the coordinator received it, so the agent's deadline always falls at
least the margin before the coordinator's, whatever the network delayed. Past its deadline the agent
stops every job (process groups killed, containers removed), so no attempt runs on two agents at once.

One thing lets it keep its jobs past the deadline: proof that the coordinator is not running. A TCP
connection to the coordinator's port refused (RST, or a unix socket nobody listens on) at instant `t`
shows it was down at some instant after `t`; a coordinator that starts again extends every online
agent's lease by `lease + margin + reconnect grace` from its start, before its lease loop runs, and a
coordinator stops its lease loop before it stops listening (coordinator/server.py). So a refusal probed
at `t` is as good as a renewal sent at `t`, and better: the hello ack publishes the reconnect grace that
every later start gives on top (HelloAck.reconnect_grace_ms; coordinator/restart_lease.py keeps it across
restarts and option changes), so the jobs may run until `t + self_fence_after + grace`. That covers a
coordinator that is back and listening but answers the hello late (starting, or loaded: 11 s in one chaos
run, past the 8 s deadline). A partition that drops packets gives no refusal; a firewall
that *rejects* the port does, which is why the pool can ask for strict fencing (`--self-fence strict`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("dstack.agent")


@dataclass(frozen=True)
class FencePolicy:
    """What the coordinator asked in its hello ack. `after_s` 0: never fence (the pool's choice, or an
    older coordinator that does not hold back its requeue, so fencing would not prevent overlap anyway)."""

    after_s: float = 0.0
    strict: bool = False
    # How much longer than `after_s` a refused connection lets the jobs run (HelloAck.reconnect_grace_ms).
    refusal_grace_s: float = 0.0

    @property
    def on(self) -> bool:
        return self.after_s > 0


class LeaseGuard:
    """The agent's lease deadline on its monotonic clock (event loop only)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.policy = FencePolicy()
        self.deadline: float | None = None  # monotonic s; None: no lease counted (policy off, or never acked)
        self.changed = asyncio.Event()  # set on every renewal or policy change: the watchdog looks again
        self._sent: dict[int, float] = {}  # heartbeat seq (this stream) -> when it was sent

    def adopt(self, policy: FencePolicy, hello_sent_at: float) -> None:
        """A hello ack: the pool's policy, and the renewal that the hello itself was."""
        self.policy = policy
        self._sent.clear()
        if not policy.on:
            self.deadline = None
        else:
            self.renewed(hello_sent_at)
        self.changed.set()

    def sent(self, seq: int, at: float) -> None:
        self._sent[seq] = at

    def acked(self, seq: int) -> None:
        """The coordinator renewed the lease for heartbeat `seq` (and so for every earlier one)."""
        at = self._sent.get(seq)
        for s in [s for s in self._sent if s <= seq]:
            del self._sent[s]
        if at is not None:
            self.renewed(at)

    def renewed(self, sent_at: float) -> None:
        if not self.policy.on:
            return
        until = sent_at + self.policy.after_s
        if self.deadline is None or until > self.deadline:
            self.deadline = until
            self.changed.set()

    def coordinator_down(self, probed_at: float) -> bool:
        """A refused connection probed at `probed_at`: as good as a renewal, unless the policy is strict."""
        if self.policy.strict:
            return False
        self.renewed(probed_at + self.policy.refusal_grace_s)
        return True

    def remaining(self) -> float | None:
        """Seconds left before the jobs must be stopped; None: no lease is counted."""
        if not self.policy.on or self.deadline is None:
            return None
        return self.deadline - self.clock()

    def stream_ended(self) -> None:
        """Heartbeat seqs are per stream: acks of the old one can no longer come."""
        self._sent.clear()


async def refused(address: str, timeout_s: float) -> bool:
    """Whether a connection to the coordinator's `address` ("HOST:PORT" or "unix:PATH") is refused: nothing
    listens there, its host answered so. A timeout, an unreachable network, a name that does not resolve or
    an accepted connection are no such proof."""
    try:
        if address.startswith("unix:"):
            path = address.removeprefix("unix:").removeprefix("//")
            connect = asyncio.open_unix_connection(path)
        else:
            host, _, port = address.rpartition(":")
            connect = asyncio.open_connection(host.strip("[]"), int(port))
        _, writer = await asyncio.wait_for(connect, timeout_s)
    except ConnectionRefusedError:
        return True
    except FileNotFoundError:  # a unix socket whose file is gone: its server is not running
        return address.startswith("unix:")
    except OSError as e:
        return e.errno == errno.ECONNREFUSED
    except (TimeoutError, ValueError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return False
