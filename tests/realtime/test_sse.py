"""Server-Sent Events (PROTOCOL.md section 8): framing, resuming, heartbeat, auth.

Streams are read from a real uvicorn server (the ASGI test transport does not stream).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from apix.app import create_app
from tests.conftest import LiveServer, Servers, make_settings, serve_app
from tests.identity.factories import new_member, new_org_admin
from tests.realtime.raw import connected

SSE = "/api/v1/apix/sse"
CHANNELS = "/api/v1/apix/channels"


class Stream:
    """One SSE response, read item by item: an event (`id`, `event`, `data`) or a comment."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()

    async def item(self, within: float = 5.0) -> dict[str, Any]:
        return await asyncio.wait_for(self._item(), within)

    async def _item(self) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        async for line in self._lines:
            if line == "":
                if fields:
                    return fields
                continue
            if line.startswith(":"):
                fields.setdefault("comments", []).append(line[1:].strip())
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data" and "data" in fields:
                fields["data"] += "\n" + value
            else:
                fields[name] = value
        raise AssertionError(f"the stream ended; pending {fields}")

    async def events(self, count: int, within: float = 5.0) -> list[dict[str, Any]]:
        """The next ``count`` events (comments skipped), with `data` parsed."""
        out = []
        while len(out) < count:
            item = await self.item(within)
            if "data" in item:
                item["data"] = json.loads(item["data"])
                out.append(item)
        return out


