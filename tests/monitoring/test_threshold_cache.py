"""The evaluator caches an organisation's thresholds, but never a read that overlapped a change:
the evaluation after a change sees the new threshold, not one read just before it."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest

from apix.config import MonitoringSettings, Settings
from apix.infra.database import Database
from apix.monitoring import alerts
from tests.conftest import Servers, make_settings
from tests.identity.factories import Account, new_org_admin
from tests.monitoring.conftest import monitoring_settings

BASE = "/api/v1/monitoring/latency"


@pytest.fixture
def settings(servers: Servers) -> Settings:
    # Conditions fire at once; the node's own evaluation loop stays out of the way (the test
    # runs the evaluator itself, with values it chooses).
    return make_settings(
        servers, monitoring=monitoring_settings(alert_for_s=0, alert_interval_s=3600)
    )


async def _firing(client: httpx.AsyncClient, admin: Account) -> list[dict[str, Any]]:
    response = await client.get(f"{BASE}/alerts", headers=admin.headers, params={"state": "firing"})
    assert response.status_code == 200, response.text
    return response.json()["items"]  # type: ignore[no-any-return]


async def test_a_thresholds_read_overlapping_a_change_is_not_cached(
    client: httpx.AsyncClient, app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    admin = await new_org_admin(client)
    org_id = uuid.UUID(admin.org_id)
    evaluator = app.state.monitoring.evaluator
    values = {admin.org_id: {"delivery_p99_ms": 100.0}}  # under the default (250 ms)

    # The evaluator's read runs for real, but returns only once the test has changed the
    # threshold: a read taken before the change that completes after it.
    real_thresholds = alerts.thresholds
    read, release = asyncio.Event(), asyncio.Event()

    async def overlapping(
        database: Database, settings: MonitoringSettings, org: uuid.UUID | None
    ) -> dict[str, alerts.Threshold]:
        found = await real_thresholds(database, settings, org)
        if org == org_id and not read.is_set():
            read.set()
            await release.wait()
        return found

    monkeypatch.setattr(alerts, "thresholds", overlapping)
    evaluation = asyncio.create_task(evaluator.evaluate(values))
    await asyncio.wait_for(read.wait(), 10)
    response = await client.put(
        f"{BASE}/thresholds/delivery_p99_ms", headers=admin.headers, json={"threshold": 50}
    )
    assert response.status_code == 200, response.text
    release.set()
    await asyncio.wait_for(evaluation, 10)
    # That evaluation went by the thresholds read before the change: nothing fired.
    assert await _firing(client, admin) == []

    # The next one reads the thresholds again and sees the new one: 100 ms is over 50 ms.
    await evaluator.evaluate(values)
    (alert,) = await _firing(client, admin)
    assert (alert["rule"], alert["threshold"], alert["value"]) == ("delivery_p99_ms", 50, 100)
