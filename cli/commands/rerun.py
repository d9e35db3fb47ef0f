"""`dstack rerun RUN` and `dstack diff RUN1 RUN2` (docs/reproducibility.md).

A rerun is made by the coordinator from the old run's record (coordinator/app/rerun.py): nothing of the
working tree is read or packed here. The notes it answers with are what it could not reproduce or what it
pinned, as far as it knows at submission; when the rerun ends (followed, not with -d) the two records are
compared (cli/run_diff.py) for what only the jobs could know: what pip resolved, the image's digest, the GPUs.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
import tempfile
from difflib import unified_diff
from pathlib import Path
from typing import Any

from dstack.cli.errors import CliError
from dstack.cli.term import Term
from dstack.protos.v1 import client_pb2, common_pb2

MAX_TEXT_DIFF = 1 << 20  # a file larger than this is said to differ, not diffed line by line


def rerun_command(run_name: str, same_inputs: bool, pin: bool, detach: bool, tag: str = "", priority: int = 0) -> int:
    from dstack.cli.commands.logs import print_logs
    from dstack.cli.render import run_summary
    from dstack.cli.session import connect
    from dstack.cli.waiting import WaitReporter

    err = Term(stderr=True)
    client = connect()
    request = client_pb2.RerunRunRequest(
        run_name=run_name, same_inputs=same_inputs, pin=pin, tag_on_done=tag, priority=priority
    )
    answer = client.rerun(request)
    for note in answer.notes:
        err.print((f"rerun: {note}", "yellow"))
    run = answer.run
    err.print((run.name, "bold"), f" submitted (a rerun of {run_name})")
    if detach:
        print(run.name)
        err.print((f"when it ends, `dstack diff {run_name} {run.name}` says what differs", "dim"))
        return 0
    waiting = WaitReporter(client, run.name, err).start()
    try:
        final = print_logs(client, run, follow=True, before_output=waiting.stop)
    except KeyboardInterrupt:
        waiting.stop()
        from dstack.cli.commands.run import _interrupted

        return _interrupted(client, run.name, err)
    finally:
        waiting.stop()
    final = final or client.get_run(run.name)
    report_gaps(run_name, run.name, err)
    style = "green" if final.status == common_pb2.RUN_STATUS_DONE else "red"
    err.print((run_summary(final), style))
    return 0 if final.status == common_pb2.RUN_STATUS_DONE else 1


def report_gaps(old: str, new: str, err: Term) -> None:
    """After the rerun: what its jobs did not reproduce of the old run's (packages, image, GPUs, inputs)."""
    from dstack.cli.commands.record import _record
    from dstack.cli.run_diff import diff_records, reproduction_gaps

    gaps = reproduction_gaps(diff_records(_record(old)[0], _record(new)[0]))
    if not gaps:
        err.print((f"rerun: {new} reproduced {old}'s code, inputs and environment as recorded", "green"))
        return
    for line in gaps:
        err.print((f"rerun: not reproduced exactly: {line}", "yellow"))
    err.print((f"rerun: `dstack diff {old} {new}` for everything that differs", "dim"))


def _tree(run_name: str, record: dict[str, Any], url: str) -> dict[str, tuple[str, bytes]]:
    """path -> (kind and mode, content or link target) of the run's packed code."""
    from dstack.cli.commands.record import _fetch_blob

    code = record.get("code") or {}
    if not code.get("hash"):
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "code.tar.gz"
        _fetch_blob(run_name, code["hash"], int(code.get("size", 0)), url, False, archive)
        out: dict[str, tuple[str, bytes]] = {}
        with tarfile.open(archive, "r:gz") as tar:
            for m in tar:
                name = m.name.removeprefix("./")
                if m.issym():
                    out[name] = ("link", m.linkname.encode())
                elif m.isfile():
                    f = tar.extractfile(m)
                    out[name] = (f"file {m.mode & 0o111:o}", f.read() if f else b"")
        return out


def tree_changes(a: dict[str, tuple[str, bytes]], b: dict[str, tuple[str, bytes]], unified: bool) -> dict[str, Any]:
    changed = sorted(p for p in a.keys() & b.keys() if a[p] != b[p])
    out: dict[str, Any] = {
        "added": sorted(b.keys() - a.keys()),
        "removed": sorted(a.keys() - b.keys()),
        "changed": changed,
    }
    out = {k: v for k, v in out.items() if v}
    if unified and out:
        parts = []
        for path in sorted(a.keys() | b.keys()):
            x, y = a.get(path), b.get(path)
            if x == y:
                continue
            parts.append(_file_diff(path, x, y))
        out["unified_diff"] = "".join(parts)
    return out


def _file_diff(path: str, x: tuple[str, bytes] | None, y: tuple[str, bytes] | None) -> str:
    def lines(v: tuple[str, bytes] | None) -> list[str] | None:
        if v is None:
            return []
        if len(v[1]) > MAX_TEXT_DIFF or b"\0" in v[1]:
            return None
        try:
            return v[1].decode().splitlines(keepends=True)
        except UnicodeDecodeError:
            return None

    la, lb = lines(x), lines(y)
    if la is None or lb is None:
        ha = hashlib.sha256(x[1]).hexdigest()[:12] if x else "none"
        hb = hashlib.sha256(y[1]).hexdigest()[:12] if y else "none"
        return f"Binary files a/{path} ({ha}) and b/{path} ({hb}) differ\n"
    text = "".join(unified_diff(la, lb, f"a/{path}" if x else "/dev/null", f"b/{path}" if y else "/dev/null"))
    if x and y and x[0] != y[0]:
        text = f"mode of {path}: {x[0]} -> {y[0]}\n" + text
    return text if text.endswith("\n") or not text else text + "\n"


def diff_command(run1: str, run2: str, as_json: bool, code: bool) -> None:
    from dstack.cli.commands.record import _record
    from dstack.cli.run_diff import diff_records

    if run1 == run2:
        raise CliError(f"both runs are {run1}: name two different runs")
    a, url_a, _ = _record(run1, grant_code=True)
    b, url_b, _ = _record(run2, grant_code=True)
    diff = diff_records(a, b)
    if "hash" in (diff.get("code") or {}):  # the trees differ: which files (and with --code, how)
        files = tree_changes(_tree(run1, a, url_a), _tree(run2, b, url_b), code)
        if files:
            diff["code"]["files"] = {k: v for k, v in files.items() if k != "unified_diff"}
            if "unified_diff" in files:
                diff["code"]["unified_diff"] = files["unified_diff"]
    if as_json:
        print(json.dumps(diff, indent=2, sort_keys=True))
        return
    from dstack.cli.diff_view import render_diff

    render_diff(diff)