@asynccontextmanager
async def sse(
    base: str,
    channels: list[str],
    *,
    token: str | None = None,
    since: list[str] | None = None,
    last_event_id: str | None = None,
    query_token: str | None = None,
) -> AsyncIterator[Stream]:
    params: list[tuple[str, str]] = [("channel", c) for c in channels]
    params += [("since", s) for s in since or []]
    if query_token:
        params.append(("access_token", query_token))
    headers = {"Accept": "text/event-stream"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if last_event_id:
        headers["Last-Event-ID"] = last_event_id
    async with (
        httpx.AsyncClient(base_url=base, timeout=10) as http,
        http.stream("GET", SSE, params=params, headers=headers) as response,
    ):
        if response.status_code != 200:
            await response.aread()
            raise AssertionError(f"SSE answered {response.status_code}: {response.text}")
        assert response.headers["content-type"].startswith("text/event-stream")
        stream = Stream(response)
        # The subscription is in place once the response has started.
        first = await stream.item()
        assert "comments" in first, first
        yield stream


async def publish(
    client: httpx.AsyncClient, headers: dict[str, str], channel: str, event_type: str, data: Any
) -> dict[str, Any]:
    response = await client.post(
        f"{CHANNELS}/{channel}/events", headers=headers, json={"type": event_type, "data": data}
    )
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def sse_id(channel: str, published: dict[str, Any]) -> str:
    return f"{channel}|{published['epoch']}|{published['offset']}"


async def test_events_carry_id_type_and_the_event_object(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    admin = await new_org_admin(client)
    channel = "room:sse"
    async with sse(live.http, [channel], token=admin.access_token) as stream:
        first = await publish(client, admin.headers, channel, "chat.message", {"text": "a\nb"})
        async with connected(live.ws, admin.access_token) as raw:
            reply = await raw.command("publish", channel=channel, type="chat.typing", data=None)
            assert reply["ok"], reply
            second = reply["result"]
        got = await stream.events(2)
    history = (await client.get(f"{CHANNELS}/{channel}/events", headers=admin.headers)).json()[
        "events"
    ]
    assert [e["id"] for e in got] == [sse_id(channel, first), sse_id(channel, second)]
    assert [e["event"] for e in got] == ["chat.message", "chat.typing"]
    for item, stored in zip(got, history, strict=True):
        event = item["data"]
        assert set(event) >= {"op", "channel", "offset", "epoch", "id", "type", "ts", "data"}
        assert set(event) >= {"meta", "attempt"}
        assert event == stored
        assert event["op"] == "event"
        assert event["channel"] == channel
        assert event["meta"]["version"] == "1"
        assert event["attempt"] == 1
    assert got[0]["data"]["data"] == {"text": "a\nb"}
    assert got[0]["data"]["id"] == first["id"]
    assert got[0]["data"]["offset"] == first["offset"]


async def test_user_me_streams_under_the_canonical_name(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    admin = await new_org_admin(client)
    viewer = await new_member(client, admin, "VIEWER")
    inbox = f"user:{viewer.user_id}"
    async with sse(live.http, ["user:me"], token=viewer.access_token) as stream:
        published = await publish(client, admin.headers, inbox, "inbox.note", 1)
        (item,) = await stream.events(1)
    assert item["id"] == sse_id(inbox, published)
    assert item["data"]["channel"] == inbox
    # The id it got back resumes the `user:me` stream.
    missed = await publish(client, admin.headers, inbox, "inbox.note", 2)
    async with sse(
        live.http, ["user:me"], token=viewer.access_token, last_event_id=item["id"]
    ) as stream:
        (item,) = await stream.events(1)
    assert item["id"] == sse_id(inbox, missed)


async def test_reconnecting_with_last_event_id_gives_exactly_the_missed_events(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    admin = await new_org_admin(client)
    channel = "room:resume"
    async with sse(live.http, [channel], token=admin.access_token) as stream:
        seen = [await publish(client, admin.headers, channel, "e.v", n) for n in range(3)]
        got = await stream.events(3)
        assert [e["id"] for e in got] == [sse_id(channel, p) for p in seen]
        last_id = got[-1]["id"]
    missed = [await publish(client, admin.headers, channel, "e.v", n) for n in range(3, 6)]
    async with sse(live.http, [channel], token=admin.access_token, last_event_id=last_id) as stream:
        replayed = await stream.events(3)
        assert [e["id"] for e in replayed] == [sse_id(channel, p) for p in missed]
        after = await publish(client, admin.headers, channel, "e.v", 6)
        (live_one,) = await stream.events(1)
        assert live_one["id"] == sse_id(channel, after)
        assert [e["data"]["data"] for e in [*replayed, live_one]] == [3, 4, 5, 6]

    # A Last-Event-ID of another life of the stream (wrong epoch) replays nothing.
    stale = f"{channel}|not-this-epoch|{seen[0]['offset']}"
    async with sse(live.http, [channel], token=admin.access_token, last_event_id=stale) as stream:
        after = await publish(client, admin.headers, channel, "e.v", 7)
        (first,) = await stream.events(1)
        assert first["id"] == sse_id(channel, after)


async def test_since_resumes_each_channel_from_its_own_position(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    admin = await new_org_admin(client)
    a, b, c = "room:a", "room:b", "org"
    pa = [await publish(client, admin.headers, a, "e.a", n) for n in range(3)]
    pb = [await publish(client, admin.headers, b, "e.b", n) for n in range(3)]
    await publish(client, admin.headers, c, "e.c", 0)
    since = [sse_id(a, pa[0]), sse_id(b, pb[1])]
    async with sse(live.http, [a, b, c], token=admin.access_token, since=since) as stream:
        replayed = await stream.events(3)
        assert sorted(e["id"] for e in replayed) == sorted(
            [sse_id(a, pa[1]), sse_id(a, pa[2]), sse_id(b, pb[2])]
        )
        assert [e["id"] for e in replayed if e["id"].startswith(a)] == [
            sse_id(a, pa[1]),
            sse_id(a, pa[2]),
        ]
        # `org` had no position: live only.
        live_c = await publish(client, admin.headers, c, "e.c", 1)
        live_a = await publish(client, admin.headers, a, "e.a", 3)
        got = await stream.events(2)
        assert [e["id"] for e in got] == [sse_id(c, live_c), sse_id(a, live_a)]
        assert [e["event"] for e in got] == ["e.c", "e.a"]


async def test_access_token_query_parameter_authenticates(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    admin = await new_org_admin(client)
    async with sse(live.http, ["room:q"], query_token=admin.access_token) as stream:
        published = await publish(client, admin.headers, "room:q", "e.q", 1)
        (item,) = await stream.events(1)
    assert item["id"] == sse_id("room:q", published)


async def test_refusals_use_the_error_model(client: httpx.AsyncClient) -> None:
    admin = await new_org_admin(client)
    viewer = await new_member(client, admin, "VIEWER")

    async def refused(status: int, code: str | set[str], **kwargs: Any) -> None:
        response = await client.get(SSE, **kwargs)
        assert response.status_code == status, response.text
        body = response.json()
        assert body["error"]["code"] in ({code} if isinstance(code, str) else code), body
        assert isinstance(body["error"]["message"], str)

    await refused(401, "unauthorized", params={"channel": "room:x"})
    bad_token = {"unauthorized", "invalid_token"}  # HTTP's code for a token that is not valid
    await refused(401, bad_token, params={"channel": "room:x", "access_token": "not-a-token"})
    await refused(
        401,
        bad_token,
        params={"channel": "room:x"},
        headers={"Authorization": "Bearer not-a-token"},
    )
    for channel in ("hitl", "monitor", f"user:{admin.user_id}"):
        await refused(403, "forbidden", params={"channel": channel}, headers=viewer.headers)
        await refused(
            403, "forbidden", params={"channel": channel, "access_token": viewer.access_token}
        )
    # One forbidden channel among allowed ones refuses the whole stream.
    await refused(
        403,
        "forbidden",
        params=[("channel", "room:x"), ("channel", "hitl")],
        headers=viewer.headers,
    )
    await refused(404, "not_found", params={"channel": "nope:x"}, headers=viewer.headers)
    await refused(400, "bad_request", params={"channel": "Room:x"}, headers=viewer.headers)
    await refused(400, "bad_request", params={"channel": "org:x"}, headers=viewer.headers)
    await refused(
        400,
        "bad_request",
        params={"channel": "room:x"},
        headers={**viewer.headers, "Last-Event-ID": "garbage"},
    )


async def test_a_heartbeat_comment_arrives(servers: Servers) -> None:
    settings = make_settings(servers, realtime={"sse_heartbeat_s": 0.2})
    app = create_app(settings)
    async with app.router.lifespan_context(app), serve_app(app, settings) as server:
        async with httpx.AsyncClient(base_url=server.http) as http:
            admin = await new_org_admin(http)
        async with sse(server.http, ["room:beat"], token=admin.access_token) as stream:
            comments: list[str] = []
            for _ in range(2):
                item = await stream.item(within=2.0)
                assert "data" not in item, item
                comments += item["comments"]
            assert len(comments) >= 2
            # Events still flow between heartbeats.
            async with httpx.AsyncClient(base_url=server.http) as http:
                published = await publish(http, admin.headers, "room:beat", "e.b", 1)
            (item,) = await stream.events(1)
            assert item["id"] == sse_id("room:beat", published)


async def test_resume_has_no_duplicate_when_announcements_lag(
    client: httpx.AsyncClient, live: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection: this node hears channel announcements 0.3 s late, so an event can be
    in the stream (and in the replay) before its announcement reaches the node."""
    admin = await new_org_admin(client)
    channel = "room:sse-lag"
    async with connected(live.ws, admin.access_token) as watcher:
        await watcher.subscribe(channel)  # this node now listens to the channel
        pubsub = live.app.state.gateway.hub._pubsub
        receive = pubsub.get_message

        async def late(*args: Any, **kwargs: Any) -> Any:
            message = await receive(*args, **kwargs)
            if message is not None and message["type"] == "message":
                await asyncio.sleep(0.3)
            return message

        monkeypatch.setattr(pubsub, "get_message", late)
        warmup = await publish(client, admin.headers, channel, "e.v", "warm-up")
        await watcher.events(1)  # the hub's read in progress was not slowed; later ones are
        first = await publish(client, admin.headers, channel, "e.v", "first")
        resume_from = sse_id(channel, warmup)
        async with sse(
            live.http, [channel], token=admin.access_token, last_event_id=resume_from
        ) as stream:
            second = await publish(client, admin.headers, channel, "e.v", "second")
            got = await stream.events(2)
            assert [e["id"] for e in got] == [sse_id(channel, first), sse_id(channel, second)]
