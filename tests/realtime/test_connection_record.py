"""The connection record in PostgreSQL (`apix_connection`): every field as the connection
described itself, written in bulk with the node's next flush, and updated at the disconnect."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
from sqlalchemy import select

from apix.identity.runtime import IdentityRuntime
from apix.realtime.models import ApixConnection
from tests.conftest import LiveServer
from tests.identity.factories import new_api_key, new_org_admin
from tests.realtime.raw import raw_socket


async def _rows(live: LiveServer, runtime: IdentityRuntime, org_id: str) -> dict[str, Any]:
    await live.app.state.gateway.registry.flush()
    async with runtime.database.transaction(uuid.UUID(org_id)) as uow:
        rows = (await uow.session.scalars(select(ApixConnection))).all()
    return {row.id: row for row in rows}


async def test_records_hold_what_each_connection_said_and_how_it_ended(
    client: httpx.AsyncClient, live: LiveServer, runtime: IdentityRuntime
) -> None:
    admin = await new_org_admin(client)
    clients = [
        {"type": "WEB_APP", "name": "dashboard", "version": "2.1.0"},
        {"type": "MOBILE_APP", "name": "ios 'app'", "version": None},
        {"type": "API_CLIENT"},
    ]
    ids = []
    async with (
        raw_socket(live.ws, origin="https://app.example") as first,
        raw_socket(live.ws) as second,
        raw_socket(live.ws) as third,
    ):
        key = await new_api_key(client, admin, role="DEVELOPER")
        tokens = [admin.access_token, admin.access_token, key["key"]]
        for raw, token, info in zip([first, second, third], tokens, clients, strict=True):
            ids.append((await raw.connect(token, client=info))["connection_id"])
        await first.subscribe("room:a")
        await first.subscribe("room:b")
        await second.subscribe("room:b")

        rows = await _rows(live, runtime, admin.org_id)
        assert set(rows) == set(ids)
        web, mobile, api = (rows[i] for i in ids)
        assert (web.client_type, web.client_name, web.client_version) == (
            "WEB_APP",
            "dashboard",
            "2.1.0",
        )
        assert (mobile.client_type, mobile.client_name, mobile.client_version) == (
            "MOBILE_APP",
            "ios 'app'",
            None,
        )
        assert (api.client_type, api.client_name) == ("API_CLIENT", None)
        assert sorted(web.channels) == ["room:a", "room:b"]
        assert mobile.channels == ["room:b"]
        assert api.channels == []
        assert web.metadata_ == {"origin": "https://app.example"}
        assert api.metadata_ == {}
        for row in (web, mobile):
            assert (str(row.user_id), row.api_key_id) == (admin.user_id, None)
        assert (api.user_id, str(api.api_key_id)) == (None, key["id"])
        for row in rows.values():
            assert str(row.org_id) == admin.org_id
            assert row.node == live.app.state.gateway.node
            assert row.status == "CONNECTED"
            assert row.connected_at is not None
            assert row.last_heartbeat_at == row.connected_at  # set at the connect
            assert row.disconnected_at is None
            assert row.close_code is None

        await second.ws.close(code=1000)
        deadline = time.monotonic() + 5
        while (rows := await _rows(live, runtime, admin.org_id))[ids[1]].status == "CONNECTED":
            assert time.monotonic() < deadline, "the disconnect was never written"
            await asyncio.sleep(0.05)
        closed = rows[ids[1]]
        assert closed.status == "DISCONNECTED"
        assert closed.close_code == 1000
        assert closed.disconnected_at is not None
        assert closed.disconnected_at >= closed.connected_at
        assert closed.client_name == "ios 'app'"  # the update leaves the rest as it was
        assert rows[ids[0]].status == "CONNECTED"
        assert sorted(rows[ids[0]].channels) == ["room:a", "room:b"]
