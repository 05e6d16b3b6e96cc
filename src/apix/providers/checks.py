"""Active health checks: a worker calls `check_all` periodically.

Each provider of each active organisation gets one cheap authenticated call (its model
list, which costs no tokens); the outcome moves its circuit like a real call (a success
closes an open circuit at once) without mixing into the call latencies.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

from sqlalchemy import select

from apix.core.logging import get_logger
from apix.identity.models import Organization
from apix.providers import repository
from apix.providers.adapters import adapter_for
from apix.providers.errors import ProviderCallError
from apix.providers.runtime import ProvidersRuntime
from apix.providers.schemas import ProviderHealth
from apix.providers.types import ProviderConfig

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class CheckResult:
    org_id: uuid.UUID
    provider_id: uuid.UUID
    ok: bool
    latency_ms: float
    error: str | None
    health: ProviderHealth


async def check_all(
    rt: ProvidersRuntime, *, org_ids: list[uuid.UUID] | None = None, concurrency: int = 8
) -> list[CheckResult]:
    """Check every provider (of ``org_ids``, or of every active organisation)."""
    if org_ids is None:
        async with rt.database.transaction() as uow:
            org_ids = list(
                await uow.session.scalars(
                    select(Organization.id).where(Organization.is_active.is_(True))
                )
            )
    configs: list[ProviderConfig] = []
    for org_id in org_ids:
        async with rt.database.transaction(org_id) as uow:
            rows = await repository.all_of(uow, org_id)
        for row in rows:
            try:
                configs.append(rt.config(row))
            except ProviderCallError:
                log.warning(
                    "provider key cannot be decrypted; not checked", provider_id=str(row.id)
                )
    gate = asyncio.Semaphore(concurrency)

    async def one(config: ProviderConfig) -> CheckResult:
        async with gate:
            return await check(rt, config)

    return list(await asyncio.gather(*(one(c) for c in configs)))


async def check(rt: ProvidersRuntime, config: ProviderConfig) -> CheckResult:
    adapter = await adapter_for(config)
    started = time.perf_counter()
    error: ProviderCallError | None = None
    try:
        await adapter.ping()
    except ProviderCallError as exc:
        error = exc
    latency_ms = round((time.perf_counter() - started) * 1000, 3)
    health = await rt.health.record_check(config, latency_ms=latency_ms, error=error)
    return CheckResult(
        org_id=config.org_id,
        provider_id=config.id,
        ok=error is None,
        latency_ms=latency_ms,
        error=None if error is None else error.code,
        health=health,
    )
