"""Authentication flows: register, login, refresh rotation, logout, profile, MFA, invitations.

Flows whose failures must leave a trace (a failed login is audited; a reused refresh token
revokes its family) commit that trace in its own transaction before raising, so the
rollback of the failed request cannot erase it.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pyotp
from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import IntegrityError

from apix.audit import service as audit
from apix.audit.service import RequestMeta
from apix.core.errors import AppError, BadRequest, NotFound
from apix.core.security import InvalidToken as UndecryptableSecret
from apix.core.security import new_token, token_hash
from apix.core.time import utcnow
from apix.identity import errors, tokens
from apix.identity.models import (
    ApiKey,
    AuthSession,
    Invitation,
    Membership,
    Organization,
    RefreshToken,
    SessionRevocation,
    User,
)
from apix.identity.passwords import Passwords
from apix.identity.permissions import ROLE_PERMISSIONS, Role
from apix.identity.principal import Principal, PrincipalKind
from apix.identity.runtime import CachedApiKey, IdentityRuntime
from apix.identity.schemas import (
    LoginRequest,
    MfaEnrollment,
    OrganizationRef,
    PasswordChange,
    Profile,
    ProfileUpdate,
    RegisterRequest,
    RegisterResponse,
    SwitchOrganizationRequest,
    TokenPair,
    TokenValidation,
    UserRef,
)
from apix.identity.schemas import Membership as MembershipOut
from apix.infra.database import (
    Database,
    UnitOfWork,
    set_auth_session,
    set_lookup,
    set_tenant,
    set_user,
)

API_KEY_PREFIX = "apx"
_PROFILE_MAX_BYTES = 16_384


def user_ref(user: User) -> UserRef:
    return UserRef(id=user.id, email=user.email, name=user.name)


def org_ref(org: Organization | None) -> OrganizationRef | None:
    return None if org is None else OrganizationRef(id=org.id, slug=org.slug, name=org.name)


# --- register ---------------------------------------------------------------------------


async def register(
    rt: IdentityRuntime, data: RegisterRequest, meta: RequestMeta
) -> RegisterResponse:
    password_hash = await rt.passwords.hash(data.password)
    try:
        async with rt.database.transaction() as uow:
            if await _user_by_email(uow, data.email) is not None:
                raise errors.EmailTaken
            user = User(email=data.email, password_hash=password_hash, name=data.name)
            uow.session.add(user)
            await uow.session.flush()
            if data.invitation_token is not None:
                invitation = await _redeem_invitation(uow, data.invitation_token, user)
                org = await uow.session.get_one(Organization, invitation.org_id)
                role = Role(invitation.role)
            else:
                org, role = await _create_organization(uow, data), Role.ORG_ADMIN
                uow.session.add(Membership(org_id=org.id, user_id=user.id, role=role.value))
                await uow.session.flush()
            await audit.record(
                uow,
                "user.registered",
                meta=meta,
                org_id=org.id,
                actor_user_id=user.id,
                target_type="user",
                target_id=user.id,
                details={"role": role.value, "invited": data.invitation_token is not None},
            )
    except IntegrityError as exc:
        # Two registrations racing for one email or slug: the unique index decides.
        if "email" in str(exc.orig):
            raise errors.EmailTaken from exc
        raise errors.SlugTaken from exc
    org_out = org_ref(org)
    assert org_out is not None  # noqa: S101 - both branches set an organization
    return RegisterResponse(user=user_ref(user), organization=org_out, role=role)


async def _create_organization(uow: UnitOfWork, data: RegisterRequest) -> Organization:
    exists = await uow.session.scalar(
        select(Organization.id).where(Organization.slug == data.organization_slug)
    )
    if exists is not None:
        raise errors.SlugTaken
    org = Organization(
        name=data.organization_name,
        slug=data.organization_slug,
        settings={"timezone": "UTC", "language": "en", "date_format": "YYYY-MM-DD"},
    )
    uow.session.add(org)
    await uow.session.flush()
    await set_tenant(uow.session, org.id)
    return org


async def _redeem_invitation(uow: UnitOfWork, token: str, user: User) -> Invitation:
    await set_lookup(uow.session, token_hash(token))
    invitation = await uow.session.scalar(
        select(Invitation).where(Invitation.token_hash == token_hash(token)).with_for_update()
    )
    now = utcnow()
    if (
        invitation is None
        or invitation.accepted_at is not None
        or invitation.revoked_at is not None
        or invitation.expires_at <= now
        or invitation.email.lower() != user.email.lower()
    ):
        raise errors.InvitationInvalid
    await set_tenant(uow.session, invitation.org_id)
    existing = await uow.session.scalar(
        select(Membership.id).where(
            Membership.org_id == invitation.org_id, Membership.user_id == user.id
        )
    )
    if existing is not None:
        raise errors.AlreadyMember
    invitation.accepted_at = now
    uow.session.add(Membership(org_id=invitation.org_id, user_id=user.id, role=invitation.role))
    await uow.session.flush()
    return invitation


async def accept_invitation(
    rt: IdentityRuntime, principal: Principal, token: str, meta: RequestMeta
) -> MembershipOut:
    user_id = _require_user(principal)
    async with rt.database.transaction(user_id=user_id) as uow:
        user = await uow.session.get_one(User, user_id)
        invitation = await _redeem_invitation(uow, token, user)
        org = await uow.session.get_one(Organization, invitation.org_id)
        await audit.record(
            uow,
            "invitation.accepted",
            meta=meta,
            org_id=org.id,
            actor_user_id=user_id,
            target_type="invitation",
            target_id=invitation.id,
        )
    org_out = org_ref(org)
    assert org_out is not None  # noqa: S101
    return MembershipOut(organization=org_out, role=Role(invitation.role))


# --- login, refresh, logout -------------------------------------------------------------


@dataclass(frozen=True)
class _Chosen:
    org: Organization | None
    role: Role


async def login(rt: IdentityRuntime, data: LoginRequest, meta: RequestMeta) -> TokenPair:
    wait = await rt.login_blocked_for(data.email, meta.ip)
    if wait is not None:
        raise errors.TooManyAttempts(wait)
    async with rt.database.transaction() as uow:
        user = await _user_by_email(uow, data.email)
    # Verified even for an unknown email (against a dummy hash): same answer, same time.
    password_ok = await rt.passwords.verify(user.password_hash if user else None, data.password)
    if user is None or not password_ok:
        await _login_failed(rt, data.email, meta, user, "invalid_credentials")
        raise errors.InvalidCredentials
    if user.mfa_enabled:
        if data.totp_code is None:
            raise errors.MfaRequired
        if not _totp_ok(rt, user, data.totp_code):
            await _login_failed(rt, data.email, meta, user, "invalid_mfa_code")
            raise errors.InvalidMfaCode
    async with rt.database.transaction(user_id=user.id) as uow:
        user = await uow.session.get_one(User, user.id)
        chosen = await _choose_organization(uow, user, slug=data.organization_slug)
        if rt.passwords.needs_rehash(user.password_hash):
            user.password_hash = await rt.passwords.hash(data.password)
        user.last_login_at = utcnow()
        pair = await _open_session(rt, uow, user, chosen, meta)
        await audit.record(
            uow,
            "auth.login",
            meta=meta,
            org_id=chosen.org.id if chosen.org else None,
            actor_user_id=user.id,
            target_type="user",
            target_id=user.id,
        )
    return pair


async def _login_failed(
    rt: IdentityRuntime, email: str, meta: RequestMeta, user: User | None, reason: str
) -> None:
    await rt.record_login_failure(email, meta.ip)
    async with rt.database.transaction() as uow:
        await audit.record(
            uow,
            "auth.login",
            meta=meta,
            actor_user_id=user.id if user else None,
            target_type="user",
            target_id=user.id if user else None,
            outcome="failure",
            details={"reason": reason},
        )


async def _choose_organization(
    uow: UnitOfWork,
    user: User,
    *,
    slug: str | None = None,
    org_id: uuid.UUID | None = None,
) -> _Chosen:
    """The organisation a login or switch lands in: named, or the user's first."""
    query = (
        select(Organization, Membership.role)
        .join(Membership, Membership.org_id == Organization.id)
        .where(Membership.user_id == user.id)
        .order_by(Membership.created_at, Organization.slug)
    )
    if slug is not None:
        query = query.where(Organization.slug == slug)
    if org_id is not None:
        query = query.where(Organization.id == org_id)
    rows = (await uow.session.execute(query)).all()
    if slug is not None or org_id is not None:
        if not rows:
            if user.is_super_admin:
                return await _super_admin_target(uow, slug=slug, org_id=org_id)
            raise NotFound("no such organization")
        org, role = rows[0]
        if not org.is_active and not user.is_super_admin:
            raise errors.OrganizationSuspended
        return _Chosen(org, Role.SUPER_ADMIN if user.is_super_admin else Role(role))
    active = [(org, role) for org, role in rows if org.is_active]
    if user.is_super_admin:
        return _Chosen(active[0][0] if active else None, Role.SUPER_ADMIN)
    if not active:
        if rows:
            raise errors.OrganizationSuspended
        raise errors.NoOrganization
    org, role = active[0]
    return _Chosen(org, Role(role))


