"""Revoked sessions, suspended organisations and revoked API keys, as every node sees them.

Redis holds them (a sorted set of revoked session ids by expiry, a set of suspended
organisations, a sorted set of API keys revoked within `KEY_RETENTION_S`) and announces
each change on one pub/sub channel. Each node keeps a copy in memory, loaded once its
subscription is confirmed and kept current by the announcements, so the check on every
request and connect is a lookup, not a round trip.

The copy is used only while it is known to be current: loaded since the subscription was
last (re)established, and Redis heard from within `_STALE_S` (the watcher pings every
`_PING_S`). Otherwise (before the first load, while the subscription is down, or when Redis
stopped answering) every check asks Redis, as it always did.

Whoever holds something authenticated with a credential (the gateway: connections and
SSE streams) listens here (`listeners`) and is told of each revocation this node hears
announced, and at once of those it makes.

API keys are cached per node by their readers (`IdentityRuntime.api_keys`); a revoked key
is announced here and bumps `keys_generation`, as does every (re)load of the copy (an
announcement may have been missed before it), so a key read before the bump is read again.
A reload also tells listeners of every key revoked within `KEY_RETENTION_S`, so a node that
missed a key's announcement still closes what that key opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Sequence

from redis.asyncio import Redis

from apix.core.logging import get_logger
from apix.core.tasks import stop_task
from apix.infra.redis import AutoPipeline, WatchedPubSub

log = get_logger(__name__)

REVOKED_KEY = "apix:auth:revoked"  # sorted set: session id → expiry (ms)
SUSPENDED_KEY = "apix:auth:suspended"  # set: organisation ids
REVOKED_KEYS_KEY = "apix:auth:revoked-keys"  # sorted set: API key id → revoked at (ms)
# How long a revoked key is repeated to nodes that reload their copy. A key's revocation is
# permanent in PostgreSQL; this only has to outlast a node's time away from Redis.
KEY_RETENTION_S = 7 * 24 * 3600
# Announcements: "s <expiry ms> <session id>...", "o+ <organisation id>", "o- <organisation id>",
# "k <API key id>".
CHANGES = "apix:auth:changes"

# A listener is told what was revoked: ("session", ids), ("organization", [id]) when it is
# suspended, or ("api_key", [id]).
Listener = Callable[[str, Sequence[uuid.UUID]], None]

_PING_S = 1.0
_STALE_S = 3.0
_PRUNE_S = 60.0


class Revocations:
    def __init__(self, redis: Redis, batch: AutoPipeline) -> None:
        self.redis = redis
        self.batch = batch
        self._sessions: dict[uuid.UUID, float] = {}  # session id → expiry (epoch seconds)
        self._orgs: set[uuid.UUID] = set()
        self._loaded = False
        self._heard = float("-inf")  # loop time Redis last answered the watcher
        self._task: asyncio.Task[None] | None = None
        self._pubsub: WatchedPubSub | None = None
        self._stopping = False
        self._polling = False  # waiting in `get_message`: safe to interrupt at stop
        # Bumped whenever an API key may have been revoked anywhere: its announcement, or
        # the copy (re)loaded. Only what was read at the current generation may be reused.
        self.keys_generation = 0
        self.listeners: list[Listener] = []

    @property
    def current(self) -> bool:
        """Whether the copy may answer checks (else they ask Redis)."""
        if not self._loaded:
            return False
        return asyncio.get_running_loop().time() - self._heard < _STALE_S

    # --- checking -----------------------------------------------------------------------

    async def revoked(self, session_id: uuid.UUID | None, org_id: uuid.UUID | None) -> bool:
        if self.current:
            if session_id is not None and self._sessions.get(session_id, 0.0) > time.time():
                return True
            return org_id is not None and org_id in self._orgs
        return await self._ask(session_id, org_id)

    async def _ask(self, session_id: uuid.UUID | None, org_id: uuid.UUID | None) -> bool:
        checks = []
        if session_id is not None:
            checks.append(self.batch.call("ZSCORE", REVOKED_KEY, str(session_id)))
        if org_id is not None:
            checks.append(self.batch.call("SISMEMBER", SUSPENDED_KEY, str(org_id)))
        answers = await asyncio.gather(*checks)
        if session_id is not None:
            expiry = answers.pop(0)
            if expiry is not None and float(expiry) > time.time() * 1000:
                return True
        return bool(answers and answers[0])

    # --- writing (any node) -------------------------------------------------------------

    async def revoke(self, session_ids: Sequence[uuid.UUID], ttl_s: float) -> None:
        """Revoke sessions until their tokens have expired (``ttl_s`` from now)."""
        if not session_ids:
            return
        now_ms = int(time.time() * 1000)
        expiry_ms = now_ms + int(ttl_s * 1000)
        ids = [str(sid) for sid in session_ids]
        for sid in session_ids:  # this node refuses them at once, announcement or not
            self._sessions[sid] = expiry_ms / 1000
        self._tell("session", session_ids)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(REVOKED_KEY, dict.fromkeys(ids, expiry_ms))
            pipe.zremrangebyscore(REVOKED_KEY, "-inf", now_ms)
            pipe.publish(CHANGES, f"s {expiry_ms} {' '.join(ids)}")
            await pipe.execute()

    async def suspend(self, org_id: uuid.UUID, suspended: bool) -> None:
        if suspended:  # this node at once, announcement or not
            self._orgs.add(org_id)
            self._tell("organization", [org_id])
        else:
            self._orgs.discard(org_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            if suspended:
                pipe.sadd(SUSPENDED_KEY, str(org_id))
            else:
                pipe.srem(SUSPENDED_KEY, str(org_id))
            pipe.publish(CHANGES, f"{'o+' if suspended else 'o-'} {org_id}")
            await pipe.execute()

    async def revoke_key(self, key_id: uuid.UUID) -> None:
        """Announce a revoked API key: every node reads its keys from PostgreSQL again and
        closes what the key opened (a node that misses this does so when it reloads)."""
        self.keys_generation += 1  # this node at once, announcement or not
        self._tell("api_key", [key_id])
        now_ms = int(time.time() * 1000)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.zadd(REVOKED_KEYS_KEY, {str(key_id): now_ms})
                pipe.zremrangebyscore(REVOKED_KEYS_KEY, "-inf", now_ms - KEY_RETENTION_S * 1000)
                pipe.publish(CHANGES, f"k {key_id}")
                await pipe.execute()
        except Exception as exc:  # revoked all the same: other nodes read it within a minute
            log.warning(
                "revocations: could not record or announce a revoked API key", error=repr(exc)
            )

    def _tell(self, kind: str, ids: Sequence[uuid.UUID]) -> None:
        for listener in self.listeners:
            try:
                listener(kind, ids)
            except Exception:  # the revocation stands; only that listener's reaction is lost
                log.exception("revocations: a listener failed", kind=kind)

    # --- the watcher --------------------------------------------------------------------

    def start(self) -> None:
        self._stopping = False
        pubsub = WatchedPubSub(self.redis.connection_pool)
        pubsub.on_reconnect = self._dropped
        self._pubsub = pubsub
        self._task = asyncio.create_task(self._watch(pubsub), name="apix-revocations")

    async def stop(self) -> None:
        task, self._task = self._task, None
        pubsub, self._pubsub = self._pubsub, None
        self._loaded = False
        self._stopping = True  # the watcher checks it between reads (a ping apart at most)
        if task is not None:
            await stop_task(task, grace_s=2.0, interrupt=self._polling)
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # typed since redis 8.2

    def _dropped(self) -> None:
        # Announcements may have been missed: ask Redis until the copy is loaded again.
        self._loaded = False

    async def _watch(self, pubsub: WatchedPubSub) -> None:
        loop = asyncio.get_running_loop()
        next_ping = next_prune = 0.0
        while not self._stopping:
            try:
                if not pubsub.subscribed:
                    await pubsub.subscribe(CHANGES)
                self._polling = True
                try:
                    message = await pubsub.get_message(timeout=_PING_S)
                finally:
                    self._polling = False
                now = loop.time()
                if message is not None:
                    self._heard = now
                    if message["type"] == "subscribe":
                        # From here on nothing announced is missed: load what came before.
                        await self._load()
                    elif message["type"] == "message":
                        self._apply(message["data"])
                if now >= next_ping:
                    next_ping = now + _PING_S
                    await pubsub.ping()
                if now >= next_prune:
                    next_prune = now + _PRUNE_S
                    self._prune()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._loaded = False
                if not self._stopping:
                    log.warning("revocations: watcher failed; checks ask Redis", error=repr(exc))
                    await asyncio.sleep(_PING_S)

    async def _load(self) -> None:
        now_ms = int(time.time() * 1000)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrangebyscore(REVOKED_KEY, now_ms, "+inf", withscores=True)
            pipe.smembers(SUSPENDED_KEY)
            pipe.zrangebyscore(REVOKED_KEYS_KEY, now_ms - KEY_RETENTION_S * 1000, "+inf")
            sessions, orgs, keys = await pipe.execute()
        self._sessions = {uuid.UUID(sid.decode()): ms / 1000 for sid, ms in sessions}
        self._orgs = {uuid.UUID(org.decode()) for org in orgs}
        self.keys_generation += 1
        self._loaded = True
        # Announcements may have been missed while the subscription was down: what they
        # named is in the copy now, so listeners hear of it again (they ignore what they
        # already ended).
        for kind, ids in (
            ("session", list(self._sessions)),
            ("organization", list(self._orgs)),
            ("api_key", [uuid.UUID(key.decode()) for key in keys]),
        ):
            if ids:  # each telling walks the node's connections
                self._tell(kind, ids)

    def _apply(self, data: bytes) -> None:
        kind, _, rest = data.decode().partition(" ")
        if kind == "s":
            expiry_ms, *ids = rest.split()
            sessions = [uuid.UUID(sid) for sid in ids]
            for sid in sessions:
                self._sessions[sid] = int(expiry_ms) / 1000
            self._tell("session", sessions)
        elif kind == "o+":
            org_id = uuid.UUID(rest)
            self._orgs.add(org_id)
            self._tell("organization", [org_id])
        elif kind == "o-":
            self._orgs.discard(uuid.UUID(rest))
        elif kind == "k":
            self.keys_generation += 1
            self._tell("api_key", [uuid.UUID(rest)])

    def _prune(self) -> None:
        now = time.time()
        self._sessions = {sid: exp for sid, exp in self._sessions.items() if exp > now}
