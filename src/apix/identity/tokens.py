"""Access tokens: RS256 JWTs with pinned algorithm, required claims and `kid` lookup."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import jwt

from apix.config import AuthSettings
from apix.identity.keys import KeyRing
from apix.identity.permissions import Role

ALGORITHM = "RS256"
_REQUIRED = ["sub", "org", "role", "sid", "jti", "iat", "nbf", "exp", "iss", "aud"]


class TokenError(Exception):
    def __init__(self, message: str, *, expired: bool = False) -> None:
        super().__init__(message)
        self.expired = expired


@dataclass(frozen=True, slots=True)
class AccessClaims:
    user_id: uuid.UUID
    org_id: uuid.UUID | None
    role: Role
    session_id: uuid.UUID
    token_id: str
    expires_at: int  # epoch seconds


def issue(
    keyring: KeyRing,
    settings: AuthSettings,
    *,
    user_id: uuid.UUID,
    org_id: uuid.UUID | None,
    role: Role,
    session_id: uuid.UUID,
) -> tuple[str, int]:
    """A signed access token and its expiry (epoch seconds)."""
    now = int(time.time())
    expires = now + settings.access_ttl_s
    claims = {
        "sub": str(user_id),
        # "" for a platform operator outside any organisation: `require` rejects null claims.
        "org": str(org_id) if org_id else "",
        "role": role.value,
        "sid": str(session_id),
        "jti": uuid.uuid4().hex,
        "iat": now,
        "nbf": now,
        "exp": expires,
        "iss": settings.issuer,
        "aud": settings.audience,
    }
    key = keyring.current
    token = jwt.encode(claims, key.private_key, algorithm=ALGORITHM, headers={"kid": key.kid})
    return token, expires


# Clock skew tolerated on `exp` (and `iat`/`nbf`) between nodes.
LEEWAY_S = 5


def verify(keyring: KeyRing, settings: AuthSettings, token: str) -> AccessClaims:
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise TokenError("malformed token") from exc
    if header.get("alg") != ALGORITHM:
        raise TokenError("unsupported token algorithm")
    kid = header.get("kid")
    key = keyring.get(kid) if isinstance(kid, str) else None
    if key is None:
        raise TokenError("unknown signing key")
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key.public_key,
            algorithms=[ALGORITHM],
            audience=settings.audience,
            issuer=settings.issuer,
            options={"require": _REQUIRED},
            leeway=LEEWAY_S,
        )
    except jwt.ExpiredSignatureError as exc:
        raise TokenError("token expired", expired=True) from exc
    except jwt.PyJWTError as exc:
        raise TokenError(f"invalid token: {exc}") from exc
    try:
        return AccessClaims(
            user_id=uuid.UUID(claims["sub"]),
            org_id=uuid.UUID(claims["org"]) if claims["org"] else None,
            role=Role(claims["role"]),
            session_id=uuid.UUID(claims["sid"]),
            token_id=str(claims["jti"]),
            expires_at=int(claims["exp"]),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        # A correctly signed token with claims of the wrong shape is still just invalid.
        raise TokenError("invalid token claims") from exc