async def _super_admin_target(
    uow: UnitOfWork, *, slug: str | None, org_id: uuid.UUID | None
) -> _Chosen:
    """A platform operator may act inside any organisation; the login is audited there."""
    query = select(Organization)
    query = (
        query.where(Organization.slug == slug)
        if slug is not None
        else query.where(Organization.id == org_id)
    )
    org = await uow.session.scalar(query)
    if org is None:
        raise NotFound("no such organization")
    return _Chosen(org, Role.SUPER_ADMIN)


async def _open_session(
    rt: IdentityRuntime, uow: UnitOfWork, user: User, chosen: _Chosen, meta: RequestMeta
) -> TokenPair:
    now = utcnow()
    session = AuthSession(
        user_id=user.id,
        org_id=chosen.org.id if chosen.org else None,
        ip=meta.ip,
        user_agent=meta.user_agent[:512] if meta.user_agent else None,
        expires_at=now + timedelta(seconds=rt.settings.auth.refresh_ttl_s),
        last_used_at=now,
    )
    uow.session.add(session)
    await uow.session.flush()
    if chosen.org is not None:
        await set_tenant(uow.session, chosen.org.id)
    return await _issue_pair(rt, uow, user, chosen, session)


async def _issue_pair(
    rt: IdentityRuntime, uow: UnitOfWork, user: User, chosen: _Chosen, session: AuthSession
) -> TokenPair:
    refresh = new_token("rt")
    uow.session.add(
        RefreshToken(
            session_id=session.id, token_hash=token_hash(refresh), expires_at=session.expires_at
        )
    )
    await uow.session.flush()
    access, expires = tokens.issue(
        rt.keyring,
        rt.settings.auth,
        user_id=user.id,
        org_id=chosen.org.id if chosen.org else None,
        role=chosen.role,
        session_id=session.id,
    )
    return TokenPair(
        access_token=access,
        refresh_token=refresh,
        expires_in=max(0, expires - int(utcnow().timestamp())),
        user=user_ref(user),
        organization=org_ref(chosen.org),
        role=chosen.role,
    )


