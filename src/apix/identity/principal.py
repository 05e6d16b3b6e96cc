"""Who is calling: resolved once per request, passed to every service function."""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass

from apix.identity.permissions import Role


class PrincipalKind(enum.StrEnum):
    USER = "user"
    API_KEY = "api_key"
    WIDGET = "widget"


@dataclass(frozen=True, slots=True)
class Principal:
    kind: PrincipalKind
    org_id: uuid.UUID | None
    role: Role
    permissions: frozenset[str]
    user_id: uuid.UUID | None = None
    api_key_id: uuid.UUID | None = None
    session_id: uuid.UUID | None = None
    token_expires_at: int | None = None  # epoch ms, for tokens that expire

    def can(self, permission: str) -> bool:
        return permission in self.permissions

    @property
    def is_super_admin(self) -> bool:
        return self.role is Role.SUPER_ADMIN

    @property
    def actor_id(self) -> uuid.UUID | None:
        return self.user_id or self.api_key_id
