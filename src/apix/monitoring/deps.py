"""Who may read monitoring data, and for which scope (an organisation or the platform)."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import Depends, Query, Request

from apix.core.errors import Forbidden, NotFound
from apix.identity.deps import CurrentPrincipal
from apix.monitoring.runtime import MonitoringRuntime


async def _runtime(request: Request) -> MonitoringRuntime:
    runtime: MonitoringRuntime = request.app.state.monitoring
    return runtime


async def _scope(
    principal: CurrentPrincipal,
    org_id: Annotated[
        uuid.UUID | None,
        Query(description="SUPER_ADMIN: one organisation instead of the platform"),
    ] = None,
) -> uuid.UUID | None:
    """The organisation to report on; None: the whole platform (SUPER_ADMIN only).

    ORG_ADMIN and above (`apix:admin`) see their own organisation; naming another one is
    answered 404, as for any other tenant's object.
    """
    if principal.is_super_admin:
        return org_id
    if principal.org_id is None or not principal.can("apix:admin"):
        raise Forbidden("monitoring needs the ORG_ADMIN role")
    if org_id is not None and org_id != principal.org_id:
        raise NotFound("organization not found")
    return principal.org_id


Runtime = Annotated[MonitoringRuntime, Depends(_runtime)]
Scope = Annotated[uuid.UUID | None, Depends(_scope)]