async def refresh(rt: IdentityRuntime, presented: str, meta: RequestMeta) -> TokenPair:
    reused_session: uuid.UUID | None = None
    async with rt.database.transaction() as uow:
        row = await uow.session.scalar(
            select(RefreshToken)
            .where(RefreshToken.token_hash == token_hash(presented))
            .with_for_update()
        )
        if row is None:
            raise errors.InvalidToken("unknown refresh token")
        await set_auth_session(uow.session, row.session_id)
        session = await uow.session.get_one(AuthSession, row.session_id, with_for_update=True)
        now = utcnow()
        if row.used_at is not None:
            # A refresh token used twice was stolen, or its holder is confused: end the
            # whole family (the session) and every access token issued from it.
            if session.revoked_at is None:
                session.revoked_at, session.revoked_reason = now, "refresh_token_reuse"
            reused_session = session.id
            await audit.record(
                uow,
                "auth.refresh",
                meta=meta,
                actor_user_id=session.user_id,
                target_type="session",
                target_id=session.id,
                outcome="failure",
                details={"reason": "refresh_token_reuse"},
            )
        elif session.revoked_at is not None or row.expires_at <= now:
            raise errors.InvalidToken("refresh token revoked or expired")
        else:
            row.used_at = now
            session.last_used_at = now
            user = await uow.session.get_one(User, session.user_id)
            await set_user(uow.session, user.id)
            chosen = (
                await _choose_organization(uow, user, org_id=session.org_id)
                if (session.org_id)
                else await _choose_organization(uow, user)
            )
            if chosen.org is not None:
                await set_tenant(uow.session, chosen.org.id)
            pair = await _issue_pair(rt, uow, user, chosen, session)
            await audit.record(
                uow,
                "auth.refresh",
                meta=meta,
                org_id=chosen.org.id if chosen.org else None,
                actor_user_id=user.id,
                target_type="session",
                target_id=session.id,
            )
    if reused_session is not None:
        await rt.revoke_sessions([reused_session])
        raise errors.InvalidToken("refresh token already used; the session is revoked")
    return pair


