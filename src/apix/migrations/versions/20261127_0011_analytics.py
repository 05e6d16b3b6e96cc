"""analytics roll-ups

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from apix.migrations.rls import disable_tenant_rls, enable_tenant_rls

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TABLES = ("analytics_event_minute", "analytics_api_minute")


def upgrade() -> None:
    op.create_table(
        "analytics_api_minute",
        sa.Column("org_id", sa.UUID(), nullable=False),
        sa.Column("minute", sa.DateTime(timezone=True), nullable=False),
        sa.Column("api_key_id", sa.UUID(), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organization.id"],
            name=op.f("fk_analytics_api_minute_org_id_organization"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "org_id", "minute", "api_key_id", name=op.f("pk_analytics_api_minute")
        ),
    )
    op.create_table(
        "analytics_event_minute",
        sa.Column("org_id", sa.UUID(), nullable=False),
        sa.Column("minute", sa.DateTime(timezone=True), nullable=False),
        sa.Column("namespace", sa.String(length=64), nullable=False),
        sa.Column("type", sa.String(length=100), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organization.id"],
            name=op.f("fk_analytics_event_minute_org_id_organization"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "org_id", "minute", "namespace", "type", name=op.f("pk_analytics_event_minute")
        ),
    )

    for table in _TABLES:
        enable_tenant_rls(table)


def downgrade() -> None:
    for table in _TABLES:
        disable_tenant_rls(table)
    op.drop_table("analytics_event_minute")
    op.drop_table("analytics_api_minute")
