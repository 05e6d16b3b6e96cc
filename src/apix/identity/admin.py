"""Organisation administration: settings, members, invitations, API keys, sessions, and the
platform operator's organisation list. Every write is audited in the same transaction.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import TypeVar

from sqlalchemy import func, select

from apix.audit import service as audit
from apix.audit.service import RequestMeta
from apix.core.errors import AppError, BadRequest, Forbidden, NotFound
from apix.core.security import new_token, token_hash
from apix.core.time import utcnow
from apix.identity import errors
from apix.identity.models import ApiKey, AuthSession, Invitation, Membership, Organization, User
from apix.identity.permissions import ORG_ROLES, ROLE_PERMISSIONS, Role, all_permissions
from apix.identity.principal import Principal
from apix.identity.runtime import IdentityRuntime
from apix.identity.schemas import (
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyRead,
    InvitationCreate,
    InvitationCreated,
    InvitationRead,
    MemberRead,
    OrganizationRead,
    OrganizationUpdate,
    SessionRead,
)
from apix.identity.service import API_KEY_PREFIX, _revoke
from apix.infra.database import UnitOfWork, set_tenant

_JSON_MAX_BYTES = 16_384


class UnknownPermission(AppError):
    status_code = 422
    code = "unknown_permission"
    message = "unknown permission"


def _org_id(principal: Principal) -> uuid.UUID:
    if principal.org_id is None:
        raise Forbidden("this operation needs an organization")
    return principal.org_id


# --- organisation -----------------------------------------------------------------------


async def get_organization(rt: IdentityRuntime, principal: Principal) -> OrganizationRead:
    async with rt.database.transaction(_org_id(principal)) as uow:
        org = await uow.session.get_one(Organization, principal.org_id)
    return OrganizationRead.model_validate(org, from_attributes=True)


async def update_organization(
    rt: IdentityRuntime, principal: Principal, data: OrganizationUpdate, meta: RequestMeta
) -> OrganizationRead:
    if data.branding is not None and len(str(data.branding).encode()) > _JSON_MAX_BYTES:
        raise BadRequest("branding is larger than 16 KiB")
    org_id = _org_id(principal)
    async with rt.database.transaction(org_id) as uow:
        org = await uow.session.get_one(Organization, org_id, with_for_update=True)
        changed = data.model_dump(exclude_unset=True, exclude_none=True)
        for field, value in changed.items():
            setattr(org, field, value)
        await uow.session.flush()
        await uow.session.refresh(org)
        await audit.record(
            uow,
            "organization.updated",
            meta=meta,
            org_id=org_id,
            target_type="organization",
            target_id=org_id,
            details={"fields": sorted(changed)},
            by=principal,
        )
    return OrganizationRead.model_validate(org, from_attributes=True)


# --- members ----------------------------------------------------------------------------


async def list_members(rt: IdentityRuntime, principal: Principal) -> list[MemberRead]:
    async with rt.database.transaction(_org_id(principal)) as uow:
        rows = await uow.session.execute(
            select(Membership, User)
            .join(User, User.id == Membership.user_id)
            .where(Membership.org_id == principal.org_id)
            .order_by(Membership.created_at, User.email)
        )
        return [_member(m, u) for m, u in rows]


def _member(membership: Membership, user: User) -> MemberRead:
    return MemberRead(
        user_id=user.id,
        email=user.email,
        name=user.name,
        role=Role(membership.role),
        joined_at=membership.created_at,
    )


async def _membership(uow: UnitOfWork, org_id: uuid.UUID, user_id: uuid.UUID) -> Membership:
    membership = await uow.session.scalar(
        select(Membership)
        .where(Membership.org_id == org_id, Membership.user_id == user_id)
        .with_for_update()
    )
    if membership is None:
        raise NotFound("no such member")
    return membership


async def _ensure_another_admin(uow: UnitOfWork, org_id: uuid.UUID, leaving: Membership) -> None:
    if leaving.role != Role.ORG_ADMIN:
        return
    admins = await uow.session.scalar(
        select(func.count())
        .select_from(Membership)
        .where(Membership.org_id == org_id, Membership.role == Role.ORG_ADMIN.value)
    )
    if (admins or 0) <= 1:
        raise errors.LastAdmin


async def change_member_role(
    rt: IdentityRuntime, principal: Principal, user_id: uuid.UUID, role: Role, meta: RequestMeta
) -> MemberRead:
    org_id = _org_id(principal)
    if role not in ORG_ROLES or not principal.role.at_least(role):
        raise errors.PermissionEscalation
    async with rt.database.transaction(org_id) as uow:
        # Serialise role changes in one organisation so the last-admin rule holds under races.
        await _lock_org(uow, org_id)
        membership = await _membership(uow, org_id, user_id)
        previous = membership.role
        if role != Role.ORG_ADMIN:
            await _ensure_another_admin(uow, org_id, membership)
        membership.role = role.value
        user = await uow.session.get_one(User, user_id)
        sessions = await _member_sessions(uow, org_id, user_id) if previous != role else []
        await _revoke(uow, sessions, "role_changed")
        await audit.record(
            uow,
            "member.role_changed",
            meta=meta,
            org_id=org_id,
            target_type="user",
            target_id=user_id,
            details={"from": previous, "to": role.value},
            by=principal,
        )
        result = _member(membership, user)
    # Tokens carry the role: end the member's sessions here so the change applies at once.
    await rt.revoke_sessions(sessions)
    return result


async def remove_member(
    rt: IdentityRuntime, principal: Principal, user_id: uuid.UUID, meta: RequestMeta
) -> None:
    org_id = _org_id(principal)
    async with rt.database.transaction(org_id) as uow:
        await _lock_org(uow, org_id)
        membership = await _membership(uow, org_id, user_id)
        await _ensure_another_admin(uow, org_id, membership)
        await uow.session.delete(membership)
        sessions = await _member_sessions(uow, org_id, user_id)
        await _revoke(uow, sessions, "member_removed")
        await audit.record(
            uow,
            "member.removed",
            meta=meta,
            org_id=org_id,
            target_type="user",
            target_id=user_id,
            details={"role": membership.role},
            by=principal,
        )
    await rt.revoke_sessions(sessions)


async def _lock_org(uow: UnitOfWork, org_id: uuid.UUID) -> None:
    await uow.session.execute(
        select(Organization.id).where(Organization.id == org_id).with_for_update()
    )


async def _member_sessions(
    uow: UnitOfWork, org_id: uuid.UUID, user_id: uuid.UUID
) -> list[uuid.UUID]:
    return list(
        (
            await uow.session.scalars(
                select(AuthSession.id).where(
                    AuthSession.user_id == user_id,
                    AuthSession.org_id == org_id,
                    AuthSession.revoked_at.is_(None),
                )
            )
        ).all()
    )


# --- invitations ------------------------------------------------------------------------


async def create_invitation(
    rt: IdentityRuntime, principal: Principal, data: InvitationCreate, meta: RequestMeta
) -> InvitationCreated:
    org_id = _org_id(principal)
    role = Role(data.role)
    if not principal.role.at_least(role):
        raise errors.PermissionEscalation
    token = new_token("inv")
    async with rt.database.transaction(org_id) as uow:
        invitation = Invitation(
            org_id=org_id,
            email=data.email,
            role=role.value,
            token_hash=token_hash(token),
            invited_by=principal.user_id,
            expires_at=utcnow() + timedelta(seconds=rt.settings.auth.invitation_ttl_s),
        )
        uow.session.add(invitation)
        await uow.session.flush()
        await audit.record(
            uow,
            "member.invited",
            meta=meta,
            org_id=org_id,
            target_type="invitation",
            target_id=invitation.id,
            details={"email": data.email, "role": role.value},
            by=principal,
        )
    return InvitationCreated(
        id=invitation.id,
        email=invitation.email,
        role=role,
        expires_at=invitation.expires_at,
        token=token,
    )


async def list_invitations(rt: IdentityRuntime, principal: Principal) -> list[InvitationRead]:
    async with rt.database.transaction(_org_id(principal)) as uow:
        rows = await uow.session.scalars(
            select(Invitation)
            .where(Invitation.org_id == principal.org_id)
            .order_by(Invitation.created_at.desc())
        )
        return [InvitationRead.model_validate(i, from_attributes=True) for i in rows]


async def revoke_invitation(
    rt: IdentityRuntime, principal: Principal, invitation_id: uuid.UUID, meta: RequestMeta
) -> None:
    await _revoke_row(rt, principal, Invitation, invitation_id, meta, kind="invitation")


Revocable = TypeVar("Revocable", Invitation, ApiKey)


async def _revoke_row(
    rt: IdentityRuntime,
    principal: Principal,
    model: type[Revocable],
    row_id: uuid.UUID,
    meta: RequestMeta,
    *,
    kind: str,
) -> None:
    """Revoke an organisation's invitation or API key (idempotent), audited; 404 otherwise."""
    org_id = _org_id(principal)
    async with rt.database.transaction(org_id) as uow:
        row = await uow.session.scalar(
            select(model).where(model.id == row_id, model.org_id == org_id)
        )
        if row is None:
            raise NotFound(f"no such {kind.replace('_', ' ')}")
        if row.revoked_at is None:
            row.revoked_at = utcnow()
        await audit.record(
            uow,
            f"{kind}.revoked",
            meta=meta,
            org_id=org_id,
            target_type=kind,
            target_id=row_id,
            by=principal,
        )