async def logout(rt: IdentityRuntime, principal: Principal, meta: RequestMeta) -> None:
    if principal.session_id is None:
        raise errors.InvalidToken("only a login session can log out")
    async with rt.database.transaction(principal.org_id) as uow:
        await _revoke(uow, [principal.session_id], "logout")
        await audit.record(
            uow,
            "auth.logout",
            meta=meta,
            org_id=principal.org_id,
            actor_user_id=principal.user_id,
            target_type="session",
            target_id=principal.session_id,
        )
    await rt.revoke_sessions([principal.session_id])


async def _revoke(uow: UnitOfWork, session_ids: list[uuid.UUID], reason: str) -> None:
    if not session_ids:
        return
    now = utcnow()
    await uow.session.execute(
        update(AuthSession)
        .where(AuthSession.id.in_(session_ids), AuthSession.revoked_at.is_(None))
        .values(revoked_at=now, revoked_reason=reason)
    )
    # The platform-wide list a starting node copies back into Redis (no tenant data in it).
    await uow.session.execute(
        insert(SessionRevocation)
        .values([{"session_id": sid, "revoked_at": now} for sid in session_ids])
        .on_conflict_do_nothing()
    )


async def switch_organization(
    rt: IdentityRuntime, principal: Principal, data: SwitchOrganizationRequest, meta: RequestMeta
) -> TokenPair:
    """New tokens (a new session) for another organisation the user belongs to."""
    user_id = _require_user(principal)
    async with rt.database.transaction(user_id=user_id) as uow:
        user = await uow.session.get_one(User, user_id)
        chosen = await _choose_organization(
            uow, user, slug=data.organization_slug, org_id=data.organization_id
        )
        pair = await _open_session(rt, uow, user, chosen, meta)
        await audit.record(
            uow,
            "auth.switch_organization",
            meta=meta,
            org_id=chosen.org.id if chosen.org else None,
            actor_user_id=user.id,
            target_type="organization",
            target_id=chosen.org.id if chosen.org else None,
        )
    return pair


# --- profile and password ---------------------------------------------------------------


async def profile(rt: IdentityRuntime, principal: Principal) -> Profile:
    user_id = _require_user(principal)
    async with rt.database.transaction(principal.org_id, user_id=user_id) as uow:
        user = await uow.session.get_one(User, user_id)
        rows = await uow.session.execute(
            select(Organization, Membership.role)
            .join(Membership, Membership.org_id == Organization.id)
            .where(Membership.user_id == user_id)
            .order_by(Membership.created_at)
        )
        memberships = [
            MembershipOut(organization=OrganizationRef(id=o.id, slug=o.slug, name=o.name), role=r)
            for o, r in rows
        ]
        current = (
            await uow.session.get(Organization, principal.org_id) if principal.org_id else None
        )
    return Profile(
        id=user.id,
        email=user.email,
        name=user.name,
        profile=user.profile,
        mfa_enabled=user.mfa_enabled,
        last_login_at=user.last_login_at,
        created_at=user.created_at,
        organization=org_ref(current),
        role=principal.role,
        organizations=memberships,
    )


async def update_profile(
    rt: IdentityRuntime, principal: Principal, data: ProfileUpdate, meta: RequestMeta
) -> Profile:
    user_id = _require_user(principal)
    if data.profile is not None and len(str(data.profile).encode()) > _PROFILE_MAX_BYTES:
        raise BadRequest("profile is larger than 16 KiB")
    async with rt.database.transaction(principal.org_id) as uow:
        user = await uow.session.get_one(User, user_id)
        changed = data.model_dump(exclude_unset=True, exclude_none=True)
        for field, value in changed.items():
            setattr(user, field, value)
        await audit.record(
            uow,
            "user.profile_updated",
            meta=meta,
            org_id=principal.org_id,
            actor_user_id=user_id,
            target_type="user",
            target_id=user_id,
            details={"fields": sorted(changed)},
        )
    return await profile(rt, principal)


