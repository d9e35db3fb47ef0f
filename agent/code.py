"""The code cache: packed working trees by content hash, fetched once per agent."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from dstack.agent.retry import RetryPolicy
from dstack.agent.unpack import extract  # member by member, not tarfile's filters (CVE-2025-4517)
from dstack.protos.v1 import agent_pb2, agent_pb2_grpc, common_pb2
from dstack.storage.errors import ChecksumMismatch
from dstack.storage.transfer import Download, Transfer

log = logging.getLogger("dstack.agent")


class CodeError(Exception):
    pass


class CodeCache:
    def __init__(
        self,
        root: Path,
        stub: agent_pb2_grpc.AgentServiceStub,
        metadata: Callable[[], list[tuple[str, str]]],
        transfer: Transfer,
        policy: RetryPolicy | None = None,
    ) -> None:
        self.root = root
        self.stub = stub
        self.metadata = metadata
        self.transfer = transfer
        self.policy = policy or RetryPolicy()
        self.downloaded_bytes = 0  # what the cache has fetched (a cache hit fetches nothing)
        self._inflight: dict[str, asyncio.Future[Path]] = {}

    def remove_partial(self) -> int:
        """Removes the downloads a previous agent run did not finish (it was killed mid-download): `.part-*`
        (streamed through the coordinator) and `.NAME.XXXX.part` (storage/transfer.py's get_file). Called at
        the agent's start, before any download of its own. Returns how many."""
        removed = 0
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return 0
        for name in names:
            if name.startswith(".part-") or (name.startswith(".") and name.endswith(".part")):
                try:
                    os.unlink(self.root / name)
                    removed += 1
                except FileNotFoundError:
                    pass
        return removed

    async def materialize(self, code: common_pb2.CodeRef, dest: Path, then: Callable[[], None] | None = None) -> None:
        """Unpacks the code into dest, then runs `then` on the same worker thread (one hop for both)."""
        archive = await self._get(code.hash, code.size) if code.hash else None

        def work() -> None:
            if archive is None:
                dest.mkdir(parents=True, exist_ok=True)
            else:
                extract(archive, dest)
            if then is not None:
                then()

        await asyncio.to_thread(work)

    async def _get(self, code_hash: str, size: int) -> Path:
        path = self.root / f"{code_hash}.tar.gz"
        if await asyncio.to_thread(path.exists):
            return path
        fut = self._inflight.get(code_hash)
        if fut is not None:
            return await fut
        fut = asyncio.get_running_loop().create_future()
        self._inflight[code_hash] = fut
        try:
            await self._download(code_hash, size, path)
            log.info("code %s fetched: %d bytes", code_hash[:12], await asyncio.to_thread(lambda: path.stat().st_size))
            fut.set_result(path)
            return path
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # mark retrieved: waiters (if any) get it
            raise
        finally:
            del self._inflight[code_hash]

    async def _download(self, code_hash: str, size: int, path: Path) -> None:
        await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)

        async def once() -> int:
            # A fresh grant on every try: an expired URL (agent/retry.py: REGRANT) gets a new one.
            grant = await self.stub.GrantCode(agent_pb2.GetCodeRequest(hash=code_hash), metadata=self.metadata())
            if not grant.url:  # the store cannot presign: the coordinator streams it
                return await self._stream(code_hash, path)
            # Straight from the store; checked against its hash before it is kept.
            what = f"code {code_hash[:12]}"
            await asyncio.to_thread(self.transfer.get_file, Download(grant.url, path, size, code_hash, what))
            return size

        self.downloaded_bytes += await self.policy.call(f"fetching code {code_hash[:12]}", once, fail=CodeError)

    async def _stream(self, code_hash: str, path: Path) -> int:
        fd, tmp = await asyncio.to_thread(tempfile.mkstemp, dir=self.root, prefix=".part-")
        f = os.fdopen(fd, "wb")
        digest = hashlib.sha256()
        code_size = 0
        try:
            async for chunk in self.stub.GetCode(agent_pb2.GetCodeRequest(hash=code_hash), metadata=self.metadata()):
                digest.update(chunk.data)
                code_size += len(chunk.data)
                await asyncio.to_thread(f.write, chunk.data)
            f.close()
            if digest.hexdigest() != code_hash:
                raise ChecksumMismatch(f"code {code_hash[:12]} arrived corrupted (sha256 {digest.hexdigest()[:12]})")
            await asyncio.to_thread(os.replace, tmp, path)
            return code_size
        finally:
            f.close()
            await asyncio.to_thread(Path(tmp).unlink, missing_ok=True)
