"""`apix.client` against the real gateway on a real socket: commands, typed errors, and
reconnecting (server drops, node restarts, token expiry) with no gap and no duplicate."""

from __future__ import annotations

import asyncio
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from apix.app import create_app
from apix.client import (
    ApixClient,
    ApixError,
    BadRequest,
    Conflict,
    ConnectionClosed,
    Event,
    Forbidden,
    NotFound,
    Position,
    Subscription,
    Unauthorized,
)
from apix.client import _client as client_module
from apix.config import RealtimeSettings, Settings
from apix.identity import tokens
from apix.identity.permissions import Role
from apix.realtime.transport import WS_PROTOCOL
from tests.conftest import LiveServer, Servers, make_settings, serve_app
from tests.identity.factories import Account, login, new_org_admin

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def http(client: httpx.AsyncClient) -> httpx.AsyncClient:
    """The conftest's httpx client on the app, named so it does not shadow the SDK."""
    return client


async def http_publish(
    http: httpx.AsyncClient, admin: Account, channel: str, text: str, event_type: str = "chat.msg"
) -> str:
    response = await http.post(
        f"/api/v1/apix/channels/{channel}/events",
        headers=admin.headers,
        json={"type": event_type, "data": {"text": text}},
    )
    assert response.status_code == 201, response.text
    return str(response.json()["offset"])


async def take(sub: Subscription, count: int, within: float = 5.0) -> list[Event]:
    return [await asyncio.wait_for(anext(sub), within) for _ in range(count)]


async def nothing_more(sub: Subscription, wait: float = 0.3) -> None:
    try:
        extra = await asyncio.wait_for(anext(sub), wait)
    except TimeoutError:
        return
    pytest.fail(f"unexpected event {extra}")


async def eventually(check: Callable[[], bool], within: float = 5.0) -> None:
    """Poll ``check``: the states it reads change inside the client, with no event to await."""
    async with asyncio.timeout(within):
        while not check():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


def server_side(app: Any, apix: ApixClient) -> Any:
    """The gateway's object for the client's current connection."""
    assert apix.connection is not None
    return app.state.gateway.connections[apix.connection.connection_id]


