"""PROTOCOL.md sections 4, 5 and 7 over the WebSocket: channels, permissions, subscribing,
replay and recovery, filters, presence, history and the shape of events.

Every test talks to a real uvicorn server with the raw protocol client; set-up that the
protocol cannot do (losing a stream) goes to Redis directly.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from apix.realtime.channels import channel_prefix
from tests.conftest import LiveServer, Servers
from tests.identity.factories import Account, bearer, new_member, new_org_admin, new_super_admin
from tests.realtime.raw import Raw, connected, raw_socket

CHANNELS = "/api/v1/apix/channels"


# --- helpers ------------------------------------------------------------------------------


def okey(offset: str) -> tuple[int, int]:
    """Offsets compare as stream ids: (milliseconds, sequence)."""
    ms, _, seq = offset.partition("-")
    return int(ms), int(seq)


async def http_publish(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    channel: str,
    event_type: str = "test.event",
    data: Any = None,
) -> dict[str, Any]:
    response = await client.post(
        f"{CHANNELS}/{channel}/events", headers=headers, json={"type": event_type, "data": data}
    )
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


async def http_history(
    client: httpx.AsyncClient, headers: dict[str, str], channel: str, **params: Any
) -> dict[str, Any]:
    params.setdefault("limit", 1000)
    response = await client.get(f"{CHANNELS}/{channel}/events", headers=headers, params=params)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def error_code(reply: dict[str, Any]) -> str | None:
    """None for a successful reply, else its error code."""
    if reply["ok"]:
        return None
    return reply["error"]["code"]  # type: ignore[no-any-return]


async def events_until(raw: Raw, channel: str, offset: str) -> list[dict[str, Any]]:
    """Every event of ``channel`` received up to and including the one at ``offset``."""
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + 5.0
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no event at {offset} on {channel}; got {out}"
        (event,) = await raw.events(1, timeout=remaining)
        if event["channel"] != channel:
            continue
        out.append(event)
        if event["offset"] is not None and okey(event["offset"]) >= okey(offset):
            return out


def stream_key(org_id: str, channel: str) -> str:
    return f"{channel_prefix(org_id, channel)}:s"


# --- permissions (section 4) ------------------------------------------------------------

ROLES = ["VIEWER", "DEVELOPER", "ORG_ADMIN"]
RANK = {role: index for index, role in enumerate(ROLES)}
SELF, OTHER = "SELF", "OTHER"

# (channel, who may subscribe, who may publish from a client; None: nobody).
TABLE: list[tuple[str, str, str | None]] = [
    ("agents", "VIEWER", None),
    ("agents:agt_42", "VIEWER", None),
    ("tools", "VIEWER", None),
    ("tools:tool.search", "VIEWER", None),
    ("workflows:wf_1", "VIEWER", None),
    ("providers:openai", "VIEWER", None),
    ("knowledge:kb-1", "VIEWER", None),
    ("sessions:sess_1", "DEVELOPER", "DEVELOPER"),
    ("user:{self}", SELF, None),
    ("user:me", SELF, None),
    ("user:{other}", OTHER, None),
    ("org", "VIEWER", "ORG_ADMIN"),
    ("room:lobby", "VIEWER", "VIEWER"),
    ("hitl", "DEVELOPER", None),
    ("hitl:approvals", "DEVELOPER", None),
    ("system", "VIEWER", None),
    ("monitor", "ORG_ADMIN", None),
]


def _allowed(rule: str | None, role: str) -> bool:
    if rule is None or rule == OTHER:
        return False
    if rule == SELF:
        return True
    return RANK[role] >= RANK[rule]


@pytest.mark.parametrize("role", ROLES)
async def test_subscribe_and_client_publish_permissions_follow_the_namespace_table(
    client: httpx.AsyncClient, live: LiveServer, role: str
) -> None:
    admin = await new_org_admin(client)
    member = await new_member(client, admin, role)
    problems: list[str] = []
    async with connected(live.ws, member.access_token) as raw:
        for template, who_subscribes, who_publishes in TABLE:
            channel = template.format(self=member.user_id, other=admin.user_id)
            canonical = channel.replace("user:me", f"user:{member.user_id}")

            reply = await raw.command("subscribe", channel=channel)
            want = None if _allowed(who_subscribes, role) else "forbidden"
            if error_code(reply) != want:
                problems.append(f"subscribe {channel}: expected {want or 'ok'}, got {reply}")
            elif want is None and reply["result"]["channel"] != canonical:
                problems.append(f"subscribe {channel}: reply names {reply['result']['channel']}")
            if error_code(reply) is None:
                # `user:me` and `user:<own id>` are one channel: leave it before the next row.
                reply = await raw.command("unsubscribe", channel=channel)
                if error_code(reply) is not None:
                    problems.append(f"unsubscribe {channel}: {reply}")

            reply = await raw.command(
                "publish", channel=channel, type="perm.check", data={"role": role}
            )
            want = None if _allowed(who_publishes, role) else "forbidden"
            if error_code(reply) != want:
                problems.append(f"publish {channel}: expected {want or 'ok'}, got {reply}")
    assert not problems, "\n".join(problems)


async def test_history_and_presence_need_subscribe_permission(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    admin = await new_org_admin(client)
    viewer = await new_member(client, admin, "VIEWER")
    async with connected(live.ws, viewer.access_token) as raw:
        for channel in ("hitl", "monitor", f"user:{admin.user_id}"):
            for op in ("history", "presence"):
                reply = await raw.command(op, channel=channel)
                assert error_code(reply) == "forbidden", (op, channel, reply)
        for channel in ("room:lobby", "org", "user:me"):
            for op in ("history", "presence"):
                reply = await raw.command(op, channel=channel)
                assert error_code(reply) is None, (op, channel, reply)


BAD_NAMES: list[tuple[Any, str]] = [
    ("nope", "not_found"),
    ("nope:key", "not_found"),
    ("widgets:w1", "not_found"),
    ("Room:lobby", "bad_request"),  # namespace: lower case only
    ("1room:lobby", "bad_request"),  # namespace starts with a letter
    ("ro om:lobby", "bad_request"),
    ("room.x:lobby", "bad_request"),
    ("", "bad_request"),
    ("room:", "bad_request"),  # empty key
    ("room:a b", "bad_request"),
    ("room:a/b", "bad_request"),
    ("room:a:b", "bad_request"),
    ("room:" + "k" * 129, "bad_request"),  # key longer than 128
    ("r" * 72 + ":" + "k" * 128, "bad_request"),  # 201 characters in all
    ("r" * 201, "bad_request"),
    ("org:x", "bad_request"),  # `org` takes no key
    ("system:x", "bad_request"),
    ("monitor:x", "bad_request"),
    ("room", "bad_request"),  # `room` needs one
    ("user", "bad_request"),
    ("sessions", "bad_request"),
    (42, "bad_request"),
    (None, "bad_request"),
]


async def test_names_that_break_the_grammar_or_name_no_namespace_are_refused(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    admin = await new_org_admin(client)
    problems: list[str] = []
    async with connected(live.ws, admin.access_token) as raw:
        for channel, code in BAD_NAMES:
            for op, fields in (
                ("subscribe", {}),
                ("publish", {"type": "x.y", "data": None}),
                ("history", {}),
                ("presence", {}),
            ):
                reply = await raw.command(op, channel=channel, **fields)
                if error_code(reply) != code:
                    problems.append(f"{op} {channel!r}: expected {code}, got {reply}")
        # Still connected and working after all those refusals.
        assert (await raw.subscribe("room:fine"))["channel"] == "room:fine"
    assert not problems, "\n".join(problems)


async def test_longest_valid_names_are_accepted(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    admin = await new_org_admin(client)
    async with connected(live.ws, admin.access_token) as raw:
        for channel in ("room:" + "k" * 128, "room:A-Z_a.z@x=1", "agents", "agents:a"):
            added = await raw.subscribe(channel)
            assert added["channel"] == channel


async def test_subscribing_twice_is_a_conflict_also_through_the_user_me_alias(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    admin = await new_org_admin(client)
    async with connected(live.ws, admin.access_token) as raw:
        await raw.subscribe("room:twice")
        assert error_code(await raw.command("subscribe", channel="room:twice")) == "conflict"
        added = await raw.subscribe("user:me")
        assert added["channel"] == f"user:{admin.user_id}"
        reply = await raw.command("subscribe", channel=f"user:{admin.user_id}")
        assert error_code(reply) == "conflict"
        # The first subscription still works.
        published = await http_publish(client, admin.headers, "room:twice")
        (event,) = await raw.events(1)
        assert event["offset"] == published["offset"]
        assert not [f for f in raw.frames if f.get("op") == "event"]


async def test_after_unsubscribe_no_more_events_arrive(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    admin = await new_org_admin(client)
    async with connected(live.ws, admin.access_token) as raw:
        await raw.subscribe("room:leaving")
        await raw.subscribe("room:staying")
        first = await http_publish(client, admin.headers, "room:leaving")
        assert [e["offset"] for e in await events_until(raw, "room:leaving", first["offset"])] == [
            first["offset"]
        ]
        reply = await raw.command("unsubscribe", channel="room:leaving")
        assert reply["ok"] is True, reply
        await http_publish(client, admin.headers, "room:leaving")
        await raw.command("publish", channel="room:leaving", type="x.y", data=1)
        sentinel = await http_publish(client, admin.headers, "room:staying")
        (event,) = await raw.events(1)
        assert (event["channel"], event["offset"]) == ("room:staying", sentinel["offset"])
        assert not [f for f in raw.frames if f.get("op") == "event"]
        # Subscribing again works (no conflict), and only new events come.
        added = await raw.subscribe("room:leaving")
        assert added["replayed"] == 0
        again = await http_publish(client, admin.headers, "room:leaving")
        (event,) = await raw.events(1)
        assert event["offset"] == again["offset"]


# --- tenant isolation -----------------------------------------------------------------------


async def test_same_channel_name_in_two_organisations_never_crosses(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    alpha = await new_org_admin(client)
    beta = await new_org_admin(client)
    channel = "room:shared"
    async with (
        connected(live.ws, alpha.access_token) as a,
        connected(live.ws, beta.access_token) as b,
    ):
        await a.subscribe(channel)
        await b.subscribe(channel)
        mine: dict[str, list[str]] = {"alpha": [], "beta": []}

        async def ws_publish(raw: Raw, who: str, n: int) -> None:
            reply = await raw.command("publish", channel=channel, type="chat.msg", data=f"{who}{n}")
            assert reply["ok"], reply
            mine[who].append(reply["result"]["offset"])

        async def publish_http(account: Account, who: str, n: int) -> None:
            result = await http_publish(client, account.headers, channel, "chat.msg", f"{who}{n}")
            mine[who].append(result["offset"])

        await ws_publish(a, "alpha", 1)
        await ws_publish(b, "beta", 1)
        await publish_http(alpha, "alpha", 2)
        await publish_http(beta, "beta", 2)
        await ws_publish(a, "alpha", 3)
        await ws_publish(b, "beta", 3)

        got_a = await events_until(a, channel, mine["alpha"][-1])
        got_b = await events_until(b, channel, mine["beta"][-1])
        assert [e["data"] for e in got_a] == ["alpha1", "alpha2", "alpha3"]
        assert [e["data"] for e in got_b] == ["beta1", "beta2", "beta3"]
        assert [e["offset"] for e in got_a] == mine["alpha"]
        assert [e["offset"] for e in got_b] == mine["beta"]

        # History: over WebSocket and HTTP, each tenant sees only its own events.
        for raw, account, who in ((a, alpha, "alpha"), (b, beta, "beta")):
            reply = await raw.command("history", channel=channel, limit=100)
            assert [e["data"] for e in reply["result"]["events"]] == [
                f"{who}{n}" for n in (1, 2, 3)
            ]
            http = await http_history(client, account.headers, channel)
            assert [e["data"] for e in http["events"]] == [f"{who}{n}" for n in (1, 2, 3)]

        # A replay from the start sees only the tenant's own events too.
        async with connected(live.ws, beta.access_token) as late:
            added = await late.subscribe(channel, since={"offset": "0-0"})
            assert added["replayed"] == 3
            replayed = await late.events(3)
            assert [e["data"] for e in replayed] == ["beta1", "beta2", "beta3"]
        async with connected(live.ws, alpha.access_token) as late:
            added = await late.subscribe(channel, last=10)
            assert added["replayed"] == 3
            replayed = await late.events(3)
            assert [e["data"] for e in replayed] == ["alpha1", "alpha2", "alpha3"]


# --- replay and recovery (section 5) -------------------------------------------------------


async def test_since_replays_exactly_the_missed_events_then_live_while_a_publisher_runs(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    admin = await new_org_admin(client)
    channel = "room:replay"
    before = [await http_publish(client, admin.headers, channel, data=n) for n in range(10)]
    published: list[dict[str, Any]] = []
    running, subscribed = asyncio.Event(), asyncio.Event()

    async def publisher() -> None:
        # Keeps publishing while the subscription is made, and 20 events after it.
        n, extra = 10, 0
        while extra < 20 and n < 1000:
            published.append(await http_publish(client, admin.headers, channel, data=n))
            n += 1
            extra += subscribed.is_set()
            if len(published) == 5:
                running.set()
            await asyncio.sleep(0.001)

    task = asyncio.create_task(publisher())
    try:
        async with connected(live.ws, admin.access_token) as raw:
            await asyncio.wait_for(running.wait(), 5)
            since = before[4]
            added = await raw.subscribe(
                channel, since={"offset": since["offset"], "epoch": since["epoch"]}
            )
            subscribed.set()
            await task
            assert added["recovered"] is True
            assert added["position"]["epoch"] == since["epoch"]
            # Some events were published after the replay was read: they came live.
            assert okey(added["position"]["offset"]) < okey(published[-1]["offset"])
            got = await events_until(raw, channel, published[-1]["offset"])
            history = await http_history(client, admin.headers, channel)
            expected = [
                e["offset"] for e in history["events"] if okey(e["offset"]) > okey(since["offset"])
            ]
            assert [e["offset"] for e in got] == expected
            assert [e["data"] for e in got] == list(range(5, 10 + len(published)))
            in_replay = [o for o in expected if okey(o) <= okey(added["position"]["offset"])]
            assert added["replayed"] == len(in_replay)
            assert added["replayed"] >= 5
    finally:
        await task


def _lagging_announcements(live: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault injection: this node hears channel announcements 0.3 s late.

    A busy node, or a slower link to Redis for pub/sub than for commands, does this; the
    stream itself is unaffected, so a read can see an event before its announcement arrives.
    """
    pubsub = live.app.state.gateway.hub._pubsub
    receive = pubsub.get_message

    async def late(*args: Any, **kwargs: Any) -> Any:
        message = await receive(*args, **kwargs)
        if message is not None and message["type"] == "message":
            await asyncio.sleep(0.3)
        return message

    monkeypatch.setattr(pubsub, "get_message", late)


