"""monitoring: alert episodes (platform rows with org_id NULL) and per-organisation thresholds

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from apix.migrations.rls import disable_tenant_rls, enable_tenant_rls

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Platform alerts (org_id NULL) are read and written with no tenant set, like audit_log.
_PLATFORM = "org_id IS NOT DISTINCT FROM apix_current_org()"


def upgrade() -> None:
    op.create_table(
        "apix_alert",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("org_id", sa.UUID(), nullable=True),
        sa.Column("rule", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("details", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("fired_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("resolved_value", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_apix_alert")),
    )
    op.create_index("ix_apix_alert_org_id_fired_at", "apix_alert", ["org_id", "fired_at"])
    op.execute(
        "CREATE UNIQUE INDEX uq_apix_alert_firing ON apix_alert (org_id, rule) "
        "NULLS NOT DISTINCT WHERE state = 'firing'"
    )
    enable_tenant_rls("apix_alert", using=_PLATFORM, check=_PLATFORM)
    op.create_table(
        "apix_alert_threshold",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("org_id", sa.UUID(), nullable=False),
        sa.Column("rule", sa.String(length=64), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=True),
        sa.Column("for_s", sa.Float(), nullable=True),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_apix_alert_threshold")),
        sa.UniqueConstraint("org_id", "rule", name=op.f("uq_apix_alert_threshold_org_id_rule")),
    )
    enable_tenant_rls("apix_alert_threshold")


def downgrade() -> None:
    disable_tenant_rls("apix_alert_threshold")
    op.drop_table("apix_alert_threshold")
    disable_tenant_rls("apix_alert")
    op.execute("DROP INDEX IF EXISTS uq_apix_alert_firing")
    op.drop_index("ix_apix_alert_org_id_fired_at", table_name="apix_alert")
    op.drop_table("apix_alert")
