"""baseline: the tenant helper every row-level security policy reads

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The tenant of the current transaction (set by `Database.transaction`), or NULL when
    # none is set: a policy `org_id = apix_current_org()` then matches no row at all.
    op.execute(
        """
        CREATE FUNCTION apix_current_org() RETURNS uuid
        LANGUAGE sql STABLE PARALLEL SAFE
        AS $$ SELECT NULLIF(current_setting('apix.org_id', true), '')::uuid $$
        """
    )


def downgrade() -> None:
    op.execute("DROP FUNCTION apix_current_org()")
