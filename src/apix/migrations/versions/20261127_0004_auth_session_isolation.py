"""auth sessions under row-level security; platform-wide list of revoked session ids

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from apix.migrations.rls import disable_tenant_rls, enable_tenant_rls

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# A session is its organisation's, and also its own user's (login, switching, "my
# sessions"); while a refresh token is redeemed, the one session it belongs to.
SESSION_POLICY = (
    "org_id IS NOT DISTINCT FROM apix_current_org()"
    " OR user_id = apix_current_user()"
    " OR id = NULLIF(current_setting('apix.session_id', true), '')::uuid"
)


def upgrade() -> None:
    op.create_table(
        "session_revocation",
        sa.Column("session_id", sa.UUID(), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("session_id", name=op.f("pk_session_revocation")),
    )
    op.create_index(op.f("ix_session_revocation_revoked_at"), "session_revocation", ["revoked_at"])
    op.execute(
        "INSERT INTO session_revocation (session_id, revoked_at) "
        "SELECT id, revoked_at FROM auth_session WHERE revoked_at IS NOT NULL"
    )
    enable_tenant_rls("auth_session", using=SESSION_POLICY, check=SESSION_POLICY)


def downgrade() -> None:
    disable_tenant_rls("auth_session")
    op.drop_index(op.f("ix_session_revocation_revoked_at"), table_name="session_revocation")
    op.drop_table("session_revocation")
