"""Contracts of the auth and admin API (snake_case JSON; SDKs rely on these names)."""

from __future__ import annotations

import math
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    EmailStr,
    Field,
    StringConstraints,
    model_validator,
)

from apix.identity.permissions import Role


def _no_nul(value: str) -> str:
    # PostgreSQL text cannot hold NUL, nor a lone surrogate (not UTF-8): refuse them here
    # with a 422 instead of failing later.
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode()
    except UnicodeEncodeError as exc:
        raise ValueError("must be valid Unicode (no lone surrogates)") from exc
    return value


def _not_blank(value: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError("must not be blank")
    return value


_INT64 = 2**63


def _storable_json(value: dict[str, Any]) -> dict[str, Any]:
    """Free-form JSON must survive JSONB and come back renderable: no NUL in any string
    (JSONB cannot hold it), no NaN or infinity, no number beyond 64 bits (JSONB keeps it
    exactly, and it could not be rendered back)."""
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            _no_nul(item)
        elif isinstance(item, bool):
            continue
        elif isinstance(item, int):
            if abs(item) >= _INT64:
                raise ValueError("numbers must be within 64 bits")
        elif isinstance(item, float) and (not math.isfinite(item) or abs(item) >= _INT64):
            raise ValueError("numbers must be finite and within 64 bits")
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return value


Text = Annotated[str, AfterValidator(_no_nul)]
Name = Annotated[
    str, StringConstraints(max_length=200), AfterValidator(_no_nul), AfterValidator(_not_blank)
]
JsonObject = Annotated[dict[str, Any], AfterValidator(_storable_json)]
Password = Annotated[Text, StringConstraints(min_length=8, max_length=128)]
Slug = Annotated[str, StringConstraints(pattern=r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")]
Email = Annotated[EmailStr, StringConstraints(max_length=320)]
TotpCode = Annotated[str, StringConstraints(pattern=r"^[0-9]{6}$")]
OrgRole = Literal["ORG_ADMIN", "DEVELOPER", "VIEWER"]
Tier = Literal["FREE", "STARTER", "PROFESSIONAL", "ENTERPRISE"]


def _valid_port(origin: str) -> str:
    _, _, port = origin.rpartition(":")
    if port.isdigit() and not 0 < int(port) <= 65535 and origin.count(":") == 2:
        raise ValueError("port must be 1 to 65535")
    return origin


Origin = Annotated[
    str,
    StringConstraints(pattern=r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?$", max_length=255),
    AfterValidator(_valid_port),
]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- shapes shared by several responses -------------------------------------------------


class UserRef(BaseModel):
    id: uuid.UUID
    email: str
    name: str


class OrganizationRef(BaseModel):
    id: uuid.UUID
    slug: str
    name: str


class TokenPair(BaseModel):
    access_token: str
    refresh_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 - the scheme, not a secret
    expires_in: int
    user: UserRef
    organization: OrganizationRef | None
    role: Role


# --- auth -------------------------------------------------------------------------------


class RegisterRequest(Strict):
    email: Email
    password: Password
    name: Name
    organization_name: Name | None = None
    organization_slug: Slug | None = None
    invitation_token: Annotated[Text, StringConstraints(max_length=200)] | None = None

    @model_validator(mode="after")
    def _organization_or_invitation(self) -> RegisterRequest:
        creating = self.organization_name is not None or self.organization_slug is not None
        if self.invitation_token is not None and creating:
            raise ValueError("give either invitation_token or organization_name and slug")
        if self.invitation_token is None and (
            self.organization_name is None or self.organization_slug is None
        ):
            raise ValueError("organization_name and organization_slug are required")
        return self


class RegisterResponse(BaseModel):
    user: UserRef
    organization: OrganizationRef
    role: Role


class LoginRequest(Strict):
    email: Annotated[Text, StringConstraints(max_length=320)]
    password: Annotated[Text, StringConstraints(max_length=128)]
    organization_slug: Annotated[Text, StringConstraints(max_length=63)] | None = None
    totp_code: TotpCode | None = None


class RefreshRequest(Strict):
    refresh_token: Annotated[Text, StringConstraints(max_length=200)]


class SwitchOrganizationRequest(Strict):
    organization_id: uuid.UUID | None = None
    organization_slug: Annotated[Text, StringConstraints(max_length=63)] | None = None

    @model_validator(mode="after")
    def _one_of(self) -> SwitchOrganizationRequest:
        if (self.organization_id is None) == (self.organization_slug is None):
            raise ValueError("give exactly one of organization_id and organization_slug")
        return self


class Membership(BaseModel):
    organization: OrganizationRef
    role: Role


class Profile(BaseModel):
    id: uuid.UUID
    email: str
    name: str
    profile: dict[str, Any]
    mfa_enabled: bool
    last_login_at: datetime | None
    created_at: datetime
    organization: OrganizationRef | None
    role: Role
    organizations: list[Membership]


class ProfileUpdate(Strict):
    name: Name | None = None
    profile: JsonObject | None = Field(
        None, description="Free-form profile fields (avatar, timezone, locale…); 16 KiB at most."
    )


class PasswordChange(Strict):
    current_password: Annotated[Text, StringConstraints(max_length=128)]
    new_password: Password


class TokenValidation(BaseModel):
    valid: bool
    kind: str | None = None
    user_id: uuid.UUID | None = None
    api_key_id: uuid.UUID | None = None
    org_id: uuid.UUID | None = None
    role: Role | None = None
    permissions: list[str] = []
    expires_at: datetime | None = None
    error: str | None = None


class MfaEnrollment(BaseModel):
    secret: str
    otpauth_uri: str


class MfaCode(Strict):
    code: TotpCode


class InvitationAccept(Strict):
    token: Annotated[Text, StringConstraints(max_length=200)]


class Jwks(BaseModel):
    keys: list[dict[str, Any]]


# --- admin ------------------------------------------------------------------------------


class OrganizationSettings(Strict):
    timezone: Annotated[Text, StringConstraints(max_length=64)] = "UTC"
    language: Annotated[Text, StringConstraints(max_length=16)] = "en"
    date_format: Annotated[Text, StringConstraints(max_length=32)] = "YYYY-MM-DD"


class OrganizationRead(BaseModel):
    id: uuid.UUID
    name: str
    slug: str
    settings: dict[str, Any]
    branding: dict[str, Any]
    allowed_origins: list[str]
    features: dict[str, Any]
    quotas: dict[str, Any]
    tier: Tier
    is_active: bool
    created_at: datetime
    updated_at: datetime


class OrganizationUpdate(Strict):
    name: Name | None = None
    settings: OrganizationSettings | None = None
    branding: JsonObject | None = Field(None, description="Logo URL, colours…; 16 KiB at most.")
    allowed_origins: list[Origin] | None = Field(None, max_length=100)


class MemberRead(BaseModel):
    user_id: uuid.UUID
    email: str
    name: str
    role: Role
    joined_at: datetime


class MemberUpdate(Strict):
    role: OrgRole


class InvitationCreate(Strict):
    email: Email
    role: OrgRole = "VIEWER"


class InvitationRead(BaseModel):
    id: uuid.UUID
    email: str
    role: Role
    expires_at: datetime
    created_at: datetime
    accepted_at: datetime | None
    revoked_at: datetime | None


class InvitationCreated(BaseModel):
    id: uuid.UUID
    email: str
    role: Role
    expires_at: datetime
    token: str


class ApiKeyCreate(Strict):
    name: Name
    role: OrgRole | None = None
    permissions: list[Annotated[str, StringConstraints(max_length=64)]] | None = Field(
        None, max_length=100
    )
    expires_at: datetime | None = None

    @model_validator(mode="after")
    def _role_or_permissions(self) -> ApiKeyCreate:
        if self.role is not None and self.permissions is not None:
            raise ValueError("give a role or a list of permissions, not both")
        return self


class ApiKeyRead(BaseModel):
    id: uuid.UUID
    name: str
    prefix: str
    role: Role | None
    permissions: list[str]
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None


class ApiKeyCreated(BaseModel):
    id: uuid.UUID
    name: str
    prefix: str
    role: Role | None
    permissions: list[str]
    expires_at: datetime | None
    key: str


class SessionRead(BaseModel):
    id: uuid.UUID
    org_id: uuid.UUID | None
    ip: str | None
    user_agent: str | None
    created_at: datetime
    last_used_at: datetime | None
    expires_at: datetime
    current: bool
