"""`GET /metrics`: Prometheus exposition behind a bearer token, disabled without one."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Callable
from typing import Any

import httpx
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from apix.app import create_app
from apix.monitoring.probe import Label
from tests.conftest import LiveServer, Servers, make_settings
from tests.identity.factories import new_org_admin
from tests.monitoring.conftest import METRICS_TOKEN, monitoring_settings
from tests.realtime.raw import connected

EXPECTED = {
    "apix_connections",
    "apix_subscriptions",
    "apix_channels",
    "apix_events_published",
    "apix_events_delivered",
    "apix_events_redelivered",
    "apix_events_dead_lettered",
    "apix_events_received",
    "apix_frames_sent",
    "apix_fanout_seconds",
    "apix_fanout_batches",
    "apix_fanout_writes_saved",
    "apix_qos_coalesced",
    "apix_delivery_latency_seconds",
    "apix_heartbeat_rtt_seconds",
    "apix_http_request_duration_seconds",
    "apix_http_requests",
    "apix_backend_round_trip_seconds",
    "apix_db_pool_connections",
    "apix_archive_events_behind",
    "apix_archive_oldest_pending_age_seconds",
    "apix_archive_archivers",
}


async def _scrape(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(response.text)}


async def test_metrics_need_the_bearer_token(client: httpx.AsyncClient) -> None:
    admin = await new_org_admin(client)
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {METRICS_TOKEN}"},
        admin.headers,  # a user's token is not the metrics token
    ):
        response = await client.get("/metrics", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"
        assert response.headers["www-authenticate"] == "Bearer"


async def test_metrics_are_disabled_without_a_token(servers: Servers) -> None:
    settings = make_settings(servers, monitoring=monitoring_settings(metrics_token=None))
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://apix.test") as http:
            response = await http.get(
                "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}
            )
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


async def test_metrics_parse_and_count_what_happened(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    admin = await new_org_admin(client)
    async with connected(live.ws, admin.access_token, client={"type": "WEB_APP"}) as raw:
        await raw.subscribe("room:m")
        for n in range(3):
            response = await client.post(
                "/api/v1/apix/channels/room:m/events",
                headers=admin.headers,
                json={"type": "t.x", "data": {"n": n}},
            )
            assert response.status_code == 201
        await raw.events(3)
        families = await _scrape(client)
        assert families.keys() >= EXPECTED, EXPECTED - families.keys()

        def value(name: str, sample: str, **labels: str) -> float:
            return sum(
                s.value
                for s in families[name].samples
                if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
            )

        assert value("apix_connections", "apix_connections", client_type="WEB_APP") == 1
        assert value("apix_subscriptions", "apix_subscriptions") == 1
        assert value("apix_events_delivered", "apix_events_delivered_total", namespace="room") == 3
        assert (
            value(
                "apix_delivery_latency_seconds",
                "apix_delivery_latency_seconds_count",
                namespace="room",
                client_type="WEB_APP",
            )
            == 3
        )
        assert value("apix_events_published", "apix_events_published_total", namespace="room") >= 3
        publish_route = "/api/v1/apix/channels/{channel}/events"
        assert (
            value(
                "apix_http_requests",
                "apix_http_requests_total",
                route=publish_route,
                method="POST",
                status="201",
            )
            == 3
        )
        assert (
            value(
                "apix_http_request_duration_seconds",
                "apix_http_request_duration_seconds_count",
                route=publish_route,
            )
            == 3
        )
        assert value("apix_archive_events_behind", "apix_archive_events_behind") >= 0
        assert value("apix_db_pool_connections", "apix_db_pool_connections", state="size") >= 1


async def test_unusual_methods_share_one_label_set(client: httpx.AsyncClient) -> None:
    """A client chooses the method: each new one must not become label sets of its own."""
    for method in ("BREW", "PROPFIND", "X-ANYTHING"):
        response = await client.request(method, "/api/v1/nowhere")
        assert response.status_code in (404, 405)
    await client.get("/api/v1/nowhere")
    families = await _scrape(client)
    methods = {
        s.labels["method"]
        for s in families["apix_http_requests"].samples
        if s.labels.get("route") == "unmatched"
    }
    assert methods == {"OTHER", "GET"}
    others = sum(
        s.value
        for s in families["apix_http_requests"].samples
        if s.name == "apix_http_requests_total" and s.labels.get("method") == "OTHER"
    )
    assert others == 3


def _gauge(families: dict[str, Any], name: str, **labels: str) -> float:
    return sum(
        s.value
        for s in families[name].samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


async def _settled(client: httpx.AsyncClient, done: Callable[[dict[str, Any]], bool]) -> None:
    """Scrape until ``done`` holds: a close is cleaned up just after the socket goes."""
    deadline = time.monotonic() + 5
    while not done(families := await _scrape(client)):
        assert time.monotonic() < deadline, {k: families[k].samples for k in families}
        await asyncio.sleep(0.02)


async def test_connection_and_subscription_gauges_follow_them_as_they_come_and_go(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    """Kept as they change (not counted at each scrape): connects, subscribes (and two
    refused), an unsubscribe and closes with subscriptions open."""
    admin = await new_org_admin(client)
    async with connected(live.ws, admin.access_token, client={"type": "MOBILE_APP"}) as phone:
        await phone.subscribe("room:a")
        await phone.subscribe("room:b")
        async with connected(live.ws, admin.access_token, client={"type": "WEB_APP"}) as web:
            await web.subscribe("room:a")
            for refused in ("nowhere:x", "room:a"):  # unknown; already subscribed
                reply = await web.command("subscribe", channel=refused)
                assert reply["ok"] is False
            families = await _scrape(client)
            assert _gauge(families, "apix_connections", client_type="MOBILE_APP") == 1
            assert _gauge(families, "apix_connections", client_type="WEB_APP") == 1
            assert _gauge(families, "apix_subscriptions") == 3
            unsubscribed = await phone.command("unsubscribe", channel="room:b")
            assert unsubscribed["ok"] is True
        # The web client closed with one subscription; the phone keeps one.
        await _settled(
            client,
            lambda f: (
                _gauge(f, "apix_connections", client_type="WEB_APP") == 0
                and _gauge(f, "apix_connections", client_type="MOBILE_APP") == 1
                and _gauge(f, "apix_subscriptions") == 1
            ),
        )
    await _settled(
        client,
        lambda f: _gauge(f, "apix_connections") == 0 and _gauge(f, "apix_subscriptions") == 0,
    )


def _count(families: dict[str, Any], name: str, **labels: str) -> float:
    return sum(
        s.value
        for s in families[name].samples
        if s.name == f"{name}_count" and all(s.labels.get(k) == v for k, v in labels.items())
    )


async def test_a_push_costs_the_buckets_used_not_the_samples_taken(
    app: Any, client: httpx.AsyncClient
) -> None:
    """A push folds what piled up since the last one (a busy node: 3,750 samples a second).
    One by one, 40,000 samples held the loop for 0.1-0.2 s, and every event due meanwhile
    waited: the delivery tail. Each sample is now counted in its bucket when it is taken,
    and a push adds up buckets."""
    runtime = app.state.monitoring
    admin = await new_org_admin(client)
    label = Label(str(admin.org_id), "WEB_APP")
    for n in range(200_000):
        runtime.probe.rtt(label, (1000 + n % 50_000) / 1_000_000)
    # A full garbage collection of the test process's heap (every module the suite loaded)
    # can take 0.1 s of CPU at any moment: a node settles its heap at start (`gc.freeze`).
    gc.collect()
    gc.disable()
    try:
        started = time.thread_time()  # this thread's CPU: not the machine's other work
        await runtime.push()
        spent = time.thread_time() - started
    finally:
        gc.enable()
    assert spent < 0.05, f"the push took {spent * 1000:.0f} ms of CPU"
    families = await _scrape(client)
    assert _count(families, "apix_heartbeat_rtt_seconds", client_type="WEB_APP") == 200_000


async def test_a_push_cancelled_midway_counts_every_sample_once(servers: Servers) -> None:
    # Pushes only when asked (the periodic loops wait a minute), so this one is alone.
    settings = make_settings(
        servers,
        monitoring=monitoring_settings(
            push_interval_s=60, probe_interval_s=60, alert_interval_s=60
        ),
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        runtime = app.state.monitoring
        label = Label("org-x", "SDK_WIDGET")
        for n in range(10_000):
            runtime.probe.rtt(label, (1000 + n) / 1_000_000)
        pushing = asyncio.create_task(runtime.push())
        for _ in range(3):  # into its Redis write
            await asyncio.sleep(0)
        pushing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pushing
        await runtime.push()
        families = {
            f.name: f
            for f in text_string_to_metric_families(
                generate_latest(runtime.metrics.registry).decode()
            )
        }
    observed = _count(families, "apix_heartbeat_rtt_seconds", client_type="SDK_WIDGET")
    assert observed == 10_000  # every sample once: none lost, none twice
