"""Organisation administration (`/api/v1/admin/…`), permission-checked by guards."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import Depends, Response, status

from apix.core.errors import ErrorResponse
from apix.core.routing import api_router
from apix.identity import admin
from apix.identity.deps import CurrentPrincipal, Meta, Runtime, require
from apix.identity.permissions import Role
from apix.identity.principal import Principal
from apix.identity.schemas import (
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyRead,
    InvitationCreate,
    InvitationCreated,
    InvitationRead,
    MemberRead,
    MemberUpdate,
    OrganizationRead,
    OrganizationUpdate,
    SessionRead,
)

_ERRORS = {
    401: {"model": ErrorResponse},
    403: {"model": ErrorResponse},
    404: {"model": ErrorResponse},
    422: {"model": ErrorResponse},
}

router = api_router(prefix="/api/v1/admin", tags=["admin"], responses=_ERRORS)
_NO_CONTENT = status.HTTP_204_NO_CONTENT


@router.get("/organization")
async def get_organization(
    principal: Annotated[Principal, Depends(require("organization:read"))], runtime: Runtime
) -> OrganizationRead:
    """The caller's organisation."""
    return await admin.get_organization(runtime, principal)


@router.patch("/organization")
async def update_organization(
    data: OrganizationUpdate,
    principal: Annotated[Principal, Depends(require("organization:write"))],
    runtime: Runtime,
    meta: Meta,
) -> OrganizationRead:
    """Change the organisation's name, settings, branding or allowed origins."""
    return await admin.update_organization(runtime, principal, data, meta)


@router.get("/members")
async def list_members(
    principal: Annotated[Principal, Depends(require("members:read"))], runtime: Runtime
) -> list[MemberRead]:
    """The organisation's members and their roles."""
    return await admin.list_members(runtime, principal)


@router.patch("/members/{user_id}")
async def change_member_role(
    user_id: uuid.UUID,
    data: MemberUpdate,
    principal: Annotated[Principal, Depends(require("members:write"))],
    runtime: Runtime,
    meta: Meta,
) -> MemberRead:
    """Change a member's role (the last ORG_ADMIN cannot be demoted)."""
    return await admin.change_member_role(runtime, principal, user_id, Role(data.role), meta)


@router.delete("/members/{user_id}", status_code=_NO_CONTENT)
async def remove_member(
    user_id: uuid.UUID,
    principal: Annotated[Principal, Depends(require("members:write"))],
    runtime: Runtime,
    meta: Meta,
) -> Response:
    """Remove a member (the last ORG_ADMIN cannot be removed)."""
    await admin.remove_member(runtime, principal, user_id, meta)
    return Response(status_code=_NO_CONTENT)


@router.post("/invitations", status_code=status.HTTP_201_CREATED)
async def create_invitation(
    data: InvitationCreate,
    principal: Annotated[Principal, Depends(require("invitations:write"))],
    runtime: Runtime,
    meta: Meta,
) -> InvitationCreated:
    """Invite someone by email with a role; the token is shown only in this response."""
    return await admin.create_invitation(runtime, principal, data, meta)


@router.get("/invitations")
async def list_invitations(
    principal: Annotated[Principal, Depends(require("invitations:read"))], runtime: Runtime
) -> list[InvitationRead]:
    """The organisation's invitations, newest first."""
    return await admin.list_invitations(runtime, principal)


@router.delete("/invitations/{invitation_id}", status_code=_NO_CONTENT)
async def revoke_invitation(
    invitation_id: uuid.UUID,
    principal: Annotated[Principal, Depends(require("invitations:write"))],
    runtime: Runtime,
    meta: Meta,
) -> Response:
    """Revoke an invitation so it can no longer be accepted."""
    await admin.revoke_invitation(runtime, principal, invitation_id, meta)
    return Response(status_code=_NO_CONTENT)


@router.post("/api-keys", status_code=status.HTTP_201_CREATED)
async def create_api_key(
    data: ApiKeyCreate,
    principal: Annotated[Principal, Depends(require("api_keys:write"))],
    runtime: Runtime,
    meta: Meta,
) -> ApiKeyCreated:
    """Create an API key with a role or a subset of permissions; the key is shown only here."""
    return await admin.create_api_key(runtime, principal, data, meta)


@router.get("/api-keys")
async def list_api_keys(
    principal: Annotated[Principal, Depends(require("api_keys:read"))], runtime: Runtime
) -> list[ApiKeyRead]:
    """The organisation's API keys (never the keys themselves)."""
    return await admin.list_api_keys(runtime, principal)


@router.delete("/api-keys/{key_id}", status_code=_NO_CONTENT)
async def revoke_api_key(
    key_id: uuid.UUID,
    principal: Annotated[Principal, Depends(require("api_keys:write"))],
    runtime: Runtime,
    meta: Meta,
) -> Response:
    """Revoke an API key; it stops working at once."""
    await admin.revoke_api_key(runtime, principal, key_id, meta)
    return Response(status_code=_NO_CONTENT)


@router.get("/sessions")
async def list_sessions(principal: CurrentPrincipal, runtime: Runtime) -> list[SessionRead]:
    """The caller's own active login sessions."""
    return await admin.list_sessions(runtime, principal)


@router.delete("/sessions/{session_id}", status_code=_NO_CONTENT)
async def revoke_session(
    session_id: uuid.UUID, principal: CurrentPrincipal, runtime: Runtime, meta: Meta
) -> Response:
    """Revoke one of the caller's sessions."""
    await admin.revoke_session(runtime, principal, session_id, meta)
    return Response(status_code=_NO_CONTENT)


@router.get("/organizations")
async def list_organizations(
    principal: Annotated[Principal, Depends(require("platform:organizations"))], runtime: Runtime
) -> list[OrganizationRead]:
    """Every organisation on the platform (SUPER_ADMIN)."""
    return await admin.list_all_organizations(runtime)


@router.post("/organizations/{org_id}/suspend")
async def suspend_organization(
    org_id: uuid.UUID,
    principal: Annotated[Principal, Depends(require("platform:organizations"))],
    runtime: Runtime,
    meta: Meta,
) -> OrganizationRead:
    """Suspend an organisation: its tokens and API keys stop working (SUPER_ADMIN)."""
    return await admin.set_organization_active(runtime, principal, org_id, False, meta)


@router.post("/organizations/{org_id}/reactivate")
async def reactivate_organization(
    org_id: uuid.UUID,
    principal: Annotated[Principal, Depends(require("platform:organizations"))],
    runtime: Runtime,
    meta: Meta,
) -> OrganizationRead:
    """Reactivate a suspended organisation (SUPER_ADMIN)."""
    return await admin.set_organization_active(runtime, principal, org_id, True, meta)
