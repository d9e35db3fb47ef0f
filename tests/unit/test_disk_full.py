"""A full agent disk (issue 16): which failures it caused, when the agent counts as full, how the scheduler
leaves a draining agent alone, and how many attempts a job ended by a full disk gets."""

from __future__ import annotations

import errno
import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from dstack.agent.code import CodeError
from dstack.agent.diskspace import DEFAULT_MIN_FREE, DiskWatch, MinFree, caused_by_full_disk, parse_min_free
from dstack.agent.retry import Outcome, classify
from dstack.coordinator.engine import MAX_WORK_DIR_SHOWN, draining_of
from dstack.coordinator.lifecycle.attempts import DISK_FULL, DISK_FULL_ATTEMPTS, retry_allows
from dstack.coordinator.planner import Policy, plan
from dstack.coordinator.scheduler import AgentState, Gpu, JobRequest, schedule
from dstack.protos.v1 import common_pb2
from dstack.storage.backoff import Backoff
from dstack.storage.errors import DiskFull, StoreError, StoreUnavailable
from dstack.storage.transfer import Download, Transfer

MIB, GIB = 1 << 20, 1 << 30


# ---- which failures a full disk caused --------------------------------------------------------------
def _raised_from(cause: BaseException, outer: type[Exception] = CodeError) -> Exception:
    try:
        try:
            raise cause
        except BaseException as e:
            raise outer("fetching code 0123456789ab failed") from e
    except Exception as e:
        return e


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        DiskFull("no space left on this machine's disk for code 0123"),
        _raised_from(OSError(errno.ENOSPC, "No space left on device")),  # wrapped by the code cache
        RuntimeError("pip install failed: [Errno 28] No space left on device: '/venv/lib'"),  # a command's words
    ],
    ids=["enospc", "edquot", "diskfull", "wrapped", "command-output"],
)
def test_a_full_disk_is_recognised_however_it_arrives(error: BaseException) -> None:
    assert caused_by_full_disk(error)


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ECONNRESET, "Connection reset by peer"),
        StoreUnavailable("code 0123: ConnectionRefusedError (http://s3:8333)"),
        _raised_from(OSError(errno.EACCES, "Permission denied")),
        RuntimeError("exited with code 1"),
    ],
    ids=["reset", "store-unavailable", "permission", "exit"],
)
def test_other_failures_are_not_blamed_on_the_disk(error: BaseException) -> None:
    assert not caused_by_full_disk(error)


def test_disk_full_is_its_own_type_not_a_store_error_and_the_agent_does_not_retry_it() -> None:
    e = DiskFull("no space left on this machine's disk for code 0123")
    assert isinstance(e, OSError) and e.errno == errno.ENOSPC and not isinstance(e, StoreError)
    assert classify(e) is Outcome.FINAL
    assert str(e) == "no space left on this machine's disk for code 0123"


class _Blob(http.server.BaseHTTPRequestHandler):
    body = os.urandom(4096)

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def blob_url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Blob)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/bucket/code/blob?X-Amz-Signature=secret"
    finally:
        server.shutdown()
        server.server_close()


def test_a_download_into_a_full_disk_fails_at_once_as_disk_full_naming_no_url(
    blob_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: ENOSPC writing the body was a StoreUnavailable ("... (http://s3:8333)"), retried for
    --store-retry, and the job failed naming the store. The store's bytes arrive; the disk refuses them."""
    import hashlib

    writes = []

    def full(fd: int, data: object, offset: int) -> int:
        writes.append(offset)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)  # the sink's write (storage/transfer.py calls os.pwrite)
    t = Transfer(backoff=Backoff(deadline_s=30.0))
    digest = hashlib.sha256(_Blob.body).hexdigest()
    try:
        with pytest.raises(DiskFull) as caught:
            t.get_file(Download(blob_url, tmp_path / "code.tar.gz", len(_Blob.body), digest, "code 0123456789ab"))
    finally:
        t.close()
    assert len(writes) == 1  # not retried: another try meets the same full disk
    assert "127.0.0.1" not in str(caught.value) and "http" not in str(caught.value)
    assert "code 0123456789ab" in str(caught.value)
    assert not list(tmp_path.iterdir())  # the partial file is gone


# ---- when the agent counts as full ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "floor_of_10_gib"),
    [("5%", 512 * MIB), ("2GiB", 2 * GIB), ("500MB", 500_000_000), ("0", 0), ("0%", 0)],
)
def test_min_free_disk_takes_a_size_or_a_share(text: str, floor_of_10_gib: int) -> None:
    assert parse_min_free(text).floor(10 * GIB) == floor_of_10_gib


