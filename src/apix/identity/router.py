"""Auth endpoints (`/api/v1/auth/…`) and the public signing keys."""

from __future__ import annotations

from fastapi import Request, Response, status

from apix.core.errors import ErrorResponse
from apix.core.routing import api_router
from apix.identity import service
from apix.identity.deps import CurrentPrincipal, Meta, Runtime, credential_from
from apix.identity.schemas import (
    InvitationAccept,
    Jwks,
    LoginRequest,
    Membership,
    MfaCode,
    MfaEnrollment,
    PasswordChange,
    Profile,
    ProfileUpdate,
    RefreshRequest,
    RegisterRequest,
    RegisterResponse,
    SwitchOrganizationRequest,
    TokenPair,
    TokenValidation,
)

_ERRORS = {401: {"model": ErrorResponse}, 422: {"model": ErrorResponse}}

router = api_router(prefix="/api/v1/auth", tags=["auth"], responses=_ERRORS)
keys_router = api_router(tags=["auth"])


@router.post("/register", status_code=status.HTTP_201_CREATED)
async def register(data: RegisterRequest, runtime: Runtime, meta: Meta) -> RegisterResponse:
    """Create an account and its organisation, or join one with an invitation token."""
    return await service.register(runtime, data, meta)


@router.post("/login", responses={429: {"model": ErrorResponse}})
async def login(data: LoginRequest, runtime: Runtime, meta: Meta) -> TokenPair:
    """Exchange email and password (and a TOTP code when enrolled) for tokens."""
    return await service.login(runtime, data, meta)


@router.post("/refresh")
async def refresh(data: RefreshRequest, runtime: Runtime, meta: Meta) -> TokenPair:
    """Rotate a refresh token: new tokens, and the presented one stops working."""
    return await service.refresh(runtime, data.refresh_token, meta)


@router.post("/logout", status_code=status.HTTP_204_NO_CONTENT)
async def logout(principal: CurrentPrincipal, runtime: Runtime, meta: Meta) -> Response:
    """End this login session; its access tokens stop working at once."""
    await service.logout(runtime, principal, meta)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/profile")
async def get_profile(principal: CurrentPrincipal, runtime: Runtime) -> Profile:
    """The caller's account, current organisation and memberships."""
    return await service.profile(runtime, principal)


@router.patch("/profile")
async def update_profile(
    data: ProfileUpdate, principal: CurrentPrincipal, runtime: Runtime, meta: Meta
) -> Profile:
    """Change the caller's name or profile fields."""
    return await service.update_profile(runtime, principal, data, meta)


@router.post("/password", status_code=status.HTTP_204_NO_CONTENT)
async def change_password(
    data: PasswordChange, principal: CurrentPrincipal, runtime: Runtime, meta: Meta
) -> Response:
    """Change the password; every other session of the account is revoked."""
    await service.change_password(runtime, principal, data, meta)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/validate")
async def validate(request: Request, runtime: Runtime) -> TokenValidation:
    """Introspect the presented token or API key: valid, for whom, until when."""
    return await service.validate(runtime, credential_from(request))


@router.post("/switch-organization")
async def switch_organization(
    data: SwitchOrganizationRequest, principal: CurrentPrincipal, runtime: Runtime, meta: Meta
) -> TokenPair:
    """New tokens for another organisation the caller belongs to."""
    return await service.switch_organization(runtime, principal, data, meta)


@router.post("/invitations/accept")
async def accept_invitation(
    data: InvitationAccept, principal: CurrentPrincipal, runtime: Runtime, meta: Meta
) -> Membership:
    """Join an organisation with an invitation addressed to the caller's email."""
    return await service.accept_invitation(runtime, principal, data.token, meta)


@router.post("/mfa/enroll")
async def mfa_enroll(principal: CurrentPrincipal, runtime: Runtime, meta: Meta) -> MfaEnrollment:
    """Start TOTP enrolment: a secret and an otpauth URI for an authenticator app."""
    return await service.mfa_enroll(runtime, principal, meta)


@router.post("/mfa/verify", status_code=status.HTTP_204_NO_CONTENT)
async def mfa_verify(
    data: MfaCode, principal: CurrentPrincipal, runtime: Runtime, meta: Meta
) -> Response:
    """Confirm enrolment with a current code; logins then require a code."""
    await service.mfa_verify(runtime, principal, data.code, meta)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/mfa/disable", status_code=status.HTTP_204_NO_CONTENT)
async def mfa_disable(
    data: MfaCode, principal: CurrentPrincipal, runtime: Runtime, meta: Meta
) -> Response:
    """Turn MFA off, proven with a current code."""
    await service.mfa_disable(runtime, principal, data.code, meta)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@keys_router.get("/.well-known/jwks.json")
async def jwks(runtime: Runtime) -> Jwks:
    """Public keys that verify APIX access tokens, by `kid`."""
    return Jwks.model_validate(runtime.keyring.jwks())