# --- API keys ---------------------------------------------------------------------------


async def create_api_key(
    rt: IdentityRuntime, principal: Principal, data: ApiKeyCreate, meta: RequestMeta
) -> ApiKeyCreated:
    org_id = _org_id(principal)
    role = Role(data.role) if data.role else None
    if role is None and data.permissions is None:
        role = Role.VIEWER
    if data.permissions is not None:
        unknown = sorted(set(data.permissions) - set(all_permissions()))
        if unknown:
            raise UnknownPermission(details={"unknown": unknown})
    granted = ROLE_PERMISSIONS[role] if role is not None else frozenset(data.permissions or ())
    # A key never holds more than whoever creates it (user or key).
    if not granted <= principal.permissions or (role and not principal.role.at_least(role)):
        raise errors.PermissionEscalation(
            details={"excess": sorted(granted - principal.permissions)}
        )
    if data.expires_at is not None and data.expires_at <= utcnow():
        raise BadRequest("expires_at must be in the future")
    key = new_token(API_KEY_PREFIX)
    async with rt.database.transaction(org_id) as uow:
        row = ApiKey(
            org_id=org_id,
            name=data.name,
            prefix=key[: len(API_KEY_PREFIX) + 7],
            token_hash=token_hash(key),
            role=role.value if role else None,
            permissions=None if role else sorted(granted),
            created_by=principal.user_id,
            expires_at=data.expires_at,
        )
        uow.session.add(row)
        await uow.session.flush()
        await audit.record(
            uow,
            "api_key.created",
            meta=meta,
            org_id=org_id,
            target_type="api_key",
            target_id=row.id,
            details={"name": data.name, "role": row.role, "permissions": row.permissions},
            by=principal,
        )
    return ApiKeyCreated(
        id=row.id,
        name=row.name,
        prefix=row.prefix,
        role=role,
        permissions=sorted(granted),
        expires_at=row.expires_at,
        key=key,
    )


