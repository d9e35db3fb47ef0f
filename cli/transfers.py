"""The CLI's side of moving files: presigned URLs through the transfer engine, rich progress bars
(bytes, rate, ETA) on a terminal and nothing when stderr is piped."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from dstack.cli.errors import CliError
from dstack.cli.term import Term
from dstack.storage.transfer import Transfer, TransferError


def put_bytes(url: str, data: bytes) -> None:
    with Transfer(workers=1, retry_for=30.0) as t:
        try:
            t.put_bytes(url, data, "code upload")
        except TransferError as e:
            raise CliError(str(e)) from None


@contextlib.contextmanager
def progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """Yields an `advance(nbytes)` callback (safe from worker threads)."""
    if not Term(stderr=True).is_terminal:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
    ) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
