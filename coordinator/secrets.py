"""Secrets at rest: encrypted with a key kept in its own file beside (never inside) the database.

Anyone with the database file alone cannot read a secret; anyone with both files can, so back them
up separately. Values leave the coordinator only in the job hand-off to an agent.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from dstack.coordinator.errors import InvalidRequest

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MIN_MASKED_LENGTH = 4


def check_secret_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise InvalidRequest(f"invalid secret name {name!r}: it becomes an environment variable (letters, digits, _)")


class SecretBox:
    def __init__(self, key_path: Path) -> None:
        key = self._load_or_create(key_path)
        self._fernet = Fernet(key)
        self._key = key
        self._derived: dict[bytes, bytes] = {}  # the key never changes while the process runs

    def derive(self, purpose: bytes) -> bytes:
        """A key for `purpose` derived from the secrets key (the step cache's HMAC of secret values): the
        coordinator's own, so no one without the key file can test a guess against what it stored."""
        if (derived := self._derived.get(purpose)) is None:
            derived = self._derived[purpose] = hmac.new(self._key, purpose, hashlib.sha256).digest()
        return derived

    @staticmethod
    def _load_or_create(path: Path) -> bytes:
        if path.exists():
            return path.read_bytes().strip()
        path.parent.mkdir(parents=True, exist_ok=True)
        key = Fernet.generate_key()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key + b"\n")
        return key

    def encrypt(self, value: str) -> bytes:
        return self._fernet.encrypt(value.encode())

    def decrypt(self, token: bytes) -> str:
        try:
            return self._fernet.decrypt(token).decode()
        except InvalidToken:
            raise InvalidRequest("a secret cannot be decrypted: the key file does not match the database") from None