def _api_key(row: ApiKey) -> ApiKeyRead:
    role = Role(row.role) if row.role else None
    permissions = sorted(ROLE_PERMISSIONS[role]) if role else sorted(row.permissions or ())
    return ApiKeyRead(
        id=row.id,
        name=row.name,
        prefix=row.prefix,
        role=role,
        permissions=permissions,
        created_at=row.created_at,
        expires_at=row.expires_at,
        last_used_at=row.last_used_at,
        revoked_at=row.revoked_at,
    )


async def list_api_keys(rt: IdentityRuntime, principal: Principal) -> list[ApiKeyRead]:
    async with rt.database.transaction(_org_id(principal)) as uow:
        rows = await uow.session.scalars(
            select(ApiKey).where(ApiKey.org_id == principal.org_id).order_by(ApiKey.created_at)
        )
        return [_api_key(r) for r in rows]


async def revoke_api_key(
    rt: IdentityRuntime, principal: Principal, key_id: uuid.UUID, meta: RequestMeta
) -> None:
    await _revoke_row(rt, principal, ApiKey, key_id, meta, kind="api_key")
    # Committed: every node that kept the key reads it again (now revoked) before using it.
    await rt.revocations.revoke_key(key_id)


# --- sessions (the caller's own) --------------------------------------------------------


