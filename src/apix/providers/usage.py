"""Usage metering: tokens and cost per call, rolled up per (org, day, provider, agent, model).

Cost comes from the organisation's own price for the model if it set one, else from the
settings' table; a price applies to a model named exactly or starting with its name (the
longest such entry wins, so `gpt-4o-mini` beats `gpt-4o` for `gpt-4o-mini-2024-07-18`).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.dialects.postgresql import insert

from apix.config import ProvidersSettings
from apix.core.errors import BadRequest
from apix.core.time import utcnow
from apix.infra.database import Database, UnitOfWork
from apix.providers.models import ModelPrice, Provider, ProviderUsage
from apix.providers.schemas import PriceRead, UsageDimension, UsageReport, UsageRow, UsageTotals
from apix.providers.types import Usage

_MILLION = Decimal(1_000_000)
MAX_RANGE_DAYS = 366
DEFAULT_RANGE_DAYS = 30


@dataclass(frozen=True, slots=True)
class Price:
    input_per_mtok: Decimal
    output_per_mtok: Decimal

    def cost(self, usage: Usage) -> Decimal:
        return (
            usage.input_tokens * self.input_per_mtok + usage.output_tokens * self.output_per_mtok
        ) / _MILLION


def _match(table: dict[str, Price], model: str) -> Price | None:
    if model in table:
        return table[model]
    prefixes = [name for name in table if model.startswith(name)]
    return table[max(prefixes, key=len)] if prefixes else None


def _settings_table(settings: ProvidersSettings) -> dict[str, Price]:
    return {
        model: Price(Decimal(str(p.input_per_mtok)), Decimal(str(p.output_per_mtok)))
        for model, p in settings.prices.items()
    }


async def _org_table(uow: UnitOfWork, org_id: uuid.UUID) -> dict[str, Price]:
    rows = await uow.session.scalars(select(ModelPrice).where(ModelPrice.org_id == org_id))
    return {row.model: Price(row.input_per_mtok, row.output_per_mtok) for row in rows}


async def price_for(
    uow: UnitOfWork, org_id: uuid.UUID, model: str, settings: ProvidersSettings
) -> Price | None:
    return _match(await _org_table(uow, org_id), model) or _match(_settings_table(settings), model)


async def record_call(
    database: Database,
    settings: ProvidersSettings,
    org_id: uuid.UUID,
    *,
    provider_id: uuid.UUID,
    agent_id: uuid.UUID | None,
    model: str,
    usage: Usage | None,
) -> Decimal:
    """Add one call (``usage`` None: a failed call) to today's row; return its cost."""
    async with database.transaction(org_id) as uow:
        cost = Decimal(0)
        if usage is not None:
            price = await price_for(uow, org_id, model, settings)
            cost = price.cost(usage) if price else Decimal(0)
        values: dict[str, Any] = {
            "org_id": org_id,
            "day": utcnow().date(),
            "provider_id": provider_id,
            "agent_id": agent_id,
            "model": model[:200],
            "calls": 0 if usage is None else 1,
            "failed_calls": 1 if usage is None else 0,
            "input_tokens": usage.input_tokens if usage else 0,
            "output_tokens": usage.output_tokens if usage else 0,
            "cost_usd": cost,
        }
        statement = insert(ProviderUsage).values(id=uuid.uuid4(), **values)
        table = ProviderUsage.__table__.c
        await uow.session.execute(
            statement.on_conflict_do_update(
                constraint="uq_provider_usage_org_id_day_provider_id_agent_id_model",
                set_={
                    name: table[name] + statement.excluded[name]
                    for name in (
                        "calls",
                        "failed_calls",
                        "input_tokens",
                        "output_tokens",
                        "cost_usd",
                    )
                },
            )
        )
    return cost