@asynccontextmanager
async def serve_on(app: Any, settings: Settings, port: int) -> AsyncIterator[None]:
    """Like conftest's `serve_app`, on a given port: a node coming back where it was."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    config = uvicorn.Config(
        app,
        lifespan="off",
        ws=WS_PROTOCOL,
        ws_ping_interval=None,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    await eventually(lambda: server.started)
    try:
        yield
    finally:
        server.should_exit = True
        await task
        sock.close()


# --- commands ----------------------------------------------------------------------------


async def test_subscribe_iterates_events_published_over_ws_and_http(
    http: httpx.AsyncClient, live: LiveServer
) -> None:
    admin = await new_org_admin(http)
    async with ApixClient(live.ws, token=admin.access_token, name="sdk-test") as apix:
        assert apix.state == "connected"
        assert apix.connection is not None
        assert apix.connection.org_id == admin.org_id
        assert apix.connection.user_id == admin.user_id
        sub = await apix.subscribe("room:lobby")
        assert sub.recovered is True
        published = await apix.publish("room:lobby", "chat.msg", {"text": "ws"})
        from_http = await http_publish(http, admin, "room:lobby", "http")
        first, second = await take(sub, 2)
        assert (first.offset, first.epoch, first.id) == (
            published.offset,
            published.epoch,
            published.id,
        )
        assert first.data == {"text": "ws"}
        assert first.type == "chat.msg"
        assert first.channel == "room:lobby"
        assert first.meta["actor"] == admin.user_id
        assert first.attempt == 1
        assert second.offset == from_http
        assert sub.position == Position(from_http, published.epoch)
        await nothing_more(sub)


async def test_publish_history_presence_and_ping(http: httpx.AsyncClient, live: LiveServer) -> None:
    admin = await new_org_admin(http)
    async with (
        ApixClient(live.ws, token=admin.access_token, name="watcher") as watcher,
        ApixClient(live.ws, token=admin.access_token, name="joiner") as joiner,
    ):
        watching = await watcher.subscribe("room:p", presence=True)
        (own_join,) = await take(watching, 1)
        assert own_join.type == "presence.join"
        offsets = [(await watcher.publish("room:p", "n.x", {"i": i})).offset for i in range(3)]
        assert [e.offset for e in await take(watching, 3)] == offsets

        history = await watcher.history("room:p", limit=10)
        assert [e.offset for e in history.events] == offsets
        assert history.position.offset == offsets[-1]
        after_first = await watcher.history(
            "room:p", since=Position(offsets[0], history.position.epoch)
        )
        assert [e.data for e in after_first.events] == [{"i": 1}, {"i": 2}]
        newest = await watcher.history("room:p", limit=2, reverse=True)
        assert [e.offset for e in newest.events] == offsets[:0:-1]

        await joiner.subscribe("room:p", presence=True)
        (joined,) = await take(watching, 1)
        assert joined.type == "presence.join"
        assert joined.offset is None
        assert joiner.connection is not None
        assert joined.data["connection_id"] == joiner.connection.connection_id
        members = await watcher.presence("room:p")
        assert watcher.connection is not None
        assert {m.connection_id for m in members} == {
            watcher.connection.connection_id,
            joiner.connection.connection_id,
        }
        assert {m.info.get("name") for m in members} == {"watcher", "joiner"}
        assert all(m.client_type == "API_CLIENT" for m in members)
        assert watching.position is not None
        assert watching.position.offset == offsets[-1]  # presence events do not move it

        assert 0 < await watcher.ping() < 5


async def test_since_last_and_type_filters(http: httpx.AsyncClient, live: LiveServer) -> None:
    admin = await new_org_admin(http)
    first = await http_publish(http, admin, "room:f", "1", "a.one")
    await http_publish(http, admin, "room:f", "2", "b.two")
    await http_publish(http, admin, "room:f", "3", "a.three")
    async with ApixClient(live.ws, token=admin.access_token) as apix:
        late = await apix.subscribe("room:f", last=3, types=["a.*"])
        assert late.replayed == 2
        assert [e.type for e in await take(late, 2)] == ["a.one", "a.three"]
        history = await apix.history("room:f")
        since = Position(first, history.position.epoch)
        await late.unsubscribe()
        again = await apix.subscribe("room:f", since=since)
        assert [e.data["text"] for e in await take(again, 2)] == ["2", "3"]
        await http_publish(http, admin, "room:f", "4", "b.four")
        (live_event,) = await take(again, 1)
        assert live_event.data == {"text": "4"}


async def test_user_me_is_the_callers_channel(http: httpx.AsyncClient, live: LiveServer) -> None:
    admin = await new_org_admin(http)
    async with ApixClient(live.ws, token=admin.access_token) as apix:
        inbox = await apix.subscribe("user:me")
        assert inbox.channel == f"user:{admin.user_id}"
        await http_publish(http, admin, f"user:{admin.user_id}", "for you")
        (event,) = await take(inbox, 1)
        assert event.data == {"text": "for you"}


async def test_a_refused_connect_fails_fast(live: LiveServer) -> None:
    apix = ApixClient(live.ws, token="not-a-token")
    with pytest.raises(ApixError):
        await apix.connect()
    assert apix.state == "closed"


async def test_a_refused_connect_raises_unauthorized(live: LiveServer) -> None:
    with pytest.raises(Unauthorized) as refused:
        await ApixClient(live.ws, token="not-a-token").connect()
    assert refused.value.code == "unauthorized"


async def test_error_replies_raise_typed_errors(http: httpx.AsyncClient, live: LiveServer) -> None:
    admin = await new_org_admin(http)
    async with ApixClient(live.ws, token=admin.access_token) as apix:
        someone_else = f"user:{uuid.uuid4()}"
        for _ in range(2):  # a refused subscription leaves nothing behind: no Conflict
            with pytest.raises(Forbidden) as forbidden:
                await apix.subscribe(someone_else)
            assert forbidden.value.code == "forbidden"
        with pytest.raises(Forbidden):
            await apix.publish("agents:a1", "agent.run.started", {})
        with pytest.raises(NotFound):
            await apix.subscribe("nope:x")
        with pytest.raises(BadRequest):
            await apix.history("Bad Name!")
        await apix.subscribe("room:twice")
        with pytest.raises(Conflict):
            await apix.subscribe("room:twice")
        assert apix.state == "connected"


async def test_unsubscribe_and_close_end_iterators(
    http: httpx.AsyncClient, app: Any, live: LiveServer
) -> None:
    admin = await new_org_admin(http)
    apix = ApixClient(live.ws, token=admin.access_token)
    await apix.connect()
    sub = await apix.subscribe("room:u")
    kept = await apix.subscribe("room:kept")
    await sub.unsubscribe()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(sub), 2)
    assert list(server_side(app, apix).subscriptions) == ["room:kept"]
    await apix.close()
    assert apix.state == "closed"
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(kept), 2)
    with pytest.raises(ConnectionClosed):
        await apix.publish("room:kept", "chat.msg", {})


async def test_answers_server_pings(http: httpx.AsyncClient, servers: Servers) -> None:
    settings = make_settings(
        servers, realtime=RealtimeSettings(ping_interval_ms=150, pong_timeout_ms=300)
    )
    application = create_app(settings)
    admin = await new_org_admin(http)
    async with (
        application.router.lifespan_context(application),
        serve_app(application, settings) as server,
        ApixClient(server.ws, token=admin.access_token) as apix,
    ):
        assert apix.connection is not None
        connection_id = apix.connection.connection_id
        await asyncio.sleep(1.2)  # several pings; without pongs the server closes at 450 ms
        connection = application.state.gateway.connections.get(connection_id)
        assert connection is not None
        assert connection.record.rtt_ms is not None
        assert apix.connection.connection_id == connection_id


# --- reconnecting ------------------------------------------------------------------------


async def test_reconnects_after_a_drop_and_resumes_with_no_gap_or_duplicate(
    http: httpx.AsyncClient, app: Any, live: LiveServer
) -> None:
    admin = await new_org_admin(http)
    async with ApixClient(
        live.ws, token=admin.access_token, backoff_initial=0.05, backoff_max=0.2
    ) as apix:
        sub = await apix.subscribe("room:r", types=["chat.*"])
        quiet = await apix.subscribe("room:quiet")  # saw nothing yet: resumes from its head
        before = await http_publish(http, admin, "room:r", "before")
        await take(sub, 1)
        old = server_side(app, apix)
        old.close(4009, "heartbeat timeout")
        # Published during or after the drop: either way, each arrives exactly once.
        during = [await http_publish(http, admin, "room:r", f"d{i}") for i in range(3)]
        await http_publish(http, admin, "room:r", "skipped", "other.type")
        quiet_offset = await http_publish(http, admin, "room:quiet", "q")
        got = await take(sub, 3)
        assert [e.offset for e in got] == during
        assert [e.data["text"] for e in got] == ["d0", "d1", "d2"]
        (quiet_event,) = await take(quiet, 1)
        assert quiet_event.offset == quiet_offset
        assert apix.connection is not None
        assert apix.connection.connection_id != old.id
        assert apix.state == "connected"
        after = await apix.publish("room:r", "chat.msg", {"text": "after"})
        (event,) = await take(sub, 1)
        assert event.offset == after.offset
        assert before not in [e.offset for e in got]
        await nothing_more(sub)


async def test_node_restart_events_published_while_down_arrive_once(
    http: httpx.AsyncClient, app: Any, settings: Settings
) -> None:
    admin = await new_org_admin(http)
    async with serve_app(app, settings) as first:
        apix = ApixClient(first.ws, token=admin.access_token, backoff_initial=0.05, backoff_max=0.2)
        await apix.connect()
        sub = await apix.subscribe("room:restart")
        await http_publish(http, admin, "room:restart", "before")
        await take(sub, 1)
    # The node is gone (it closed us with 4500); the client keeps trying, meanwhile:
    await eventually(lambda: apix.state == "reconnecting")
    missed = [await http_publish(http, admin, "room:restart", f"m{i}") for i in range(3)]
    await asyncio.sleep(0.3)  # a few refused attempts
    assert apix.state == "reconnecting"
    try:
        async with serve_on(app, settings, first.port):
            got = await take(sub, 3)
            assert [e.offset for e in got] == missed
            assert sub.recovered is True
            await nothing_more(sub)
    finally:
        await apix.close()


async def test_shutting_down_reconnects_at_once_other_codes_back_off(
    http: httpx.AsyncClient, app: Any, live: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Jitter off: every backoff lasts its full ceiling, here 20 s.
    monkeypatch.setattr(client_module._jitter, "uniform", lambda low, high: high)
    admin = await new_org_admin(http)
    async with ApixClient(
        live.ws, token=admin.access_token, backoff_initial=20, backoff_max=20
    ) as apix:
        old = server_side(app, apix)
        old.close(4500, "node shutting down")
        await eventually(
            lambda: apix.connection is not None and apix.connection.connection_id != old.id, 2
        )
        await eventually(lambda: apix.state == "connected", 2)
        server_side(app, apix).close(4011, "slow consumer")
        await eventually(lambda: apix.state == "reconnecting", 2)
        await asyncio.sleep(0.5)
        assert apix.state == "reconnecting"  # waiting out its backoff, not hammering


async def test_token_expiry_fetches_a_fresh_token_before_reconnecting(
    http: httpx.AsyncClient, app: Any, live: LiveServer
) -> None:
    admin = await new_org_admin(http)
    calls: list[str] = []
    release = asyncio.Event()

    async def provider() -> str:
        calls.append("token")
        if len(calls) == 1:
            return admin.access_token
        await release.wait()  # the app is busy getting a new token: the client waits
        fresh = await login(http, admin.email)
        return str(fresh["access_token"])

    async with ApixClient(live.ws, token=provider, backoff_initial=0.05) as apix:
        sub = await apix.subscribe("room:t")
        server_side(app, apix)._expire()  # as at the token's expiry: disconnect, then 4003
        await eventually(lambda: len(calls) == 2)
        assert apix.state == "reconnecting"
        missed = await http_publish(http, admin, "room:t", "while expired")
        release.set()
        (event,) = await take(sub, 1)
        assert event.offset == missed
        assert len(calls) == 2
        assert apix.state == "connected"


async def test_refreshes_the_token_before_it_expires(
    http: httpx.AsyncClient, app: Any, live: LiveServer, runtime: Any
) -> None:
    admin = await new_org_admin(http)
    short = runtime.settings.auth.model_copy(update={"access_ttl_s": 4})
    calls = 0

    def provider() -> str:  # a sync provider; each token lives 4 s
        nonlocal calls
        calls += 1
        token, _ = tokens.issue(
            runtime.keyring,
            short,
            user_id=uuid.UUID(admin.user_id),
            org_id=uuid.UUID(admin.org_id),
            role=Role(admin.role),
            session_id=uuid.uuid4(),
        )
        return token

    async with ApixClient(live.ws, token=provider, backoff_initial=0.05) as apix:
        assert apix.connection is not None
        first = apix.connection
        assert first.token_expires_at is not None
        connection = server_side(app, apix)
        await eventually(lambda: calls >= 3, 8)
        # Past the first token's expiry, on the same connection, with the server holding
        # whichever token the client last sent.
        await asyncio.sleep(max(0.0, first.token_expires_at / 1000 - time.time() + 0.3))
        await eventually(
            lambda: (
                apix.connection is not None
                and connection.principal.token_expires_at == apix.connection.token_expires_at
            )
        )
        assert apix.connection.token_expires_at is not None
        assert apix.connection.token_expires_at > first.token_expires_at
        assert apix.connection.connection_id == first.connection_id
        assert app.state.gateway.connections.get(first.connection_id) is connection


Close = Callable[[Any, ApixClient, httpx.AsyncClient, Account], Awaitable[None]]


async def _kick(app: Any, apix: ApixClient, http: httpx.AsyncClient, admin: Account) -> None:
    assert apix.connection is not None
    response = await http.delete(
        f"/api/v1/apix/connections/{apix.connection.connection_id}", headers=admin.headers
    )
    assert response.status_code == 204, response.text


async def _protocol_error(app: Any, apix: ApixClient, *_: object) -> None:
    server_side(app, apix).close(4000, "protocol error")


async def _expire(app: Any, apix: ApixClient, *_: object) -> None:
    server_side(app, apix)._expire()  # with a string token there is no fresh one to get


@pytest.mark.parametrize(
    ("close", "code"), [(_kick, 4010), (_protocol_error, 4000), (_expire, 4003)]
)
async def test_no_reconnect_after_final_close_codes(
    http: httpx.AsyncClient, app: Any, live: LiveServer, close: Close, code: int
) -> None:
    admin = await new_org_admin(http)
    async with ApixClient(live.ws, token=admin.access_token, backoff_initial=0.01) as apix:
        sub = await apix.subscribe("room:k")
        await close(app, apix, http, admin)
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(anext(sub), 5)
        assert closed.value.close_code == code
        assert apix.state == "closed"
        assert apix.error is closed.value
        with pytest.raises(ConnectionClosed):
            await apix.publish("room:k", "chat.msg", {})
        await asyncio.sleep(0.2)  # time enough for a (wrong) reconnect
        assert not app.state.gateway.connections


async def test_lost_stream_is_reported_as_unrecovered(
    http: httpx.AsyncClient, app: Any, live: LiveServer
) -> None:
    admin = await new_org_admin(http)
    reloads: list[Position | None] = []

    async def reload(sub: Subscription) -> None:
        reloads.append(sub.position)

    async with ApixClient(live.ws, token=admin.access_token, backoff_initial=0.05) as apix:
        stale = await apix.subscribe(
            "room:old", since=Position("1-0", "gone"), on_unrecovered=reload
        )
        assert stale.recovered is False
        sub = await apix.subscribe("room:lost", on_unrecovered=reload)
        await http_publish(http, admin, "room:lost", "old life")
        (old,) = await take(sub, 1)
        await eventually(lambda: len(reloads) == 1)
        # Redis lost the channel (a flush, a failover without persistence): a new epoch.
        redis = app.state.redis
        await redis.delete(*[k async for k in redis.scan_iter(match="apix:ch:*room:lost*")])
        server_side(app, apix).close(4009, "heartbeat timeout")
        await eventually(lambda: len(reloads) == 2)
        assert sub.recovered is False
        assert sub.position is not None
        assert sub.position.epoch != old.epoch
        fresh = await http_publish(http, admin, "room:lost", "new life")
        (event,) = await take(sub, 1)
        assert (event.offset, event.data) == (fresh, {"text": "new life"})


async def test_the_docs_quick_start_runs(
    http: httpx.AsyncClient, live: LiveServer, repo_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = (repo_root / "docs" / "realtime.md").read_text()
    python_blocks = re.findall(r"```python\n(.*?)```", docs, re.DOTALL)
    quick_start = next(b for b in python_blocks if "async def main(url: str, token: str)" in b)
    namespace: dict[str, Any] = {"__name__": "docs_example"}
    exec(compile(quick_start, "docs/realtime.md", "exec"), namespace)  # noqa: S102 - our docs
    admin = await new_org_admin(http)
    await asyncio.wait_for(namespace["main"](live.ws, admin.access_token), 10)
    out = capsys.readouterr().out
    assert "chat.message {'text': 'hello'}" in out
    assert "1 events kept" in out


def test_backoff_is_exponential_capped_and_jittered() -> None:
    delays = [client_module.backoff_delay(n, 0.5, 30.0) for n in range(12) for _ in range(20)]
    assert all(0 <= d <= 30.0 for d in delays)
    assert max(client_module.backoff_delay(0, 0.5, 30.0) for _ in range(50)) <= 0.5
    assert max(client_module.backoff_delay(10, 0.5, 30.0) for _ in range(50)) > 0.5
    assert len(set(delays)) > 200  # jittered, not fixed steps
