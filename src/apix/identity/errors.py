"""Errors of the identity domain (rendered by the one error handler)."""

from __future__ import annotations

from apix.core.errors import AppError, Conflict, Forbidden, NotFound, RateLimited, Unauthorized


class InvalidCredentials(Unauthorized):
    code = "invalid_credentials"
    message = "invalid email or password"


class MfaRequired(Unauthorized):
    code = "mfa_required"
    message = "a TOTP code is required for this account"


class InvalidMfaCode(Unauthorized):
    code = "invalid_mfa_code"
    message = "the TOTP code is not valid"


class InvalidToken(Unauthorized):
    code = "invalid_token"
    message = "the token is not valid"


class TokenExpired(Unauthorized):
    code = "token_expired"
    message = "the token has expired"


class OrganizationSuspended(Forbidden):
    code = "organization_suspended"
    message = "the organization is suspended"


class NoOrganization(Forbidden):
    code = "no_organization"
    message = "the account belongs to no active organization"


class TooManyAttempts(RateLimited):
    message = "too many failed login attempts; try again later"

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(
            details={"retry_after_s": retry_after_s}, headers={"Retry-After": str(retry_after_s)}
        )


class EmailTaken(Conflict):
    code = "email_taken"
    message = "an account with this email already exists"


class SlugTaken(Conflict):
    code = "slug_taken"
    message = "an organization with this slug already exists"


class InvitationInvalid(NotFound):
    code = "invitation_invalid"
    message = "the invitation does not exist, has expired or was already used"


class LastAdmin(Conflict):
    code = "last_admin"
    message = "an organization must keep at least one ORG_ADMIN"


class PermissionEscalation(Forbidden):
    code = "permission_escalation"
    message = "cannot grant more than you hold"


class AlreadyMember(Conflict):
    code = "already_member"
    message = "the user already belongs to this organization"


class MfaState(AppError):
    status_code = 409
    code = "mfa_state"
    message = "MFA is not in the state this operation needs"