async def change_password(
    rt: IdentityRuntime, principal: Principal, data: PasswordChange, meta: RequestMeta
) -> None:
    user_id = _require_user(principal)
    async with rt.database.transaction() as uow:
        user = await uow.session.get_one(User, user_id)
    if not await rt.passwords.verify(user.password_hash, data.current_password):
        raise errors.InvalidCredentials("the current password is not correct")
    new_hash = await rt.passwords.hash(data.new_password)
    async with rt.database.transaction(principal.org_id, user_id=user_id) as uow:
        user = await uow.session.get_one(User, user_id, with_for_update=True)
        user.password_hash = new_hash
        others = list(
            (
                await uow.session.scalars(
                    select(AuthSession.id).where(
                        AuthSession.user_id == user_id,
                        AuthSession.revoked_at.is_(None),
                        AuthSession.id != principal.session_id,
                    )
                )
            ).all()
        )
        await _revoke(uow, others, "password_changed")
        await audit.record(
            uow,
            "user.password_changed",
            meta=meta,
            org_id=principal.org_id,
            actor_user_id=user_id,
            target_type="user",
            target_id=user_id,
            details={"sessions_revoked": len(others)},
        )
    await rt.revoke_sessions(others)


# --- MFA (TOTP) -------------------------------------------------------------------------


async def mfa_enroll(rt: IdentityRuntime, principal: Principal, meta: RequestMeta) -> MfaEnrollment:
    user_id = _require_user(principal)
    secret = pyotp.random_base32()
    async with rt.database.transaction(principal.org_id) as uow:
        user = await uow.session.get_one(User, user_id, with_for_update=True)
        if user.mfa_enabled:
            raise errors.MfaState("MFA is already enabled; disable it first")
        user.mfa_secret = rt.mfa_box.encrypt(secret)
        await audit.record(
            uow,
            "user.mfa_enrollment_started",
            meta=meta,
            org_id=principal.org_id,
            actor_user_id=user_id,
            target_type="user",
            target_id=user_id,
        )
    uri = pyotp.TOTP(secret).provisioning_uri(name=user.email, issuer_name="APIX")
    return MfaEnrollment(secret=secret, otpauth_uri=uri)


async def mfa_verify(
    rt: IdentityRuntime, principal: Principal, code: str, meta: RequestMeta
) -> None:
    await _mfa_set(rt, principal, code, meta, enable=True)


async def mfa_disable(
    rt: IdentityRuntime, principal: Principal, code: str, meta: RequestMeta
) -> None:
    await _mfa_set(rt, principal, code, meta, enable=False)


async def _mfa_set(
    rt: IdentityRuntime, principal: Principal, code: str, meta: RequestMeta, *, enable: bool
) -> None:
    user_id = _require_user(principal)
    async with rt.database.transaction(principal.org_id) as uow:
        user = await uow.session.get_one(User, user_id, with_for_update=True)
        if user.mfa_secret is None or user.mfa_enabled == enable:
            raise errors.MfaState(
                "enroll first" if user.mfa_secret is None else "MFA is already in that state"
            )
        if not _totp_ok(rt, user, code):
            raise errors.InvalidMfaCode
        user.mfa_enabled = enable
        if not enable:
            user.mfa_secret = None
        await audit.record(
            uow,
            "user.mfa_enabled" if enable else "user.mfa_disabled",
            meta=meta,
            org_id=principal.org_id,
            actor_user_id=user_id,
            target_type="user",
            target_id=user_id,
        )


def _totp_ok(rt: IdentityRuntime, user: User, code: str) -> bool:
    if user.mfa_secret is None:
        return False
    try:
        secret = rt.mfa_box.decrypt(user.mfa_secret)
    except UndecryptableSecret:
        return False
    return pyotp.TOTP(secret).verify(code, valid_window=1)


# --- authenticating a request -----------------------------------------------------------


async def authenticate(rt: IdentityRuntime, credential: str) -> Principal:
    """The principal behind an access token or API key, or an `Unauthorized` error."""
    if credential.startswith(f"{API_KEY_PREFIX}_"):
        return await _authenticate_api_key(rt, credential)
    claims = rt.verified.get(credential)
    if claims is None:
        try:
            claims = tokens.verify(rt.keyring, rt.settings.auth, credential)
        except tokens.TokenError as exc:
            if exc.expired:
                raise errors.TokenExpired from exc
            raise errors.InvalidToken(str(exc)) from exc
        rt.verified[credential] = claims
    elif claims.expires_at + tokens.LEEWAY_S < time.time():
        raise errors.TokenExpired
    if await rt.is_revoked(claims.session_id, claims.org_id):
        raise errors.InvalidToken("the token was revoked")
    return Principal(
        kind=PrincipalKind.USER,
        org_id=claims.org_id,
        role=claims.role,
        permissions=ROLE_PERMISSIONS[claims.role],
        user_id=claims.user_id,
        session_id=claims.session_id,
        token_expires_at=claims.expires_at * 1000,
    )


