"""`dstack artifacts list|download`."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

from cli.errors import CliError


def list_command(run_name: str, as_json: bool) -> None:
    from cli.session import connect

    files = connect().list_artifacts(run_name)
    if as_json:
        json.dump(
            [{"job": f.job_name, "path": f.path, "size": f.size, "sha256": f.sha256} for f in files],
            sys.stdout,
            indent=2,
        )
        sys.stdout.write("\n")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for col in ("JOB", "PATH", "SIZE"):
        table.add_column(col)
    for f in files:
        table.add_row(f.job_name, f.path, _size(f.size))
    Console().print(table)


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(n)


def download_command(run_name: str, output: Path) -> None:
    """Downloads every artifact of the run into OUTPUT, keeping paths; each file is checked by sha256."""
    from cli.session import connect

    client = connect()
    files = client.list_artifacts(run_name)
    root = output.resolve()
    for f in files:
        dest = (root / f.path).resolve()
        if not dest.is_relative_to(root):
            raise CliError(f"artifact path {f.path!r} leads outside {root}; refusing to write it")
        dest.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".dstack-")
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in client.download(run_name, f.job_name, f.path):
                    digest.update(chunk)
                    out.write(chunk)
            if digest.hexdigest() != f.sha256:
                raise CliError(f"{f.path}: checksum mismatch (expected {f.sha256}, got {digest.hexdigest()})")
            os.replace(tmp, dest)
        finally:
            Path(tmp).unlink(missing_ok=True)
    print(f"{len(files)} file(s) downloaded to {root}", file=sys.stderr)
