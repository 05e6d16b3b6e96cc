"""Provider tables: configured providers, per-organisation model prices, daily usage roll-ups.

All three are tenant tables (`org_id` + row-level security). Usage rows keep the provider's
id without a foreign key, so deleting a provider keeps its history.
"""

from __future__ import annotations

import uuid
from datetime import date, datetime
from decimal import Decimal

from sqlalchemy import (
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Float,
    Index,
    Integer,
    Numeric,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from apix.identity.models import org_fk
from apix.infra.database import Base


class Provider(Base):
    __tablename__ = "provider"
    __table_args__ = (
        UniqueConstraint("org_id", "name"),
        # At most one primary provider per organisation.
        Index(
            "uq_provider_org_id_primary",
            "org_id",
            unique=True,
            postgresql_where=text("is_primary"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    org_id: Mapped[uuid.UUID] = org_fk()
    name: Mapped[str] = mapped_column(String(100), nullable=False)
    kind: Mapped[str] = mapped_column(String(20), nullable=False)
    base_url: Mapped[str | None] = mapped_column(String(500))
    default_model: Mapped[str] = mapped_column(String(200), nullable=False)
    capabilities: Mapped[list[str]] = mapped_column(JSONB, nullable=False, default=list)
    timeout_s: Mapped[float] = mapped_column(Float, nullable=False)
    is_primary: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    fallback_ids: Mapped[list[uuid.UUID]] = mapped_column(
        ARRAY(UUID(as_uuid=True)), nullable=False, default=list
    )
    api_key_encrypted: Mapped[str | None] = mapped_column(Text)  # SecretBox("providers")
    api_key_last4: Mapped[str | None] = mapped_column(String(4))
    created_by: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), nullable=False
    )
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now(), nullable=False
    )


class ModelPrice(Base):
    """An organisation's own price for a model, overriding the settings' table."""

    __tablename__ = "model_price"
    __table_args__ = (UniqueConstraint("org_id", "model"),)

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    org_id: Mapped[uuid.UUID] = org_fk()
    model: Mapped[str] = mapped_column(String(200), nullable=False)
    input_per_mtok: Mapped[Decimal] = mapped_column(Numeric(14, 6), nullable=False)
    output_per_mtok: Mapped[Decimal] = mapped_column(Numeric(14, 6), nullable=False)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now(), nullable=False
    )


class ProviderUsage(Base):
    """Calls, tokens and cost of one (day, provider, agent, model) of an organisation."""

    __tablename__ = "provider_usage"
    __table_args__ = (
        # NULLS NOT DISTINCT: calls with no agent add up in one row per day and model.
        UniqueConstraint(
            "org_id",
            "day",
            "provider_id",
            "agent_id",
            "model",
            postgresql_nulls_not_distinct=True,
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    org_id: Mapped[uuid.UUID] = org_fk()
    day: Mapped[date] = mapped_column(Date, nullable=False)
    provider_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), nullable=False)
    agent_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    model: Mapped[str] = mapped_column(String(200), nullable=False)
    calls: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    failed_calls: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    input_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    output_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    cost_usd: Mapped[Decimal] = mapped_column(Numeric(20, 10), nullable=False, default=0)
