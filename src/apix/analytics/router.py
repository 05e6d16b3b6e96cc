"""`/api/v1/analytics`: events, connections and API usage over time (`ORG_ADMIN`+)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Depends, Query, Request
from fastapi.responses import Response

from apix.analytics import service
from apix.analytics.service import Granularity
from apix.core.errors import ErrorResponse
from apix.core.json import ORJSONResponse
from apix.core.routing import api_router
from apix.identity.deps import require
from apix.identity.principal import Principal

router = api_router(
    prefix="/api/v1/analytics",
    tags=["analytics"],
    responses={
        400: {"model": ErrorResponse},
        401: {"model": ErrorResponse},
        403: {"model": ErrorResponse},
        422: {"model": ErrorResponse},
    },
)

Reader = Annotated[Principal, Depends(require("analytics:read"))]
From = Annotated[datetime | None, Query(alias="from", description="Start (default: 24 h ago).")]
To = Annotated[datetime | None, Query(alias="to", description="End, exclusive (default: now).")]
Step = Annotated[Granularity, Query(description="`minute`, `hour` or `day`.")]
Format = Annotated[Literal["json", "csv"], Query(description="`csv` downloads the rows.")]


def _org(principal: Principal) -> uuid.UUID:
    assert principal.org_id is not None  # noqa: S101 - `require` ensures an organisation
    return principal.org_id


def _answer(rows: list[dict[str, Any]], columns: Sequence[str], fmt: str, name: str) -> Response:
    if fmt == "csv":
        return Response(
            service.to_csv(rows, columns),
            media_type="text/csv",
            headers={"Content-Disposition": f'attachment; filename="{name}.csv"'},
        )
    return ORJSONResponse({"items": rows})


@router.get("/overview")
async def overview(
    request: Request, principal: Reader, since: From = None, until: To = None
) -> Any:
    """Totals over the range: events (by namespace), connections opened, API calls."""
    start, end = service.time_range(since, until, "day")
    return await service.overview(
        request.app.state.database, _org(principal), since=start, until=end
    )


@router.get("/events", response_model=None)
async def events(
    request: Request,
    principal: Reader,
    since: From = None,
    until: To = None,
    granularity: Step = "hour",
    namespace: Annotated[str | None, Query(max_length=64)] = None,
    event_type: Annotated[str | None, Query(alias="type", max_length=100)] = None,
    format: Format = "json",
) -> Response:
    """Events published per bucket, namespace and type."""
    start, end = service.time_range(since, until, granularity)
    rows = await service.events(
        request.app.state.database,
        _org(principal),
        since=start,
        until=end,
        granularity=granularity,
        namespace=namespace,
        event_type=event_type,
    )
    return _answer(rows, ("bucket", "namespace", "type", "count"), format, "events")


@router.get("/connections", response_model=None)
async def connections(
    request: Request,
    principal: Reader,
    since: From = None,
    until: To = None,
    granularity: Step = "hour",
    format: Format = "json",
) -> Response:
    """Real-time connections opened and closed per bucket."""
    start, end = service.time_range(since, until, granularity)
    rows = await service.connections(
        request.app.state.database, _org(principal), since=start, until=end, granularity=granularity
    )
    return _answer(rows, ("bucket", "opened", "closed"), format, "connections")


@router.get("/usage", response_model=None)
async def usage(
    request: Request,
    principal: Reader,
    since: From = None,
    until: To = None,
    granularity: Step = "hour",
    api_key_id: uuid.UUID | None = None,
    format: Format = "json",
) -> Response:
    """HTTP requests made with each API key per bucket, and how many failed (4xx/5xx)."""
    start, end = service.time_range(since, until, granularity)
    rows = await service.usage(
        request.app.state.database,
        _org(principal),
        since=start,
        until=end,
        granularity=granularity,
        api_key_id=api_key_id,
    )
    return _answer(rows, ("bucket", "api_key_id", "requests", "errors"), format, "usage")
