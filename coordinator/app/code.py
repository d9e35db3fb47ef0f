"""Code blobs: content-addressed archives of a repository's working tree."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from dstack.coordinator.app.core import Core
from dstack.coordinator.app.transfer import put_from_stream, read_chunks
from dstack.coordinator.artifacts import code_key


@dataclass(frozen=True)
class CodePresence:
    present: bool
    upload_url: str = ""  # when absent and the store presigns: PUT the blob here, then submit


async def has_code(core: Core, code_hash: str) -> CodePresence:
    code_key(code_hash)  # INVALID_ARGUMENT for a malformed hash
    if await core.db(core.store.touch_code, code_hash):  # touched: the collector's grace starts again
        return CodePresence(True)
    return CodePresence(False, await core.artifacts.code_upload_url(code_hash))


async def put_code(core: Core, code_hash: str, chunks: AsyncIterator[bytes]) -> int:
    """Stores a blob whose content must match its hash; returns its size."""
    size, _ = await put_from_stream(core.objects, code_key(code_hash), chunks, expected_sha256=code_hash)
    await core.db(core.store.add_code, code_hash, size)
    return size


def read_code(core: Core, code_hash: str) -> AsyncIterator[bytes]:
    return read_chunks(core.objects, code_key(code_hash))


async def code_download_url(core: Core, code_hash: str) -> str:
    """A presigned URL, or "" when the store cannot presign (then read_code)."""
    return await core.artifacts.code_download_url(code_hash)