def date_range(since: date | None, until: date | None) -> tuple[date, date]:
    until = until or utcnow().date()
    since = since or until - timedelta(days=DEFAULT_RANGE_DAYS - 1)
    if since > until:
        raise BadRequest("`since` is after `until`")
    if (until - since).days >= MAX_RANGE_DAYS:
        raise BadRequest(f"a usage report covers at most {MAX_RANGE_DAYS} days")
    return since, until


_DIMENSIONS: dict[UsageDimension, tuple[str, ...]] = {
    "day": ("day",),
    "provider": ("provider_id",),
    "agent": ("agent_id",),
    "model": ("model",),
}


async def report(
    uow: UnitOfWork,
    org_id: uuid.UUID,
    *,
    since: date,
    until: date,
    group_by: list[UsageDimension],
    provider_id: uuid.UUID | None = None,
    agent_id: uuid.UUID | None = None,
    model: str | None = None,
) -> UsageReport:
    usage = ProviderUsage
    filters: list[ColumnElement[bool]] = [
        usage.org_id == org_id,
        usage.day >= since,
        usage.day <= until,
    ]
    if provider_id is not None:
        filters.append(usage.provider_id == provider_id)
    if agent_id is not None:
        filters.append(usage.agent_id == agent_id)
    if model is not None:
        filters.append(usage.model == model)
    dimensions = list(dict.fromkeys(group_by))
    keys = [getattr(usage, column) for d in dimensions for column in _DIMENSIONS[d]]
    sums = [
        func.coalesce(func.sum(usage.calls), 0).label("calls"),
        func.coalesce(func.sum(usage.failed_calls), 0).label("failed_calls"),
        func.coalesce(func.sum(usage.input_tokens), 0).label("input_tokens"),
        func.coalesce(func.sum(usage.output_tokens), 0).label("output_tokens"),
        func.coalesce(func.sum(usage.cost_usd), 0).label("cost_usd"),
    ]
    query = select(*keys, *sums).where(*filters)
    if keys:
        query = query.group_by(*keys).order_by(*keys)
    rows = (await uow.session.execute(query)).mappings().all()
    names: dict[uuid.UUID, str] = {}
    if "provider" in dimensions:
        found = await uow.session.execute(
            select(Provider.id, Provider.name).where(Provider.org_id == org_id)
        )
        names = {row.id: row.name for row in found}
    out = [
        UsageRow(
            day=row.get("day"),
            provider_id=row.get("provider_id"),
            provider_name=names.get(row["provider_id"]) if "provider_id" in row else None,
            agent_id=row.get("agent_id"),
            model=row.get("model"),
            calls=int(row["calls"]),
            failed_calls=int(row["failed_calls"]),
            input_tokens=int(row["input_tokens"]),
            output_tokens=int(row["output_tokens"]),
            cost_usd=float(row["cost_usd"]),
        )
        for row in rows
        if keys or row["calls"] or row["failed_calls"]
    ]
    totals = UsageTotals(
        calls=sum(r.calls for r in out),
        failed_calls=sum(r.failed_calls for r in out),
        input_tokens=sum(r.input_tokens for r in out),
        output_tokens=sum(r.output_tokens for r in out),
        cost_usd=float(sum(Decimal(str(r["cost_usd"])) for r in rows)),
    )
    return UsageReport(since=since, until=until, group_by=dimensions, rows=out, totals=totals)


async def prices(
    uow: UnitOfWork, org_id: uuid.UUID, settings: ProvidersSettings
) -> list[PriceRead]:
    merged: dict[str, PriceRead] = {
        model: PriceRead(
            model=model,
            input_per_mtok=float(p.input_per_mtok),
            output_per_mtok=float(p.output_per_mtok),
            source="settings",
        )
        for model, p in _settings_table(settings).items()
    }
    for model, p in (await _org_table(uow, org_id)).items():
        merged[model] = PriceRead(
            model=model,
            input_per_mtok=float(p.input_per_mtok),
            output_per_mtok=float(p.output_per_mtok),
            source="organization",
        )
    return [merged[m] for m in sorted(merged)]
