"""Alerts (one row per firing episode, resolved in place) and per-organisation thresholds."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, Float, Index, String, UniqueConstraint, func, text
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from apix.infra.database import Base


class ApixAlert(Base):
    """An alert episode: inserted `firing`, updated to `resolved`; `org_id` NULL for the
    platform's own alerts (archive lag)."""

    __tablename__ = "apix_alert"
    __table_args__ = (
        Index("ix_apix_alert_org_id_fired_at", "org_id", "fired_at"),
        # At most one firing episode per (organisation, rule): transitions are de-duplicated
        # even if two nodes briefly evaluate at once.
        Index(
            "uq_apix_alert_firing",
            "org_id",
            "rule",
            unique=True,
            postgresql_where=text("state = 'firing'"),
            postgresql_nulls_not_distinct=True,
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    org_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    rule: Mapped[str] = mapped_column(String(64), nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False)
    value: Mapped[float] = mapped_column(Float, nullable=False)
    threshold: Mapped[float] = mapped_column(Float, nullable=False)
    details: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, default=dict)
    fired_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    resolved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    resolved_value: Mapped[float | None] = mapped_column(Float)


class ApixAlertThreshold(Base):
    """An organisation's override of one rule's platform default."""

    __tablename__ = "apix_alert_threshold"
    __table_args__ = (UniqueConstraint("org_id", "rule"),)

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    org_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), nullable=False)
    rule: Mapped[str] = mapped_column(String(64), nullable=False)
    threshold: Mapped[float | None] = mapped_column(Float)
    for_s: Mapped[float | None] = mapped_column(Float)
    enabled: Mapped[bool] = mapped_column(nullable=False, default=True)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), nullable=False
    )
