"""realtime connections and channels

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from apix.migrations.rls import disable_tenant_rls, enable_tenant_rls

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "apix_channel",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("org_id", sa.UUID(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("namespace", sa.String(length=64), nullable=False),
        sa.Column("permissions", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("subscriber_count", sa.Integer(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("last_active_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_apix_channel")),
        sa.UniqueConstraint("org_id", "name", name=op.f("uq_apix_channel_org_id_name")),
    )
    op.create_table(
        "apix_connection",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("org_id", sa.UUID(), nullable=False),
        sa.Column("user_id", sa.UUID(), nullable=True),
        sa.Column("api_key_id", sa.UUID(), nullable=True),
        sa.Column("client_type", sa.String(length=32), nullable=False),
        sa.Column("client_name", sa.String(length=100), nullable=True),
        sa.Column("client_version", sa.String(length=50), nullable=True),
        sa.Column("node", sa.String(length=100), nullable=False),
        sa.Column("channels", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("metadata", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("connected_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("disconnected_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("close_code", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_apix_connection")),
    )
    op.create_index(op.f("ix_apix_connection_org_id"), "apix_connection", ["org_id"], unique=False)

    op.create_index("ix_membership_org_id", "membership", ["org_id"])
    enable_tenant_rls("apix_connection")
    enable_tenant_rls("apix_channel")


def downgrade() -> None:
    disable_tenant_rls("apix_channel")
    disable_tenant_rls("apix_connection")
    op.drop_index("ix_membership_org_id", table_name="membership")
    op.drop_index(op.f("ix_apix_connection_org_id"), table_name="apix_connection")
    op.drop_table("apix_connection")
    op.drop_table("apix_channel")