async def list_sessions(rt: IdentityRuntime, principal: Principal) -> list[SessionRead]:
    if principal.user_id is None:
        return []
    async with rt.database.transaction(principal.org_id, user_id=principal.user_id) as uow:
        rows = await uow.session.scalars(
            select(AuthSession)
            .where(
                AuthSession.user_id == principal.user_id,
                AuthSession.revoked_at.is_(None),
                AuthSession.expires_at > utcnow(),
            )
            .order_by(AuthSession.created_at.desc())
        )
        return [
            SessionRead(
                id=s.id,
                org_id=s.org_id,
                ip=s.ip,
                user_agent=s.user_agent,
                created_at=s.created_at,
                last_used_at=s.last_used_at,
                expires_at=s.expires_at,
                current=s.id == principal.session_id,
            )
            for s in rows
        ]


async def revoke_session(
    rt: IdentityRuntime, principal: Principal, session_id: uuid.UUID, meta: RequestMeta
) -> None:
    async with rt.database.transaction(principal.org_id, user_id=principal.user_id) as uow:
        row = await uow.session.get(AuthSession, session_id)
        if row is None or row.user_id != principal.user_id:
            raise NotFound("no such session")
        await _revoke(uow, [session_id], "revoked_by_user")
        await audit.record(
            uow,
            "session.revoked",
            meta=meta,
            org_id=principal.org_id,
            target_type="session",
            target_id=session_id,
            by=principal,
        )
    await rt.revoke_sessions([session_id])


# --- platform (SUPER_ADMIN) -------------------------------------------------------------


async def list_all_organizations(rt: IdentityRuntime) -> list[OrganizationRead]:
    async with rt.database.transaction() as uow:
        rows = await uow.session.scalars(select(Organization).order_by(Organization.created_at))
        return [OrganizationRead.model_validate(o, from_attributes=True) for o in rows]


async def set_organization_active(
    rt: IdentityRuntime,
    principal: Principal,
    org_id: uuid.UUID,
    active: bool,
    meta: RequestMeta,
) -> OrganizationRead:
    async with rt.database.transaction() as uow:
        org = await uow.session.get(Organization, org_id, with_for_update=True)
        if org is None:
            raise NotFound("no such organization")
        org.is_active = active
        await uow.session.flush()
        await uow.session.refresh(org)
        # The platform path: recorded in the target organisation's own audit trail.
        await set_tenant(uow.session, org_id)
        await audit.record(
            uow,
            "organization.reactivated" if active else "organization.suspended",
            meta=meta,
            org_id=org_id,
            target_type="organization",
            target_id=org_id,
            details={"platform": True},
            by=principal,
        )
    await rt.set_suspended(org_id, not active)
    return OrganizationRead.model_validate(org, from_attributes=True)
