"""`Client`: one gRPC channel to a coordinator, with the CLI's configuration, TLS and token."""

from __future__ import annotations

import os
from types import TracebackType

from dstack.api.code import CodeCache
from dstack.api.runs import Runs
from dstack.cli.client import Client as _Channel
from dstack.cli.home import Endpoint, load_configured


class Client:
    """A connection to a dstack coordinator.

    `Client()` uses what the CLI uses: DSTACK_COORDINATOR / DSTACK_TOKEN / DSTACK_CA_FILE / DSTACK_INSECURE, else
    $DSTACK_HOME/config.yaml (`dstack config`), else the embedded local coordinator and agent, started as
    `dstack` starts them. `Client(address=..., token=..., ca_file=...)` names a coordinator explicitly; without
    `ca_file` the system's roots verify its certificate, and `insecure=True` speaks plaintext.

    One Client holds one channel: share it between threads, and close it (or use `with`) when done.
    `timeout`: seconds for each call (not for waiting on a run)."""

    def __init__(
        self,
        address: str | None = None,
        token: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        insecure: bool | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.endpoint = _endpoint(address, token, ca_file, insecure)
        self._channel = _Channel(self.endpoint, timeout=timeout)
        self.runs = Runs(self._channel, CodeCache())

    @property
    def address(self) -> str:
        return self.endpoint.address

    @property
    def local(self) -> bool:
        """Whether this is the embedded local coordinator."""
        return self.endpoint.local

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client(address={self.address!r})"


def _endpoint(
    address: str | None, token: str | None, ca_file: str | os.PathLike[str] | None, insecure: bool | None
) -> Endpoint:
    if address:
        return Endpoint(
            address,
            token if token is not None else os.environ.get("DSTACK_TOKEN", ""),
            ca_file=os.fspath(ca_file) if ca_file else "",
            insecure=bool(insecure),
        )
    configured = load_configured()
    if configured is None:
        if token is not None or ca_file or insecure:
            from dstack.api.errors import CliError

            raise CliError("token, ca_file and insecure go with an address: Client(address='HOST:PORT', token=...)")
        from dstack.cli import local

        return local.ensure_running()
    return Endpoint(
        configured.address,
        token if token is not None else configured.token,
        ca_file=os.fspath(ca_file) if ca_file else configured.ca_file,
        insecure=configured.insecure if insecure is None else insecure,
        local=configured.local,
    )


__all__ = ["Client"]
