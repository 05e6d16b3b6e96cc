"""Tenant-scoped queries of providers: every one starts from `scoped(org_id)`."""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from sqlalchemy import Select, select

from apix.infra.database import UnitOfWork
from apix.providers.errors import ProviderNotFound
from apix.providers.models import Provider


def scoped(org_id: uuid.UUID) -> Select[Provider]:
    """Providers of ``org_id`` (row-level security enforces the same underneath)."""
    return select(Provider).where(Provider.org_id == org_id)


async def get(
    uow: UnitOfWork, org_id: uuid.UUID, provider_id: uuid.UUID, *, for_update: bool = False
) -> Provider:
    query = scoped(org_id).where(Provider.id == provider_id)
    if for_update:
        query = query.with_for_update()
    provider = await uow.session.scalar(query)
    if provider is None:
        raise ProviderNotFound
    return provider


async def all_of(uow: UnitOfWork, org_id: uuid.UUID) -> list[Provider]:
    rows = await uow.session.scalars(scoped(org_id).order_by(Provider.created_at, Provider.name))
    return list(rows)


async def by_ids(
    uow: UnitOfWork, org_id: uuid.UUID, ids: Iterable[uuid.UUID]
) -> dict[uuid.UUID, Provider]:
    wanted = list(ids)
    if not wanted:
        return {}
    rows = await uow.session.scalars(scoped(org_id).where(Provider.id.in_(wanted)))
    return {row.id: row for row in rows}


async def primary(uow: UnitOfWork, org_id: uuid.UUID) -> Provider | None:
    return await uow.session.scalar(scoped(org_id).where(Provider.is_primary.is_(True)))


async def name_taken(
    uow: UnitOfWork, org_id: uuid.UUID, name: str, *, other_than: uuid.UUID | None = None
) -> bool:
    query = scoped(org_id).where(Provider.name == name)
    if other_than is not None:
        query = query.where(Provider.id != other_than)
    return await uow.session.scalar(query.with_only_columns(Provider.id)) is not None
