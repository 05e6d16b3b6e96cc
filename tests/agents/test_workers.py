"""Runs executed by `apix worker` processes: a worker killed mid-run never leaves a run
`running`; runs it had not started are executed by the next worker."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from redis.asyncio import Redis

from apix.app import create_app
from apix.config import ProvidersSettings, Settings, WorkerSettings
from apix.realtime.channels import PARTITIONS, archive_key
from tests.agents.conftest import SlowOpenAI, new_agent, wait_run
from tests.conftest import Servers, make_settings
from tests.identity.factories import new_org_admin
from tests.providers.fakes import ok


@pytest.fixture
def settings(servers: Servers) -> Settings:
    # This node only serves the API: the runs go to the worker processes.
    return make_settings(servers, worker=WorkerSettings(embedded=False))


@pytest.fixture
def workers(servers: Servers) -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.terminate()
            process.wait(15)


def start_worker(servers: Servers, name: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "APIX_ENV": "test",
        "APIX_DATABASE_URL": servers.database_url,
        "APIX_REDIS_URL": servers.redis_url,
        "APIX_DATA_DIR": str(servers.data_dir),
        "APIX_DATABASE__MIGRATE_ON_START": "false",
        "APIX_WORKER__ARCHIVE": "false",
        "APIX_WORKER__RUN_CLAIM_MS": "1500",
        "APIX_WORKER__PROVIDER_CHECKS_S": "0",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "apix", "worker", "--consumer", name],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def wait_status(
    client: httpx.AsyncClient, headers: dict[str, str], run_id: str, status: str
) -> None:
    deadline = time.monotonic() + 20
    while (await client.get(f"/api/v1/runs/{run_id}", headers=headers)).json()["status"] != status:
        assert time.monotonic() < deadline, f"run never {status}"
        await asyncio.sleep(0.05)


@pytest.mark.timeout(90)
async def test_a_worker_killed_mid_run_leaves_no_run_running(
    client: httpx.AsyncClient,
    servers: Servers,
    model: SlowOpenAI,
    workers: list[subprocess.Popen[bytes]],
) -> None:
    admin = await new_org_admin(client)
    agent = await new_agent(client, admin, model)
    model.default = ok("a long answer " * 20, chunk=3)
    model.delay_s = 0.1
    session = (
        await client.post("/api/v1/sessions", headers=admin.headers, json={"agent_id": agent["id"]})
    ).json()
    url = f"/api/v1/agents/{agent['id']}/runs"
    body = {"input": "first", "session_id": session["id"]}
    first = (await client.post(url, headers=admin.headers, json=body)).json()
    second = (await client.post(url, headers=admin.headers, json={**body, "input": "next"})).json()
    doomed = start_worker(servers, "doomed")
    workers.append(doomed)
    await wait_status(client, admin.headers, first["id"], "running")
    doomed.send_signal(signal.SIGKILL)
    doomed.wait(10)
    model.default = ok("short")
    model.delay_s = 0.0
    workers.append(start_worker(servers, "survivor"))
    lost = await wait_run(client, admin, first["id"], timeout=30)
    assert lost["status"] == "failed"
    assert lost["error"]["code"] == "worker_lost"
    # The queued run the dead worker held (waiting for the session) runs on the survivor.
    done = await wait_run(client, admin, second["id"], timeout=30)
    assert (done["status"], done["output"]) == ("completed", "short")
    # The workers run with `APIX_WORKER__ARCHIVE=false`: their events (the runs' progress)
    # are published, but nothing of theirs is queued for an archiver that is not there.
    redis = Redis.from_url(servers.redis_url)
    try:
        queued = [
            fields[b"d"]
            for partition in range(PARTITIONS)
            for _, fields in await redis.xrange(archive_key(partition))
        ]
    finally:
        await redis.aclose()
    assert queued, "the API node (which archives) queued its own events"
    assert not [d for d in queued if b'"source":"apix-worker:' in d]


@pytest.fixture
async def checking_node(servers: Servers) -> AsyncIterator[httpx.AsyncClient]:
    settings = make_settings(
        servers,
        worker=WorkerSettings(embedded=True, archive=False, provider_checks_s=0.3),
        providers=ProvidersSettings(retry_attempts=1),
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://apix.test") as client:
            yield client


async def test_workers_check_providers_periodically(
    checking_node: httpx.AsyncClient, model: SlowOpenAI
) -> None:
    client = checking_node
    admin = await new_org_admin(client)
    agent = await new_agent(client, admin, model)
    deadline = time.monotonic() + 10
    while not model.requests:
        assert time.monotonic() < deadline, "no active check reached the provider"
        await asyncio.sleep(0.05)
    provider = (
        await client.get(f"/api/v1/providers/{agent['provider']['id']}", headers=admin.headers)
    ).json()
    assert provider["health"]["check_latency_ms"] is not None


async def test_audit_retention_is_applied_once_a_day_across_the_cluster(
    checking_node: httpx.AsyncClient, servers: Servers
) -> None:
    client = checking_node
    await new_org_admin(client)
    workers = client._transport.app.state.workers  # type: ignore[attr-defined]
    redis = Redis.from_url(servers.redis_url)
    try:
        await workers.prune_audit()
        ttl_ms = await redis.pttl("apix:audit-prune")
        assert 0.8 * 24 * 3600 * 1000 < ttl_ms <= 0.9 * 24 * 3600 * 1000
        # Another worker of the cluster, the same day: nothing to do (the lock holds).
        await redis.set("apix:audit-prune", "1", px=1000)
        await workers.prune_audit()
        assert await redis.pttl("apix:audit-prune") <= 1000
    finally:
        await redis.aclose()
