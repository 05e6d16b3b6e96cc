"""Request dependencies of the audit API: whose chain a caller reads, and who may write."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Query, Request

from apix.audit import service
from apix.audit.errors import UnknownOrganization
from apix.config import Settings
from apix.core.errors import Forbidden
from apix.identity.deps import CurrentPrincipal
from apix.identity.principal import Principal, PrincipalKind
from apix.infra.database import Database


async def _database(request: Request) -> Database:
    database: Database = request.app.state.database
    return database


async def _secret(request: Request) -> bytes:
    """The key checkpoints are signed with (the settings' `secret_key`)."""
    settings: Settings = request.app.state.settings
    return settings.secret_key.get_secret_value().encode()


DatabaseDep = Annotated[Database, Depends(_database)]
SecretDep = Annotated[bytes, Depends(_secret)]


@dataclass(frozen=True, slots=True)
class AuditScope:
    """The caller and the chain it reads: an organisation's, or (None) the platform's."""

    principal: Principal
    org_id: uuid.UUID | None


async def _reader(
    principal: CurrentPrincipal,
    database: DatabaseDep,
    org_id: Annotated[
        uuid.UUID | None,
        Query(description="SUPER_ADMIN: any organisation's trail (default: the caller's)."),
    ] = None,
) -> AuditScope:
    """ORG_ADMIN+ read their organisation's trail; a SUPER_ADMIN reads any organisation's,
    or the platform's when acting in none."""
    if not principal.can("audit:read"):
        raise Forbidden("missing permission audit:read")
    if org_id is not None and org_id != principal.org_id:
        if not principal.is_super_admin:
            # Another tenant's trail does not exist for this caller.
            raise UnknownOrganization
        await service.ensure_organization(database, org_id)
        return AuditScope(principal, org_id)
    if principal.org_id is None and not principal.is_super_admin:
        raise Forbidden("this operation needs an organization; switch to one first")
    return AuditScope(principal, principal.org_id)


async def _writer(principal: CurrentPrincipal) -> Principal:
    """A user or an API key acting in an organisation (not a widget's end user)."""
    if principal.kind is PrincipalKind.WIDGET:
        raise Forbidden("widgets cannot record audit events")
    if principal.org_id is None:
        raise Forbidden("this operation needs an organization; switch to one first")
    return principal


async def _own_org_admin(principal: CurrentPrincipal) -> Principal:
    if not principal.can("organization:write"):
        raise Forbidden("missing permission organization:write")
    if principal.org_id is None:
        raise Forbidden("this operation needs an organization; switch to one first")
    return principal


Reader = Annotated[AuditScope, Depends(_reader)]
Writer = Annotated[Principal, Depends(_writer)]
OrgAdmin = Annotated[Principal, Depends(_own_org_admin)]
