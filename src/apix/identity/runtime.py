"""What identity needs at run time, built once in the lifespan: keys, hasher, limits, revocations.

Revocations live in Redis, announced to every node, which keeps a copy in memory
(`apix.identity.revocations`): a logout or a suspension is seen by every node within a
round trip of Redis, and the per-request check is a lookup. PostgreSQL keeps the durable
record; `IdentityRuntime.resync` copies it back into Redis when a node starts, so a Redis
restart cannot quietly revive revoked tokens.

API keys a node has read are kept for a minute (`api_keys`), so a service publishing with
one does not cost a PostgreSQL transaction per request. A key is read again once it may
have been revoked: at its announcement on any node, whenever the copy of the revocations
is (re)loaded, and always while that copy is not current.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cachetools import TTLCache
from limits import RateLimitItemPerMinute
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from redis.asyncio import Redis
from sqlalchemy import select

from apix.config import Environment, Settings
from apix.core.security import SecretBox
from apix.core.time import utcnow
from apix.identity.keys import KeyRing
from apix.identity.models import Organization, SessionRevocation
from apix.identity.passwords import Passwords
from apix.identity.principal import Principal
from apix.identity.revocations import Revocations
from apix.identity.tokens import AccessClaims
from apix.infra.database import Database
from apix.infra.redis import AutoPipeline

_VERIFIED_MAX = 10_000
_VERIFIED_TTL_S = 60.0
_API_KEYS_MAX = 10_000
_API_KEYS_TTL_S = 60.0  # also how often a busy key's `last_used_at` is written, at most


@dataclass(frozen=True, slots=True)
class CachedApiKey:
    """An API key as read from PostgreSQL, and when: usable while `generation` is still
    the revocations' `keys_generation` (and its `token_expires_at` has not passed)."""

    principal: Principal
    generation: int


@dataclass
class IdentityRuntime:
    settings: Settings
    database: Database
    redis: Redis
    keyring: KeyRing
    passwords: Passwords
    mfa_box: SecretBox
    login_limiter: MovingWindowRateLimiter
    # Access tokens whose signature and claims were checked, by token: a reconnecting or
    # busy client is not verified again for a minute (expiry and revocation still are).
    verified: TTLCache[str, AccessClaims] = field(
        default_factory=lambda: TTLCache(maxsize=_VERIFIED_MAX, ttl=_VERIFIED_TTL_S)
    )
    # API keys read from PostgreSQL, by the SHA-256 of the key (never the key itself).
    api_keys: TTLCache[str, CachedApiKey] = field(
        default_factory=lambda: TTLCache(maxsize=_API_KEYS_MAX, ttl=_API_KEYS_TTL_S)
    )
    # Revocation checks of concurrent requests and connects share round trips.
    batch: AutoPipeline = field(init=False)
    revocations: Revocations = field(init=False)

    def __post_init__(self) -> None:
        self.batch = AutoPipeline(self.redis)
        self.revocations = Revocations(self.redis, self.batch)

    def start(self) -> None:
        """Keep this node's copy of the revocations current (checks ask Redis until then)."""
        self.revocations.start()

    async def stop(self) -> None:
        await self.revocations.stop()

    @classmethod
    def create(cls, settings: Settings, database: Database, redis: Redis) -> IdentityRuntime:
        keyring = KeyRing(settings.keys_dir)
        keyring.load(create_if_empty=settings.env is not Environment.PRODUCTION)
        storage = RedisStorage(
            "async+redis://",
            implementation="redispy",
            key_prefix="apix:auth:limits",
            connection_pool=redis.connection_pool,  # type: ignore[arg-type]
        )
        return cls(
            settings=settings,
            database=database,
            redis=redis,
            keyring=keyring,
            passwords=Passwords(settings.auth),
            mfa_box=SecretBox(settings.secret_key.get_secret_value(), purpose="mfa"),
            login_limiter=MovingWindowRateLimiter(storage),
        )

    # --- revocation -------------------------------------------------------------------

    async def revoke_sessions(self, session_ids: list[uuid.UUID]) -> None:
        await self.revocations.revoke(session_ids, self.settings.auth.access_ttl_s + 60)

    async def set_suspended(self, org_id: uuid.UUID, suspended: bool) -> None:
        await self.revocations.suspend(org_id, suspended)

    async def is_revoked(self, session_id: uuid.UUID | None, org_id: uuid.UUID | None) -> bool:
        return await self.revocations.revoked(session_id, org_id)

    async def resync(self) -> None:
        """Copy suspended organisations and recently revoked sessions into Redis."""
        since = datetime.fromtimestamp(
            utcnow().timestamp() - self.settings.auth.access_ttl_s - 60, UTC
        )
        async with self.database.transaction() as uow:
            suspended = (
                await uow.session.scalars(
                    select(Organization.id).where(Organization.is_active.is_(False))
                )
            ).all()
            recent = (
                await uow.session.scalars(
                    select(SessionRevocation.session_id).where(
                        SessionRevocation.revoked_at >= since
                    )
                )
            ).all()
        for org_id in suspended:
            await self.set_suspended(org_id, True)
        await self.revoke_sessions(list(recent))

    # --- brute-force limits -----------------------------------------------------------

    def _limits(self) -> tuple[RateLimitItemPerMinute, RateLimitItemPerMinute]:
        auth = self.settings.auth
        return (
            RateLimitItemPerMinute(auth.login_failures_per_account),
            RateLimitItemPerMinute(auth.login_failures_per_ip),
        )

    async def login_blocked_for(self, email: str, ip: str | None) -> int | None:
        """Seconds until another login may be tried, or None when allowed."""
        per_account, per_ip = self._limits()
        waits = []
        checks = [(per_account, ("account", email.lower()))]
        if ip:
            checks.append((per_ip, ("ip", ip)))
        for item, key in checks:
            if not await self.login_limiter.test(item, *key):
                reset_at, _ = await self.login_limiter.get_window_stats(item, *key)
                waits.append(max(1, int(reset_at - utcnow().timestamp()) + 1))
        return max(waits) if waits else None

    async def record_login_failure(self, email: str, ip: str | None) -> None:
        per_account, per_ip = self._limits()
        await self.login_limiter.hit(per_account, "account", email.lower())
        if ip:
            await self.login_limiter.hit(per_ip, "ip", ip)
