"""Publishing and reading channels, shared by the WebSocket, SSE and HTTP surfaces."""

from __future__ import annotations

from typing import Any

from apix.core.json import loads
from apix.identity.principal import Principal
from apix.realtime.broker import Broker
from apix.realtime.channels import ChannelRef


async def publish(
    broker: Broker, principal: Principal, channel: ChannelRef, event_type: str, data: Any
) -> dict[str, Any]:
    actor = str(principal.user_id or principal.api_key_id)
    published = await broker.publish(
        channel, event_type, data, meta={"actor": actor, "actor_kind": principal.kind.value}
    )
    return {
        "offset": published.offset,
        "epoch": published.epoch,
        "id": published.id,
        "duplicate": False,
    }


async def history(
    broker: Broker, channel: ChannelRef, *, since: str | None, limit: int, reverse: bool
) -> dict[str, Any]:
    if since is not None:
        snapshot = await broker.read(channel, after=since, limit=limit, reverse=reverse)
    else:
        snapshot = await broker.read(channel, last=limit, reverse=reverse)
    events = [
        {
            "op": "event",
            "channel": channel.name,
            "offset": e.offset,
            "epoch": snapshot.epoch,
            **loads(e.payload),
            "attempt": 1,
        }
        for e in snapshot.events
    ]
    return {
        "events": events,
        "position": {"offset": snapshot.last_offset, "epoch": snapshot.epoch},
    }
