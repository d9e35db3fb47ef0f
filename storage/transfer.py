"""The transfer engine: moves files to and from presigned URLs, in parallel, with retries.

Why our own and not boto3's transfer manager: the CLI and agents hold no credentials, only presigned
URLs, which boto3 cannot use; and on small files per-request overhead dominates, where plain
http.client connections kept per thread beat urllib3/botocore (bench/storage.py measures it).

- Files up to the grant's size go in one PUT; bigger ones in parallel parts, each part streamed from
  disk (no part is held in memory) and retried on its own.
- Downloads of big objects are split into parallel ranged GETs written in place; the sha256 is computed
  alongside, in order, and checked before the file is moved into place (a bad file is never left).
- A failing request is retried with exponential backoff (storage/backoff.py) until `retry_for` seconds
  have passed since its first failure, if `retryable` says so (by default: StoreUnavailable, the
  transient errors); then the transfer fails with the last error. Every failure is a StoreError
  subclass (storage/errors.py): an expired presigned URL is ExpiredGrant, a refused signature
  AccessDenied, a bad download ChecksumMismatch.
"""

from __future__ import annotations

import calendar
import hashlib
import http.client
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from dstack.storage.backoff import Backoff
from dstack.storage.base import UploadGrant
from dstack.storage.errors import (
    DISK_FULL_ERRNOS,
    AccessDenied,
    ChecksumMismatch,
    DiskFull,
    StoreError,
    StoreUnavailable,
    from_http,
)

log = logging.getLogger(__name__)

# Files in flight at once. Measured on 2 cores against loopback SeaweedFS, 2,000 x 64 KiB: uploads
# 1.67/1.40/1.55 s with 16/32/64 threads, downloads 1.79/1.96/2.12 s: more threads only fight over
# the GIL (the other side of a download, hashing and writing, is all Python-side CPU).
WORKERS = 32
DOWNLOADS = 16
PARTS_PER_FILE = 8
SMALL = 8 << 20  # parallel parts or ranges of one file
# Downloads up to RANGE_THRESHOLD go in one stream, hashed on a second thread as the bytes arrive;
# bigger ones in parallel ranged GETs of RANGE_SIZE, RANGES_PER_FILE at a time, hashed in order while
# later ranges arrive. On loopback SeaweedFS a 1 GiB object came down as fast in one stream as in 4 x 64
# MiB ranges, with 30-40% less CPU (bench/storage.py; on 2 cores the CPU is the limit); a store far away
# needs several connections for one big file, and files over 2 GiB get them.
RANGE_THRESHOLD = 2 << 30
RANGE_SIZE = 256 << 20
RANGES_PER_FILE = 4
IO_BLOCK = 1 << 20
TIMEOUT_S = 60.0


# The engine's errors are the store's (storage/errors.py); these names stay for callers that catch them.
TransferError = StoreError
ChecksumError = ChecksumMismatch


def transient(e: StoreError) -> bool:
    """The default of what the engine retries in place: only what may pass by itself."""
    return isinstance(e, StoreUnavailable)


@dataclass(frozen=True)
class Uploaded:
    size: int
    sha256: str
    etags: tuple[str, ...] = ()  # of the parts, for a multipart upload


@dataclass(frozen=True)
class Download:
    url: str
    dest: Path
    size: int
    sha256: str
    what: str = ""  # how to name the file in errors


class _RangeReader:
    """A file-like view of [offset, offset+length) of a file, read as http.client sends it."""

    def __init__(self, fd: int, offset: int, length: int, progress: Callable[[int], None] | None) -> None:
        self.fd, self.pos, self.end, self.progress = fd, offset, offset + length, progress

    def read(self, n: int = -1) -> bytes:
        n = self.end - self.pos if n < 0 else min(n, self.end - self.pos)
        data = os.pread(self.fd, n, self.pos) if n > 0 else b""
        self.pos += len(data)
        if self.progress is not None and data:
            self.progress(len(data))
        return data