async def _authenticate_api_key(rt: IdentityRuntime, key: str) -> Principal:
    digest = token_hash(key)
    revocations = rt.revocations
    cached = rt.api_keys.get(digest)
    if (
        cached is None
        or cached.generation != revocations.keys_generation
        or not revocations.current
    ):
        # Taken before reading: a revocation announced meanwhile makes this read stale.
        generation = revocations.keys_generation
        cached = await _read_api_key(rt.database, digest, generation)
        rt.api_keys[digest] = cached
    principal = cached.principal
    expires_ms = principal.token_expires_at
    if expires_ms is not None and expires_ms <= time.time() * 1000:
        raise errors.TokenExpired("the API key has expired")
    if await rt.is_revoked(None, principal.org_id):
        raise errors.InvalidToken("the organization is suspended")
    return principal


async def _read_api_key(database: Database, digest: str, generation: int) -> CachedApiKey:
    async with database.transaction() as uow:
        await set_lookup(uow.session, digest)
        row = await uow.session.scalar(select(ApiKey).where(ApiKey.token_hash == digest))
        now = utcnow()
        if row is None or row.revoked_at is not None:
            raise errors.InvalidToken("unknown or revoked API key")
        if row.expires_at is not None and row.expires_at <= now:
            raise errors.TokenExpired("the API key has expired")
        if row.last_used_at is None or now - row.last_used_at > timedelta(minutes=1):
            # Recorded at most once a minute: a busy key must not cost a write per request.
            await set_tenant(uow.session, row.org_id)
            row.last_used_at = now
    role = Role(row.role) if row.role else None
    permissions = ROLE_PERMISSIONS[role] if role is not None else frozenset(row.permissions or ())
    principal = Principal(
        kind=PrincipalKind.API_KEY,
        org_id=row.org_id,
        role=role or Role.VIEWER,
        permissions=permissions,
        api_key_id=row.id,
        token_expires_at=int(row.expires_at.timestamp() * 1000) if row.expires_at else None,
    )
    return CachedApiKey(principal, generation)


async def validate(rt: IdentityRuntime, credential: str | None) -> TokenValidation:
    if not credential:
        return TokenValidation(valid=False, error="no token given")
    try:
        principal = await authenticate(rt, credential)
    except AppError as exc:
        return TokenValidation(valid=False, error=exc.code)
    expires = (
        datetime.fromtimestamp(principal.token_expires_at / 1000, UTC)
        if principal.token_expires_at
        else None
    )
    return TokenValidation(
        valid=True,
        kind=principal.kind.value,
        user_id=principal.user_id,
        api_key_id=principal.api_key_id,
        org_id=principal.org_id,
        role=principal.role,
        permissions=sorted(principal.permissions),
        expires_at=expires,
    )


# --- helpers ----------------------------------------------------------------------------


async def _user_by_email(uow: UnitOfWork, email: str) -> User | None:
    return await uow.session.scalar(select(User).where(func.lower(User.email) == email.lower()))


def _require_user(principal: Principal) -> uuid.UUID:
    if principal.user_id is None:
        raise errors.InvalidToken("this operation needs a user's token, not an API key")
    return principal.user_id


async def create_super_admin(
    database: Database, passwords: Passwords, *, email: str, password: str, name: str
) -> uuid.UUID:
    """Create a platform operator (or promote an existing account); audited. For the CLI."""
    async with database.transaction() as uow:
        user = await _user_by_email(uow, email)
        if user is None:
            user = User(email=email, password_hash=await passwords.hash(password), name=name)
            uow.session.add(user)
        user.is_super_admin = True
        await uow.session.flush()
        await audit.record(
            uow,
            "platform.super_admin_granted",
            meta=RequestMeta(user_agent="apix-cli"),
            target_type="user",
            target_id=user.id,
        )
        return user.id
