"""argon2id password hashing (argon2-cffi), with rehash when parameters change."""

from __future__ import annotations

import asyncio
import base64

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from argon2.low_level import ARGON2_VERSION

from apix.config import AuthSettings


class Passwords:
    def __init__(self, settings: AuthSettings) -> None:
        self._hasher = PasswordHasher(
            time_cost=settings.argon2_time_cost,
            memory_cost=settings.argon2_memory_kib,
            parallelism=settings.argon2_parallelism,
        )
        self._dummy = _unmatchable(self._hasher)

    async def hash(self, password: str) -> str:
        # argon2 takes tens of milliseconds of CPU: keep it off the event loop.
        return await asyncio.to_thread(self._hasher.hash, password)

    async def verify(self, stored: str | None, password: str) -> bool:
        return await asyncio.to_thread(self._verify, stored, password)

    def needs_rehash(self, stored: str) -> bool:
        return self._hasher.check_needs_rehash(stored)

    def _verify(self, stored: str | None, password: str) -> bool:
        try:
            return self._hasher.verify(stored or self._dummy, password) and stored is not None
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False


def _unmatchable(hasher: PasswordHasher) -> str:
    """Verified against when the account does not exist, so both paths cost the same: an
    argon2id hash of the hasher's cost that no password matches. Written out rather than
    computed, which took tens of milliseconds of CPU at every start."""
    salt = base64.b64encode(bytes(hasher.salt_len)).rstrip(b"=").decode()
    digest = base64.b64encode(bytes(hasher.hash_len)).rstrip(b"=").decode()
    return (
        f"$argon2id$v={ARGON2_VERSION}$m={hasher.memory_cost},t={hasher.time_cost},"
        f"p={hasher.parallelism}${salt}${digest}"
    )
