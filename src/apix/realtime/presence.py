"""Presence: who is on a channel, across nodes.

Per channel, a sorted set (connection id → last refresh, ms) and a hash (connection id →
client info) in Redis. Every node refreshes its own entries periodically; readers ignore
entries older than the TTL and prune them, so a crashed node's clients disappear within
`presence_ttl_s`. Joins and leaves are announced live to `presence: true` subscribers and
are not kept for replay.
"""

from __future__ import annotations

import time
from typing import Any

from redis.asyncio import Redis

from apix.core.json import dumps, loads
from apix.realtime.broker import new_event_id
from apix.realtime.channels import ChannelRef


def _info_key(channel: ChannelRef) -> str:
    return channel.presence_key + "i"


class Presence:
    def __init__(self, redis: Redis, *, ttl_s: int, source: str) -> None:
        self.redis = redis
        self.ttl_ms = ttl_s * 1000
        self.source = source

    async def join(self, channel: ChannelRef, member: dict[str, Any], epoch: str) -> None:
        now = int(time.time() * 1000)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zadd(channel.presence_key, {member["connection_id"]: now})
            pipe.hset(_info_key(channel), member["connection_id"], dumps(member))
            pipe.pexpire(channel.presence_key, self.ttl_ms * 2)
            pipe.pexpire(_info_key(channel), self.ttl_ms * 2)
            pipe.publish(channel.pubsub_channel, self._announcement("presence.join", member, epoch))
            await pipe.execute()

    async def leave(self, channel: ChannelRef, member: dict[str, Any], epoch: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(channel.presence_key, member["connection_id"])
            pipe.hdel(_info_key(channel), member["connection_id"])
            pipe.publish(
                channel.pubsub_channel, self._announcement("presence.leave", member, epoch)
            )
            await pipe.execute()

    async def refresh(self, entries: list[tuple[ChannelRef, str]]) -> None:
        """Mark this node's (channel, connection id) entries as alive, in one round trip."""
        if not entries:
            return
        now = int(time.time() * 1000)
        async with self.redis.pipeline(transaction=False) as pipe:
            for channel, connection_id in entries:
                pipe.zadd(channel.presence_key, {connection_id: now}, xx=True)
                pipe.pexpire(channel.presence_key, self.ttl_ms * 2)
                pipe.pexpire(_info_key(channel), self.ttl_ms * 2)
            await pipe.execute()

    async def members(self, channel: ChannelRef) -> list[dict[str, Any]]:
        cutoff = int(time.time() * 1000) - self.ttl_ms
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrangebyscore(channel.presence_key, cutoff, "+inf")
            pipe.zrangebyscore(channel.presence_key, "-inf", f"({cutoff}")
            alive, stale = await pipe.execute()
        if stale:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.zrem(channel.presence_key, *stale)
                pipe.hdel(_info_key(channel), *stale)
                await pipe.execute()
        if not alive:
            return []
        infos = await self.redis.hmget(_info_key(channel), alive)
        members = [loads(info) for info in infos if info is not None]
        return [
            {k: m.get(k) for k in ("connection_id", "user_id", "client_type", "info")}
            for m in members
        ]

    def _announcement(self, event_type: str, member: dict[str, Any], epoch: str) -> bytes:
        payload = dumps(
            {
                "id": new_event_id(),
                "type": event_type,
                "ts": int(time.time() * 1000),
                "data": {
                    k: member.get(k) for k in ("connection_id", "user_id", "client_type", "info")
                },
                "meta": {"source": self.source, "version": "1"},
            }
        )
        return b"p " + epoch.encode() + b" - " + event_type.encode() + b" " + payload
