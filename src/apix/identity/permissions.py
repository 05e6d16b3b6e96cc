"""Roles and the permissions granted to them: the one table in code.

Later modules add their permissions with `grant`. `docs/permissions.md` shows the matrix
and a test checks that it matches `ROLE_PERMISSIONS`.
"""

from __future__ import annotations

import enum


class Role(enum.StrEnum):
    SUPER_ADMIN = "SUPER_ADMIN"
    ORG_ADMIN = "ORG_ADMIN"
    DEVELOPER = "DEVELOPER"
    VIEWER = "VIEWER"

    @property
    def rank(self) -> int:
        return _RANK[self]

    def at_least(self, other: Role) -> bool:
        return self.rank >= other.rank


_RANK = {Role.VIEWER: 1, Role.DEVELOPER: 2, Role.ORG_ADMIN: 3, Role.SUPER_ADMIN: 4}

# Roles an organisation can hand out (SUPER_ADMIN is a platform flag, never a membership).
ORG_ROLES = (Role.ORG_ADMIN, Role.DEVELOPER, Role.VIEWER)

# The lowest role holding each permission; every higher role holds it too.
_MINIMUM_ROLE: dict[str, Role] = {}
ROLE_PERMISSIONS: dict[Role, frozenset[str]] = {}


def grant(minimum: Role, *permissions: str) -> None:
    """Give ``permissions`` to ``minimum`` and every role above it."""
    for permission in permissions:
        resource, _, action = permission.partition(":")
        if not resource or not action:
            raise ValueError(f"permission {permission!r} is not resource:action")
        _MINIMUM_ROLE[permission] = minimum
    ROLE_PERMISSIONS.clear()
    for role in Role:
        ROLE_PERMISSIONS[role] = frozenset(p for p, m in _MINIMUM_ROLE.items() if role.at_least(m))


def all_permissions() -> list[str]:
    return sorted(_MINIMUM_ROLE)


grant(Role.VIEWER, "organization:read", "members:read", "apix:subscribe", "agents:read")
grant(
    Role.DEVELOPER,
    "api_keys:read",
    "apix:publish",
    "apix:history",
    "agents:write",
)
grant(
    Role.ORG_ADMIN,
    "organization:write",
    "members:write",
    "invitations:read",
    "invitations:write",
    "api_keys:write",
    "sessions:admin",
    "audit:read",
    "apix:admin",
)
# AI providers: developers read them (never their keys) and call them; admins manage them.
grant(Role.DEVELOPER, "providers:read", "providers:use")
grant(Role.ORG_ADMIN, "providers:write")
# Usage analytics: organisation admins.
grant(Role.ORG_ADMIN, "analytics:read")
grant(Role.SUPER_ADMIN, "platform:organizations", "platform:admin")