class Transfer:
    def __init__(
        self,
        workers: int = WORKERS,
        retry_for: float = 60.0,
        parts_per_file: int = PARTS_PER_FILE,
        progress: Callable[[int], None] | None = None,
        backoff: Backoff | None = None,
        retryable: Callable[[StoreError], bool] = transient,
    ) -> None:
        self.parts_per_file = parts_per_file
        self.backoff = backoff or Backoff(deadline_s=retry_for)
        self.retry_for = self.backoff.deadline_s
        self.retryable = retryable
        self.progress = progress
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="transfer")
        self._gets = ThreadPoolExecutor(min(workers, DOWNLOADS), thread_name_prefix="transfer-get")
        self._parts = ThreadPoolExecutor(workers, thread_name_prefix="transfer-part")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._gets.shutdown(wait=True, cancel_futures=True)
        self._parts.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Transfer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- HTTP with retries ---------------------------------------------------------------------------

    def _conn(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        conns: dict[tuple[str, str], http.client.HTTPConnection] = self._local.__dict__.setdefault("conns", {})
        conn = conns.get((scheme, netloc))
        if conn is None:
            cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
            conn = cls(netloc, timeout=TIMEOUT_S, blocksize=IO_BLOCK)
            conns[(scheme, netloc)] = conn
        return conn

    def _drop(self, scheme: str, netloc: str) -> None:
        conn = self._local.__dict__.get("conns", {}).pop((scheme, netloc), None)
        if conn is not None:
            conn.close()

    def _once(
        self,
        what: str,
        method: str,
        url: str,
        body: object,
        headers: dict[str, str],
        sink: Callable[[http.client.HTTPResponse], object],
    ) -> object:
        u = urlsplit(url)
        target = u.path + (f"?{u.query}" if u.query else "")
        conn = self._conn(u.scheme, u.netloc)
        try:
            conn.request(method, target, body=body, headers=headers)  # type: ignore[arg-type]
            resp = conn.getresponse()
            if resp.status >= 300:
                detail = resp.read(2048).decode("utf-8", "replace")
                code, message = _xml_field(detail, "Code"), _xml_field(detail, "Message")
                error = from_http(resp.status, code, message, what, expired=_url_expired(url))
                if type(error) is AccessDenied:  # say whose signature it was: the coordinator's credentials
                    error = AccessDenied(f"{error} ({_signer(url)}: check the coordinator's S3 credentials)")
                raise error
            result = sink(resp)
            resp.read()  # drain so the connection can be reused
            return result
        except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out: transient
            self._drop(u.scheme, u.netloc)
            if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:  # the sink's write: our disk, not the store
                raise DiskFull(f"no space left on this machine's disk for {what}") from e
            detail = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            raise StoreUnavailable(f"{what}: {detail} ({u.scheme}://{u.netloc})") from e
        except BaseException:
            self._drop(u.scheme, u.netloc)
            raise

    def _request(
        self,
        what: str,
        method: str,
        url: str,
        body: Callable[[], object],
        headers: dict[str, str],
        sink: Callable[[http.client.HTTPResponse], object] = lambda r: r.getheader("ETag", ""),
    ) -> object:
        attempts = self.backoff.start()
        while True:
            try:
                return self._once(what, method, url, body(), headers, sink)
            except StoreError as e:
                if not self.retryable(e):
                    raise
                delay = attempts.next_delay()
                if delay is None:
                    e.args = (f"{e} (gave up after retrying for {attempts.elapsed():.0f}s)",)
                    e.exhausted = True
                    raise e from None
                log.info("%s; retrying in %.1fs", e, delay)  # an outage shows in the log (a test waits for it)
                time.sleep(delay)

    # -- uploads -------------------------------------------------------------------------------------

    def put_file(
        self, path: Path, grant: UploadGrant, what: str = "", opener: Callable[[Path], int] | None = None
    ) -> Uploaded:
        """`opener`, if given, opens the file instead of a plain open (the agent's refuses symlinks and
        anything but a regular file); the file is read only through the descriptor it returns."""
        what = what or str(path)
        fd = os.open(path, os.O_RDONLY) if opener is None else opener(path)
        try:
            size = os.fstat(fd).st_size
            if not grant.upload_id:
                return self._put_single(fd, size, grant.url, what)
            return self._put_parts(fd, size, grant, what)
        finally:
            os.close(fd)

    def _put_single(self, fd: int, size: int, url: str, what: str) -> Uploaded:
        digest = hashlib.sha256()
        if size <= SMALL:  # small: read once, hash and send from memory
            data = os.pread(fd, size, 0)
            while len(data) < size:  # pread may return short reads
                more = os.pread(fd, size - len(data), len(data))
                if not more:
                    raise StoreError(f"{what}: the file shrank while it was read")
                data += more
            digest.update(data)
            self._request(what, "PUT", url, lambda: data, {"Content-Length": str(size)})
            if self.progress is not None:
                self.progress(size)
            return Uploaded(size, digest.hexdigest())
        hashing = self._parts.submit(_hash_range, fd, 0, size)
        try:
            self._request(
                what, "PUT", url, lambda: _RangeReader(fd, 0, size, self.progress), {"Content-Length": str(size)}
            )
            return Uploaded(size, hashing.result())
        finally:
            _settle([hashing])

    def _put_parts(self, fd: int, size: int, grant: UploadGrant, what: str) -> Uploaded:
        hashing = self._parts.submit(_hash_range, fd, 0, size)
        gate = threading.Semaphore(self.parts_per_file)
        futures: list[Future[Any]] = []
        for n, url in enumerate(grant.part_urls):
            off = n * grant.part_size
            length = min(grant.part_size, size - off)
            if length <= 0 and n > 0:
                break

            def send(url: str = url, off: int = off, length: int = max(length, 0), n: int = n) -> object:
                with gate:
                    return self._request(
                        f"{what} (part {n + 1})",
                        "PUT",
                        url,
                        lambda: _RangeReader(fd, off, length, self.progress),
                        {"Content-Length": str(length)},
                    )

            futures.append(self._parts.submit(send))
        try:
            etags = tuple(str(f.result()) for f in futures)
            return Uploaded(size, hashing.result(), etags)
        finally:
            _settle([hashing, *futures])  # no part may still read `fd` once the caller closes it

    def put_bytes(self, url: str, data: bytes, what: str) -> None:
        self._request(what, "PUT", url, lambda: data, {"Content-Length": str(len(data))})

    def put_many(self, items: Sequence[tuple[Path, UploadGrant, str]]) -> list[Uploaded]:
        """Uploads every (path, grant, what) in parallel; the first failure is raised."""
        futures = [self._pool.submit(self.put_file, p, g, w) for p, g, w in items]
        return [f.result() for f in futures]

    def put_each(
        self, items: Sequence[tuple[Path, UploadGrant, str]], opener: Callable[[Path], int] | None = None
    ) -> list[Uploaded | StoreError]:
        """Like put_many, but every item's own outcome: a caller can ask again for the grants that
        expired and send only those files."""
        return _outcomes([self._pool.submit(self.put_file, p, g, w, opener) for p, g, w in items])

    # -- downloads -----------------------------------------------------------------------------------

    def get_file(self, item: Download) -> None:
        what = item.what or str(item.dest)
        tmp = item.dest.with_name(f".{item.dest.name}.{os.urandom(4).hex()}.part")
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileNotFoundError:  # its folder is new: thousands of files in one folder cost one mkdir
            item.dest.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        moved = False
        try:
            if item.size <= RANGE_THRESHOLD:
                # One stream, hashed as it arrives: on a fast store the CPU, not the link, is the limit,
                # and a second pass over the file (or threads fighting over the GIL) only costs more.
                got = self._get_stream(what, item.url, fd, 0, item.size, hashed=True)
            else:
                os.ftruncate(fd, item.size)
                gate = threading.Semaphore(RANGES_PER_FILE)

                def fetch(off: int) -> str:
                    with gate:
                        return self._get_stream(what, item.url, fd, off, min(RANGE_SIZE, item.size - off))

                futures = [self._parts.submit(fetch, off) for off in range(0, item.size, RANGE_SIZE)]
                digest = hashlib.sha256()
                try:
                    for off, f in zip(range(0, item.size, RANGE_SIZE), futures, strict=True):
                        f.result()  # hashed in order, while later ranges still download
                        _hash_into(digest, fd, off, min(RANGE_SIZE, item.size - off))
                finally:
                    _settle(futures)
                got = digest.hexdigest()
            if got != item.sha256:
                raise ChecksumMismatch(
                    f"{what}: checksum mismatch: expected sha256 {item.sha256}, got {got}; the file was not saved"
                )
            os.replace(tmp, item.dest)
            moved = True
        finally:
            os.close(fd)
            if not moved:
                tmp.unlink(missing_ok=True)

    def _get_stream(self, what: str, url: str, fd: int, off: int, length: int, hashed: bool = False) -> str:
        """GETs [off, off+length) into fd at off; returns the sha256 of those bytes if `hashed`."""
        whole = off == 0 and hashed
        headers = {} if whole else {"Range": f"bytes={off}-{off + length - 1}"}

        def sink(resp: http.client.HTTPResponse) -> str:
            if hashed and length > SMALL:
                return self._sink_pipelined(what, resp, fd, off, length)
            digest = hashlib.sha256() if hashed else None
            pos = off
            buf = bytearray(IO_BLOCK)
            view = memoryview(buf)
            while n := resp.readinto(view):
                chunk = view[:n]
                if digest is not None:
                    digest.update(chunk)
                os.pwrite(fd, chunk, pos)
                pos += n
                if self.progress is not None:
                    self.progress(n)
            if pos - off != length:
                raise StoreUnavailable(f"{what}: short read: {pos - off} of {length} bytes")
            return digest.hexdigest() if digest is not None else ""

        return str(self._request(what, "GET", url, lambda: None, headers, sink))

    def _sink_pipelined(self, what: str, resp: http.client.HTTPResponse, fd: int, off: int, length: int) -> str:
        """Receives and writes on this thread while another hashes the same chunks: sha256 releases the
        GIL, so on a fast link a big download costs the longer of the two, not their sum."""
        chunks: queue.Queue[bytes | None] = queue.Queue(maxsize=64)

        def hash_all() -> str:
            digest = hashlib.sha256()
            while (chunk := chunks.get()) is not None:
                digest.update(chunk)
            return digest.hexdigest()

        hasher = self._parts.submit(hash_all)
        pos = off
        try:
            while chunk := resp.read(IO_BLOCK):
                chunks.put(chunk)
                os.pwrite(fd, chunk, pos)
                pos += len(chunk)
                if self.progress is not None:
                    self.progress(len(chunk))
        finally:
            chunks.put(None)
        got = hasher.result()
        if pos - off != length:
            raise StoreUnavailable(f"{what}: short read: {pos - off} of {length} bytes")
        return got

    def get_many(self, items: Sequence[Download]) -> None:
        futures = [self._gets.submit(self.get_file, d) for d in items]
        for f in futures:
            f.result()

    def get_each(self, items: Sequence[Download]) -> list[StoreError | None]:
        """Like get_many, but every item's own outcome (None: saved)."""
        return _outcomes([self._gets.submit(self.get_file, d) for d in items])


def _outcomes(futures: Sequence[Future[Any]]) -> list[Any]:
    out: list[Any] = []
    try:
        for f in futures:
            try:
                out.append(f.result())
            except StoreError as e:
                out.append(e)
    finally:
        _settle(futures)  # on another error (a local file gone), nothing may keep running after us
    return out


def _settle(futures: Sequence[Future[Any]]) -> None:
    for f in futures:
        f.cancel()
    wait(list(futures))


def _hash_into(digest: hashlib._Hash, fd: int, off: int, length: int) -> None:
    pos = off
    while pos < off + length:
        chunk = os.pread(fd, min(IO_BLOCK * 8, off + length - pos), pos)
        if not chunk:
            raise StoreError("the file shrank while it was read")
        digest.update(chunk)
        pos += len(chunk)


def _hash_range(fd: int, off: int, length: int) -> str:
    digest = hashlib.sha256()
    _hash_into(digest, fd, off, length)
    return digest.hexdigest()


def _url_expired(url: str) -> bool:
    """Whether a presigned URL's own expiry (X-Amz-Date + X-Amz-Expires) has passed: stores say it in
    different words (AWS and MinIO: 403 "Request has expired"), the URL says it the same way everywhere."""
    q = parse_qs(urlsplit(url).query)
    try:
        signed = time.strptime(q["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ")
        expires = int(q["X-Amz-Expires"][0])
    except (KeyError, ValueError):
        return False
    return calendar.timegm(signed) + expires <= time.time()


def _signer(url: str) -> str:
    """Which store, bucket and access key a presigned URL was signed for (no secret is in a URL)."""
    u = urlsplit(url)
    bucket = u.path.lstrip("/").split("/", 1)[0]
    key_id = parse_qs(u.query).get("X-Amz-Credential", ["?/"])[0].split("/", 1)[0]
    return f"store {u.netloc}, bucket {bucket!r}, access key {key_id!r}"


def _xml_field(xml: str, name: str) -> str:
    start = xml.find(f"<{name}>")
    end = xml.find(f"</{name}>")
    return xml[start + len(name) + 2 : end] if 0 <= start < end else ""
