"""`dstack show RUN [--json]` (the run's record) and `dstack code RUN -o DIR | --diff` (its code).

The record is the coordinator's (coordinator/app/records.py): a versioned JSON document. The code comes
from the object store through a presigned GET when the store presigns (the CLI never holds storage
credentials), else streamed by the coordinator; either way it is checked against its sha256 name.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from dstack.cli.errors import CliError


def _record(run_name: str, grant_code: bool = False) -> tuple[dict[str, Any], str, str]:
    from dstack.cli.session import connect

    answer = connect().run_record(run_name, grant_code)
    record: dict[str, Any] = json.loads(answer.record_json)
    return record, answer.code_url, answer.diff_url


def show_command(run_name: str, as_json: bool) -> None:
    record, _, _ = _record(run_name)
    if as_json:
        print(json.dumps(record, indent=2, sort_keys=True))
        return
    from dstack.cli.record_view import render_record

    render_record(record)


def _fetch_blob(run_name: str, blob_hash: str, size: int, url: str, diff: bool, dest: Path) -> None:
    """The blob into dest, checked against its sha256 name."""
    if url:
        from dstack.storage.transfer import Download, Transfer, TransferError

        with Transfer(retry_for=60.0) as t:
            try:
                t.get_many([Download(url, dest, size, blob_hash, dest.name)])
            except TransferError as e:
                raise CliError(str(e)) from None
        return
    from dstack.cli.session import connect

    digest = hashlib.sha256()
    with dest.open("wb") as f:
        for chunk in connect().download_run_code(run_name, diff):
            digest.update(chunk)
            f.write(chunk)
    if digest.hexdigest() != blob_hash:
        raise CliError(f"the code of run {run_name} does not match its hash {blob_hash}; not used")


def code_command(run_name: str, output: Path | None, diff: bool) -> None:
    record, code_url, diff_url = _record(run_name, grant_code=True)
    code = record.get("code") or {}
    if diff:
        if not code.get("diff_hash"):
            why = "its tree was clean" if not code.get("dirty") else "only untracked files changed"
            if not code.get("commit"):
                why = "it was not made from a git commit"
            print(f"run {run_name} has no uncommitted diff: {why}", file=sys.stderr)
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "diff.patch"
            _fetch_blob(run_name, code["diff_hash"], int(code.get("diff_size", 0)), diff_url, True, path)
            sys.stdout.buffer.write(path.read_bytes())
            sys.stdout.buffer.flush()
        return
    if output is None:
        raise CliError("say where to restore the code: dstack code RUN -o DIR (or --diff to print the diff)")
    if not code.get("hash"):
        raise CliError(f"run {run_name} was submitted without code")
    dest = output.resolve()
    if dest.exists() and any(dest.iterdir()):
        raise CliError(f"{dest} is not empty; restore into a new or empty folder")
    from dstack.agent.unpack import UnpackError, extract

    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "code.tar.gz"
        _fetch_blob(run_name, code["hash"], int(code.get("size", 0)), code_url, False, archive)
        try:
            extract(archive, dest)  # member by member, nothing written outside dest (agent/unpack.py)
        except UnpackError as e:
            raise CliError(str(e)) from None
    commit = code.get("commit") or "no commit"
    untracked = len(code.get("untracked") or [])
    print(
        f"run {run_name}: code restored to {dest} ({commit[:12]}, {untracked} untracked file(s)"
        f"{', with uncommitted changes' if code.get('diff_hash') else ''})",
        file=sys.stderr,
    )
