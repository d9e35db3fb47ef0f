"""Garbage collection in the object store: code blobs no run names, and what unfinished uploads left.

- A code blob (code/HASH.tar.gz) is removed once no run names it and nobody asked for it (HasCode,
  SubmitRun, an upload) for `gc_grace_s`: the check and the removal of its row are one step on the DB
  thread (coordinator/store/code.py), so a run created meanwhile, or a client told "present" a moment
  ago, keeps it. Runs that still exist, finished ones included, keep theirs (a queued job always does).
- An object under code/ with no row (an upload through a presigned URL that was never submitted) is
  removed once it has been seen without a row for `gc_grace_s`.
- Temporaries: `.tmp-*` files of a local store, unfinished multipart uploads of S3, older than
  `gc_grace_s` (storage/*.py collect_temporaries).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from dstack.coordinator.artifacts import code_key
from dstack.coordinator.store import Store
from dstack.coordinator.store.executor import DbExecutor
from dstack.storage import ArtifactStore

log = logging.getLogger("dstack.coordinator")
CODE_PREFIX = "code/"
CODE_SUFFIX = ".tar.gz"
CODE_HASH = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Collected:
    code_blobs: int
    orphan_blobs: int
    temporaries: int


class GarbageCollector:
    def __init__(
        self,
        store: Store,
        db: DbExecutor,
        objects: ArtifactStore,
        grace_s: float,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.db = db
        self.objects = objects
        self.grace_s = grace_s
        self.monotonic = monotonic
        self._orphans_seen: dict[str, float] = {}  # code hash -> when first seen with no row

    async def pass_once(self) -> Collected:
        idle_before = self.store.clock() - int(self.grace_s * 1e9)
        code_blobs = 0
        for code_hash in await self.db(self.store.code.unreferenced, idle_before):
            if await self.db(self.store.code.forget_if_unreferenced, code_hash, idle_before):
                await asyncio.to_thread(self.objects.delete_prefix, code_key(code_hash))
                code_blobs += 1
        orphans = await self._orphans()
        temporaries = await asyncio.to_thread(self.objects.collect_temporaries, self.grace_s)
        if code_blobs or orphans or temporaries:
            log.info(
                "gc: removed %d unused code blobs, %d never-submitted uploads, %d unfinished temporaries",
                code_blobs,
                orphans,
                temporaries,
            )
        return Collected(code_blobs, orphans, temporaries)

    async def _orphans(self) -> int:
        listed = await asyncio.to_thread(self.objects.list_prefix, CODE_PREFIX)
        names = (k[len(CODE_PREFIX) : -len(CODE_SUFFIX)] for k in listed if k.endswith(CODE_SUFFIX))
        hashes = [h for h in names if CODE_HASH.fullmatch(h)]  # anything else is not ours to judge
        known = await self.db(self.store.code.known, hashes)
        now = self.monotonic()
        unknown = [h for h in hashes if h not in known]
        self._orphans_seen = {h: self._orphans_seen.get(h, now) for h in unknown}
        removed = 0
        for h in unknown:
            if now - self._orphans_seen[h] < self.grace_s:
                continue
            if await self.db(self.store.code.known, [h]):  # uploaded and recorded since the listing
                continue
            await asyncio.to_thread(self.objects.delete_prefix, code_key(h))
            del self._orphans_seen[h]
            removed += 1
        return removed