@pytest.mark.parametrize("text", ["100%", "-1%", "lots", "5 %%"])
def test_min_free_disk_refuses_what_is_no_size(text: str) -> None:
    with pytest.raises(ValueError):
        parse_min_free(text)


def test_the_default_floor_is_1_gib_or_5_percent_whichever_is_smaller() -> None:
    assert DEFAULT_MIN_FREE.floor(100 * GIB) == GIB
    assert DEFAULT_MIN_FREE.floor(128 * MIB) == int(128 * MIB * 0.05)  # a test's tmpfs is not full from the start
    assert str(DEFAULT_MIN_FREE) == "1 GiB or 5%, the smaller"


def test_the_watch_measures_the_least_free_work_folder_against_the_floor(tmp_path: Path) -> None:
    (tmp_path / "jobs").mkdir()
    missing = tmp_path / "not-yet"
    below = DiskWatch([missing, tmp_path / "jobs"], MinFree(size=1 << 62)).measure()
    assert below.full and below.path == str(tmp_path / "jobs") and below.free > 0 and below.floor == 1 << 62
    above = DiskWatch([tmp_path / "jobs"], MinFree()).measure()
    assert not above.full and above.floor == 0
    assert below.describe("gpu-7") == f"agent disk full on gpu-7: {below.free // MIB} MiB free in {tmp_path / 'jobs'}"


# ---- the scheduler leaves a draining agent alone ----------------------------------------------------
def _agent(name: str, draining: str = "") -> AgentState:
    return AgentState(
        name, name, 8.0, 32 * GIB, [Gpu(0, "A100", 80 * GIB), Gpu(1, "A100", 80 * GIB)], 64, draining=draining
    )


FULL = "disk full, 3 MiB free in /var/lib/dstack/jobs"


def test_a_draining_agent_gets_no_job_while_a_healthy_one_fits() -> None:
    agents = [_agent("full", FULL), _agent("ok")]
    d = schedule([JobRequest(f"j{i}", gpu_count=1) for i in range(3)], agents)
    assert [agent for _, agent, _ in d.placements] == ["ok", "ok"]
    assert d.waiting["j2"].startswith("waiting: 1 GPU free on no agent; busy: full (draining: " + FULL + ")")
    assert not d.impossible


def test_a_job_that_only_a_draining_agent_could_run_waits_saying_why_and_is_not_unschedulable() -> None:
    d = schedule([JobRequest("j", gpu_count=2)], [_agent("full", FULL)])
    assert not d.placements and not d.impossible
    assert d.waiting["j"] == f"waiting: 2 GPUs free on no agent; busy: full (draining: {FULL})"


def test_the_planner_used_by_the_engine_skips_a_draining_agent_too() -> None:
    agents = [_agent("full", FULL), _agent("ok")]
    p = plan([JobRequest("a", gpu_count=2), JobRequest("b", gpu_count=2)], agents, [], Policy(now_ns=0))
    assert [(job, agent) for job, agent, _ in p.placements] == [("a", "ok")]
    assert "full (draining: disk full" in p.waiting["b"] and not p.impossible


def test_the_coordinator_reads_draining_from_the_agents_inventory_and_bounds_its_words() -> None:
    assert draining_of(common_pb2.Inventory(disk_free_bytes=50 * MIB)) == ""
    inv = common_pb2.Inventory(disk_full=True, disk_free_bytes=3 * MIB + 5, work_dir="/srv/jobs")
    assert draining_of(inv) == "disk full, 3 MiB free in /srv/jobs"
    long = draining_of(common_pb2.Inventory(disk_full=True, work_dir="/x" * 10_000))
    assert len(long) < MAX_WORK_DIR_SHOWN + 40


# ---- attempts: requeued, within a bound -------------------------------------------------------------
def _spec(retry_limit: int | None = None) -> bytes:
    spec = common_pb2.JobSpec(job_name="main")
    if retry_limit is not None:
        spec.retry.CopyFrom(common_pb2.RetryPolicy(limit=retry_limit, on=["agent-lost"]))
    return spec.SerializeToString()


def test_a_job_ended_by_a_full_disk_is_requeued_without_retry_up_to_a_bound() -> None:
    allowed = [a for a in range(1, 10) if retry_allows(_spec(), a, DISK_FULL)]
    assert allowed == list(range(1, DISK_FULL_ATTEMPTS))  # then attempt 3 is the last: it fails with the reason


def test_a_larger_retry_limit_gives_a_disk_full_job_as_many_attempts_as_retry_does() -> None:
    assert [a for a in range(1, 12) if retry_allows(_spec(6), a, DISK_FULL)] == list(range(1, 7))
    assert [a for a in range(1, 12) if retry_allows(_spec(0), a, DISK_FULL)] == [1, 2]
