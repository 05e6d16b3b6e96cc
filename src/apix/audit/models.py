"""The append-only audit log (the application role may insert and select, never change).

Each organisation's rows (and the platform's, `org_id` NULL) form a hash chain by `seq`,
linked by a trigger on insert (migration 0007; `apix.audit.chain` recomputes it).
`AuditSetting` holds an organisation's retention override.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    FetchedValue,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from apix.infra.database import Base


class AuditLog(Base):
    __tablename__ = "audit_log"
    __table_args__ = (
        Index("ix_audit_log_org_id_created_at", "org_id", "created_at"),
        Index("ix_audit_log_org_id_actor_user_id", "org_id", "actor_user_id"),
        UniqueConstraint("org_id", "seq", postgresql_nulls_not_distinct=True),
    )
    # The insert returns what the trigger set, so a recorded row can be shown at once.
    __mapper_args__ = {"eager_defaults": True}  # noqa: RUF012 - SQLAlchemy's own convention

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    # NULL for platform-level events with no organisation (e.g. a failed login for an
    # unknown email); those rows are visible to no tenant.
    org_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    # Position in the organisation's chain, the previous row's hash and this row's hash: all
    # three (and `created_at`) are set by the insert trigger, whatever the insert says.
    seq: Mapped[int] = mapped_column(BigInteger, FetchedValue(), nullable=False)
    prev_hash: Mapped[str] = mapped_column(String(64), FetchedValue(), nullable=False)
    hash: Mapped[str] = mapped_column(String(64), FetchedValue(), nullable=False)
    actor_user_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    actor_api_key_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    action: Mapped[str] = mapped_column(String(100), nullable=False)
    target_type: Mapped[str | None] = mapped_column(String(50))
    target_id: Mapped[str | None] = mapped_column(String(100))
    outcome: Mapped[str] = mapped_column(String(20), nullable=False, default="success")
    # `app` (recorded by APIX itself), `integration` (POST /audit/log-event) or `system`.
    source: Mapped[str] = mapped_column(String(20), nullable=False, server_default="app")
    ip: Mapped[str | None] = mapped_column(String(64))
    user_agent: Mapped[str | None] = mapped_column(String(512))
    request_id: Mapped[str | None] = mapped_column(String(128))
    details: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, default=dict)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), nullable=False
    )


class AuditSetting(Base):
    """An organisation's audit retention, overriding the platform default."""

    __tablename__ = "audit_setting"
    __table_args__ = (CheckConstraint("retention_days >= 1", name="retention_days"),)

    org_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("organization.id", ondelete="CASCADE"), primary_key=True
    )
    retention_days: Mapped[int] = mapped_column(Integer, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), nullable=False
    )
