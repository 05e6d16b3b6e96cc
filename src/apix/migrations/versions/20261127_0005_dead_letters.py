"""dead letters: events an acknowledging subscriber never acknowledged

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from apix.migrations.rls import disable_tenant_rls, enable_tenant_rls

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "apix_dead_letter",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("org_id", sa.UUID(), nullable=False),
        sa.Column("channel", sa.String(length=200), nullable=False),
        sa.Column("offset", sa.String(length=48), nullable=False),
        sa.Column("epoch", sa.String(length=64), nullable=False),
        sa.Column("event_id", sa.String(length=64), nullable=False),
        sa.Column("type", sa.String(length=100), nullable=False),
        sa.Column("event", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("connection_id", sa.String(length=64), nullable=True),
        sa.Column("user_id", sa.UUID(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("failed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_apix_dead_letter")),
    )
    op.create_index(
        "ix_apix_dead_letter_org_id_failed_at", "apix_dead_letter", ["org_id", "failed_at"]
    )
    enable_tenant_rls("apix_dead_letter")


def downgrade() -> None:
    disable_tenant_rls("apix_dead_letter")
    op.drop_index("ix_apix_dead_letter_org_id_failed_at", table_name="apix_dead_letter")
    op.drop_table("apix_dead_letter")