async def test_replay_then_live_has_no_duplicate_when_announcements_lag(
    client: httpx.AsyncClient, live: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    admin = await new_org_admin(client)
    channel = "room:lag"
    async with (
        connected(live.ws, admin.access_token) as watcher,
        connected(live.ws, admin.access_token) as from_start,
        connected(live.ws, admin.access_token) as live_only,
    ):
        await watcher.subscribe(channel)  # this node now listens to the channel
        _lagging_announcements(live, monkeypatch)
        # The hub's read in progress is not slowed; the ones after this event are.
        warmup = await http_publish(client, admin.headers, channel, data="warm-up")
        await events_until(watcher, channel, warmup["offset"])
        first = await http_publish(client, admin.headers, channel, data="first")
        # The event is in the stream; its announcement has not reached the node yet.
        added = await from_start.subscribe(channel, since={"offset": "0-0"})
        assert (added["recovered"], added["replayed"]) == (True, 2)
        assert added["position"]["offset"] == first["offset"]
        added = await live_only.subscribe(channel)
        assert added["position"]["offset"] == first["offset"]
        second = await http_publish(client, admin.headers, channel, data="second")

        readers = {"watcher": watcher, "from_start": from_start, "live_only": live_only}
        seen = {
            name: [e["data"] for e in await events_until(raw, channel, second["offset"])]
            for name, raw in readers.items()
        }
        assert seen == {
            "watcher": ["first", "second"],
            # Replayed once, not again when the late announcement arrives.
            "from_start": ["warm-up", "first", "second"],
            # Live after its position: the event at the position is not sent again.
            "live_only": ["second"],
        }


async def test_last_n_replays_the_last_n_events_then_live_ones(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    admin = await new_org_admin(client)
    channel = "room:late"
    published = [await http_publish(client, admin.headers, channel, data=n) for n in range(6)]
    async with connected(live.ws, admin.access_token) as raw:
        added = await raw.subscribe(channel, last=3)
        assert added["recovered"] is True
        assert added["replayed"] == 3
        assert added["position"]["offset"] == published[-1]["offset"]
        live_one = await http_publish(client, admin.headers, channel, data=6)
        got = await events_until(raw, channel, live_one["offset"])
        assert [e["data"] for e in got] == [3, 4, 5, 6]
    async with connected(live.ws, admin.access_token) as raw:
        added = await raw.subscribe(channel, last=100)  # more than there are
        assert added["replayed"] == 7
        assert [e["data"] for e in await raw.events(7)] == list(range(7))
    async with connected(live.ws, admin.access_token) as raw:
        added = await raw.subscribe(channel)  # neither since nor last: live only
        assert added["replayed"] == 0
        live_two = await http_publish(client, admin.headers, channel, data=7)
        assert [e["data"] for e in await events_until(raw, channel, live_two["offset"])] == [7]


async def test_a_lost_stream_is_not_recovered_and_live_events_follow(
    client: httpx.AsyncClient, live: LiveServer, servers: Servers
) -> None:
    admin = await new_org_admin(client)
    channel = "room:lost"
    old = [await http_publish(client, admin.headers, channel, data=n) for n in range(3)]
    redis = Redis.from_url(servers.redis_url)
    try:
        assert await redis.delete(stream_key(admin.org_id, channel)) == 1
    finally:
        await redis.aclose()
    restarted = await http_publish(client, admin.headers, channel, data="new life")
    assert restarted["epoch"] != old[0]["epoch"], "a lost stream must start a new epoch"
    async with connected(live.ws, admin.access_token) as raw:
        added = await raw.subscribe(
            channel, since={"offset": old[0]["offset"], "epoch": old[0]["epoch"]}
        )
        assert added["recovered"] is False
        assert added["replayed"] == 0
        assert added["position"]["epoch"] == restarted["epoch"]
        after = await http_publish(client, admin.headers, channel, data="live")
        got = await events_until(raw, channel, after["offset"])
        assert [e["data"] for e in got] == ["live"]
        assert got[0]["epoch"] == restarted["epoch"]


async def test_a_lost_stream_is_not_recovered_even_before_anything_new_is_published(
    client: httpx.AsyncClient, live: LiveServer, servers: Servers
) -> None:
    """Events 2 and 3 are gone: a position before them cannot be honoured."""
    admin = await new_org_admin(client)
    channel = "room:lost-quiet"
    old = [await http_publish(client, admin.headers, channel, data=n) for n in range(3)]
    redis = Redis.from_url(servers.redis_url)
    try:
        assert await redis.delete(stream_key(admin.org_id, channel)) == 1
    finally:
        await redis.aclose()
    async with connected(live.ws, admin.access_token) as raw:
        added = await raw.subscribe(
            channel, since={"offset": old[0]["offset"], "epoch": old[0]["epoch"]}
        )
        assert added["recovered"] is False, added
        assert added["replayed"] == 0
        after = await http_publish(client, admin.headers, channel, data="live")
        got = await events_until(raw, channel, after["offset"])
        assert [e["data"] for e in got] == ["live"]


async def test_a_different_epoch_is_not_recovered(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    admin = await new_org_admin(client)
    channel = "room:epochs"
    old = [await http_publish(client, admin.headers, channel, data=n) for n in range(3)]
    async with connected(live.ws, admin.access_token) as raw:
        added = await raw.subscribe(
            channel, since={"offset": old[0]["offset"], "epoch": "another-life"}
        )
        assert added["recovered"] is False
        assert added["replayed"] == 0
        assert added["position"] == {"offset": old[-1]["offset"], "epoch": old[0]["epoch"]}
        after = await http_publish(client, admin.headers, channel, data="live")
        got = await events_until(raw, channel, after["offset"])
        assert [e["data"] for e in got] == ["live"]
    async with connected(live.ws, admin.access_token) as raw:
        # The same position with the right epoch (or none) is recovered.
        added = await raw.subscribe(
            channel, since={"offset": old[0]["offset"], "epoch": old[0]["epoch"]}
        )
        assert (added["recovered"], added["replayed"]) == (True, 3)


async def test_a_position_older_than_what_is_kept_is_not_recovered(
    client: httpx.AsyncClient, live: LiveServer, runtime: Any
) -> None:
    """`system` keeps 100 events: after 105, the first five are gone."""
    root = await new_super_admin(client, runtime)
    admin = await new_org_admin(client)
    published = [
        await http_publish(client, bearer(root["access_token"]), "system", "notice", n)
        for n in range(105)
    ]
    history = await http_history(client, admin.headers, "system")
    assert [e["data"] for e in history["events"]] == list(range(5, 105))
    async with (
        connected(live.ws, admin.access_token) as too_old,
        connected(live.ws, admin.access_token) as just_kept,
    ):
        # Event 5 (index 4) is gone: a position at event 4 cannot be honoured.
        position = published[3]
        added = await too_old.subscribe(
            "system", since={"offset": position["offset"], "epoch": position["epoch"]}
        )
        assert (added["recovered"], added["replayed"]) == (False, 0)
        # Everything after event 5 is still kept.
        position = published[4]
        added = await just_kept.subscribe(
            "system", since={"offset": position["offset"], "epoch": position["epoch"]}
        )
        assert (added["recovered"], added["replayed"]) == (True, 100)
        after = await http_publish(client, bearer(root["access_token"]), "system", "notice", 105)
        got = await events_until(too_old, "system", after["offset"])
        assert [e["data"] for e in got] == [105]
        got = await events_until(just_kept, "system", after["offset"])
        assert [e["data"] for e in got] == list(range(5, 106))


async def test_type_filters_send_only_matching_events_and_never_break_recovery(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    admin = await new_org_admin(client)
    channel = "agents:agt_42"
    types = ["tool.call.started", "agent.run.started", "tool.call.finished", "agent.run.completed"]
    types += ["tool.result", "tool.call.x.y"]
    wanted = {"tool.call.started", "tool.call.finished", "agent.run.completed", "tool.call.x.y"}
    filter_ = {"types": ["tool.call.*", "agent.run.completed"]}
    async with connected(live.ws, admin.access_token) as raw:
        await raw.subscribe(channel, filter=filter_)
        published = [await http_publish(client, admin.headers, channel, t, t) for t in types]
        got = await events_until(raw, channel, published[-1]["offset"])
        assert [e["type"] for e in got] == [t for t in types if t in wanted]
        last_seen = got[-1]["offset"]

    # Not matching, then matching, while away.
    away = [
        await http_publish(client, admin.headers, channel, t, t)
        for t in ("agent.run.started", "tool.call.again", "other.thing")
    ]
    async with connected(live.ws, admin.access_token) as raw:
        added = await raw.subscribe(
            channel, since={"offset": last_seen, "epoch": published[0]["epoch"]}, filter=filter_
        )
        assert added["recovered"] is True
        assert added["replayed"] == 1
        (event,) = await raw.events(1)
        assert (event["type"], event["offset"]) == ("tool.call.again", away[1]["offset"])

    # A filtered subscriber whose last event was followed only by filtered-out ones resumes
    # from its last offset without loss: the unfiltered replay shows everything after it.
    async with connected(live.ws, admin.access_token) as raw:
        added = await raw.subscribe(
            channel, since={"offset": last_seen, "epoch": published[0]["epoch"]}
        )
        assert (added["recovered"], added["replayed"]) == (True, 3)
        assert [e["offset"] for e in await raw.events(3)] == [p["offset"] for p in away]


async def test_filtered_live_subscriber_with_concurrent_unfiltered_one_sees_only_matches(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    admin = await new_org_admin(client)
    channel = "tools"
    async with (
        connected(live.ws, admin.access_token) as filtered,
        connected(live.ws, admin.access_token) as everything,
    ):
        await filtered.subscribe(channel, filter={"types": ["tool.?.done", "x.[ab]"]})
        await everything.subscribe(channel)
        types = ["tool.a.done", "tool.ab.done", "x.a", "x.c", "x.b", "tool.b.done"]
        published = [await http_publish(client, admin.headers, channel, t) for t in types]
        got = await events_until(filtered, channel, published[-1]["offset"])
        assert [e["type"] for e in got] == ["tool.a.done", "x.a", "x.b", "tool.b.done"]
        all_events = await events_until(everything, channel, published[-1]["offset"])
        assert [e["type"] for e in all_events] == types


# --- presence (section 7) --------------------------------------------------------------------


async def test_presence_events_commands_and_http_list(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    admin = await new_org_admin(client)
    viewer = await new_member(client, admin, "VIEWER")
    channel = "room:presence"
    async with connected(
        live.ws, admin.access_token, client={"type": "WEB_APP", "name": "console"}
    ) as watcher:
        await watcher.subscribe(channel, presence=True)
        async with connected(live.ws, admin.access_token) as plain:
            await plain.subscribe(channel)  # no presence: gets no presence events
            async with raw_socket(live.ws) as joiner:
                hello = await joiner.connect(
                    viewer.access_token, client={"type": "MOBILE_APP", "name": "phone"}
                )
                await joiner.subscribe(channel, presence=True)
                join = await _presence_event(watcher, "presence.join", viewer.user_id)
                assert join["offset"] is None
                assert join["channel"] == channel
                assert isinstance(join["epoch"], str)
                member = join["data"]
                assert member["user_id"] == viewer.user_id
                assert member["client_type"] == "MOBILE_APP"
                assert member["info"] == {"name": "phone"}
                assert member["connection_id"] == hello["connection_id"]

                reply = await watcher.command("presence", channel=channel)
                clients = {c["connection_id"]: c for c in reply["result"]["clients"]}
                assert member["connection_id"] in clients
                assert clients[member["connection_id"]] == member
                assert {c["user_id"] for c in clients.values()} == {admin.user_id, viewer.user_id}
                for c in clients.values():
                    assert set(c) == {"connection_id", "user_id", "client_type", "info"}
                ours = next(c for c in clients.values() if c["user_id"] == admin.user_id)
                assert (ours["client_type"], ours["info"]) == ("WEB_APP", {"name": "console"})

                http = await client.get(f"{CHANNELS}/{channel}/presence", headers=viewer.headers)
                assert http.status_code == 200, http.text
                listed = {c["connection_id"]: c for c in http.json()["clients"]}
                assert listed == clients

                reply = await joiner.command("unsubscribe", channel=channel)
                assert reply["ok"]
                leave = await _presence_event(watcher, "presence.leave", viewer.user_id)
                assert leave["offset"] is None
                assert leave["data"]["connection_id"] == member["connection_id"]
                await joiner.subscribe(channel, presence=True)
                rejoin = await _presence_event(watcher, "presence.join", viewer.user_id)
            # Closing the socket is a leave too.
            leave = await _presence_event(watcher, "presence.leave", viewer.user_id)
            assert leave["data"]["connection_id"] == rejoin["data"]["connection_id"]
            http = await client.get(f"{CHANNELS}/{channel}/presence", headers=viewer.headers)
            assert {c["user_id"] for c in http.json()["clients"]} == {admin.user_id}

            # The plain subscriber saw none of it; presence events are not kept for replay.
            sentinel = await http_publish(client, admin.headers, channel, "chat.msg")
            got = await events_until(plain, channel, sentinel["offset"])
            assert [e["type"] for e in got] == ["chat.msg"]
    history = await http_history(client, admin.headers, channel)
    assert [e["type"] for e in history["events"]] == ["chat.msg"]
    async with connected(live.ws, admin.access_token) as late:
        added = await late.subscribe(channel, since={"offset": "0-0"}, presence=True)
        assert added["replayed"] == 1
        (event,) = await late.events(1)
        assert event["type"] == "chat.msg"


async def _presence_event(raw: Raw, event_type: str, user_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 5
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {event_type} for {user_id}"
        (event,) = await raw.events(1, timeout=remaining)
        if event["type"] == event_type and event["data"]["user_id"] == user_id:
            return event


# --- history, publish results and events (sections 5, 7) ----------------------------------


async def test_history_command_since_limit_and_reverse(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    admin = await new_org_admin(client)
    channel = "room:history"
    async with connected(live.ws, admin.access_token) as raw:
        empty = await raw.command("history", channel=channel)
        assert empty["result"]["events"] == []
        offsets = []
        for n in range(6):
            reply = await raw.command("publish", channel=channel, type="h.e", data=n)
            offsets.append(reply["result"]["offset"])
            await asyncio.sleep(0.11)  # stay under 10 publishes/s on one channel
        epoch = reply["result"]["epoch"]

        async def history(**fields: Any) -> list[int]:
            reply = await raw.command("history", channel=channel, **fields)
            assert reply["ok"], reply
            result = reply["result"]
            assert result["position"] == {"offset": offsets[-1], "epoch": epoch}
            for event in result["events"]:
                assert event["op"] == "event"
                assert event["channel"] == channel
                assert event["epoch"] == epoch
                assert offsets[event["data"]] == event["offset"]
            return [e["data"] for e in result["events"]]

        assert await history() == [0, 1, 2, 3, 4, 5]
        assert await history(limit=3) == [3, 4, 5]
        assert await history(limit=3, reverse=True) == [5, 4, 3]
        assert await history(reverse=True) == [5, 4, 3, 2, 1, 0]
        since = {"offset": offsets[1], "epoch": epoch}
        assert await history(since=since) == [2, 3, 4, 5]
        assert await history(since=since, limit=2) == [2, 3]
        assert await history(since=since, reverse=True) == [5, 4, 3, 2]
        assert await history(since={"offset": offsets[-1]}) == []
        for bad in (0, 1001, "x"):
            reply = await raw.command("history", channel=channel, limit=bad)
            assert error_code(reply) == "bad_request", (bad, reply)


async def test_publish_result_and_event_fields(client: httpx.AsyncClient, live: LiveServer) -> None:
    admin = await new_org_admin(client)
    channel = "room:fields"
    async with (
        connected(live.ws, admin.access_token) as publisher,
        connected(live.ws, admin.access_token) as subscriber,
    ):
        added = await subscriber.subscribe(channel)
        assert added["type"] == "subscription.added"
        assert added["channel"] == channel
        assert set(added) >= {"type", "channel", "position", "recovered", "replayed"}
        before = time.time() * 1000
        data = {"text": "hé", "n": [1, 2, {"deep": None}]}
        reply = await publisher.command("publish", channel=channel, type="chat.message", data=data)
        assert reply["ok"], reply
        result = reply["result"]
        assert set(result) == {"offset", "epoch", "id", "duplicate"}
        assert result["duplicate"] is False
        assert isinstance(result["id"], str)
        assert result["id"]
        assert isinstance(result["epoch"], str)
        assert result["epoch"]
        assert result["epoch"] == added["position"]["epoch"]
        okey(result["offset"])  # a stream id
        second = await publisher.command("publish", channel=channel, type="chat.message", data=2)
        assert okey(second["result"]["offset"]) > okey(result["offset"])
        assert second["result"]["id"] != result["id"]

        event, _ = await subscriber.events(2)
        assert set(event) >= {"op", "channel", "offset", "epoch", "id", "type", "ts", "data"}
        assert set(event) >= {"meta", "attempt"}
        assert event["op"] == "event"
        assert event["channel"] == channel
        assert event["offset"] == result["offset"]
        assert event["epoch"] == result["epoch"]
        assert event["id"] == result["id"]
        assert event["type"] == "chat.message"
        assert isinstance(event["ts"], int)
        assert before - 5000 <= event["ts"] <= time.time() * 1000 + 5000
        assert event["data"] == data
        assert isinstance(event["meta"]["source"], str)
        assert event["meta"]["source"]
        assert event["meta"]["version"] == "1"
        assert event["attempt"] == 1

        # History returns the same event object.
        history = await publisher.command("history", channel=channel, limit=1, reverse=True)
        (stored,) = history["result"]["events"]
        assert stored["offset"] == second["result"]["offset"]
        first_stored = (await http_history(client, admin.headers, channel))["events"][0]
        assert {k: first_stored[k] for k in event} == event

    # Bad publishes are refused with bad_request.
    async with connected(live.ws, admin.access_token) as raw:
        for fields in (
            {"type": "Not A Type"},
            {"type": ""},
            {"type": "UPPER.case"},
            {},
        ):
            reply = await raw.command("publish", channel=channel, data=1, **fields)
            assert error_code(reply) == "bad_request", (fields, reply)


async def test_user_me_alias_uses_the_canonical_name_in_replies_and_events(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    admin = await new_org_admin(client)
    viewer = await new_member(client, admin, "VIEWER")
    inbox = f"user:{viewer.user_id}"
    queued = await http_publish(client, admin.headers, inbox, "inbox.note", "while offline")
    async with connected(live.ws, viewer.access_token) as raw:
        added = await raw.subscribe("user:me", since={"offset": "0-0"})
        assert added["channel"] == inbox
        assert added["replayed"] == 1
        (event,) = await raw.events(1)
        assert (event["channel"], event["offset"]) == (inbox, queued["offset"])
        published = await http_publish(client, admin.headers, inbox, "inbox.note", "live")
        (event,) = await raw.events(1)
        assert (event["channel"], event["offset"]) == (inbox, published["offset"])
        history = await raw.command("history", channel="user:me")
        assert [e["channel"] for e in history["result"]["events"]] == [inbox, inbox]
        reply = await raw.command("unsubscribe", channel="user:me")
        assert reply["ok"], reply
        assert reply["result"]["channel"] == inbox
