"""Provider configuration: create, read, update, delete (audited), connection tests, usage.

API keys are encrypted with the node's secret key before they reach the database and are
never returned, logged or audited: reads show `has_api_key` and, for long keys, the last
four characters.
"""

from __future__ import annotations

import time
import uuid
from datetime import date
from decimal import Decimal

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError

from apix.audit import service as audit
from apix.audit.service import RequestMeta
from apix.core.errors import Forbidden
from apix.identity.principal import Principal
from apix.infra.database import UnitOfWork
from apix.providers import repository, routing, usage
from apix.providers.adapters import adapter_for
from apix.providers.errors import (
    InvalidFallbackChain,
    PriceNotFound,
    ProviderCallError,
    ProviderNameTaken,
    ProviderUnavailable,
)
from apix.providers.models import ModelPrice, Provider
from apix.providers.runtime import ProvidersRuntime
from apix.providers.schemas import (
    CallError,
    CompletionRequest,
    CompletionResult,
    Hop,
    PriceRead,
    PriceSet,
    ProviderCreate,
    ProviderHealth,
    ProviderRead,
    ProviderTestRequest,
    ProviderTestResult,
    ProviderUpdate,
    TokenUsage,
    UsageDimension,
    UsageReport,
)
from apix.providers.types import (
    DEFAULT_BASE_URLS,
    ChatMessage,
    ChatRequest,
    Completed,
    StreamEnd,
    TextDelta,
    kind_of,
)

_LAST4_MIN_LENGTH = 16  # shorter keys show nothing of themselves


def _org_id(principal: Principal) -> uuid.UUID:
    if principal.org_id is None:
        raise Forbidden("this operation needs an organization")
    return principal.org_id


def _read(row: Provider, health: ProviderHealth) -> ProviderRead:
    kind = kind_of(row.kind)
    return ProviderRead(
        id=row.id,
        name=row.name,
        kind=kind,
        base_url=row.base_url,
        effective_base_url=row.base_url or DEFAULT_BASE_URLS[kind],
        default_model=row.default_model,
        capabilities=list(row.capabilities),
        timeout_s=row.timeout_s,
        is_primary=row.is_primary,
        fallback_ids=list(row.fallback_ids),
        has_api_key=row.api_key_encrypted is not None,
        api_key_last4=row.api_key_last4,
        health=health,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


async def _reads(
    rt: ProvidersRuntime, org_id: uuid.UUID, rows: list[Provider]
) -> list[ProviderRead]:
    healths = await rt.health.get(org_id, [row.id for row in rows])
    return [_read(row, health) for row, health in zip(rows, healths, strict=True)]


def _audit_fields(row: Provider) -> dict[str, object]:
    return {
        "name": row.name,
        "kind": row.kind,
        "base_url": row.base_url,
        "default_model": row.default_model,
        "capabilities": list(row.capabilities),
        "timeout_s": row.timeout_s,
        "is_primary": row.is_primary,
        "fallback_ids": [str(i) for i in row.fallback_ids],
        "has_api_key": row.api_key_encrypted is not None,
    }


def _set_key(rt: ProvidersRuntime, row: Provider, key: str | None) -> None:
    row.api_key_encrypted = rt.box.encrypt(key) if key else None
    row.api_key_last4 = key[-4:] if key and len(key) >= _LAST4_MIN_LENGTH else None


async def _check_chain(
    uow: UnitOfWork, org_id: uuid.UUID, provider_id: uuid.UUID, chain: list[uuid.UUID]
) -> None:
    """Same-organisation providers only, never the provider itself, and no cycle."""
    if provider_id in chain:
        raise InvalidFallbackChain("a provider cannot fall back to itself")
    everyone = {row.id: row for row in await repository.all_of(uow, org_id)}
    unknown = [str(i) for i in chain if i not in everyone]
    if unknown:
        raise InvalidFallbackChain("unknown providers in the chain", details={"unknown": unknown})
    # Following chains from the new entries must never lead back to this provider.
    seen: set[uuid.UUID] = set()
    pending = list(chain)
    while pending:
        current = pending.pop()
        if current == provider_id:
            raise InvalidFallbackChain("the fallback chain would form a cycle")
        if current in seen or current not in everyone:
            continue
        seen.add(current)
        pending.extend(everyone[current].fallback_ids)


async def _demote_primary(uow: UnitOfWork, org_id: uuid.UUID, keep: uuid.UUID) -> None:
    await uow.session.execute(
        update(Provider)
        .where(Provider.org_id == org_id, Provider.is_primary.is_(True), Provider.id != keep)
        .values(is_primary=False)
    )


# --- CRUD -------------------------------------------------------------------------------


async def create(
    rt: ProvidersRuntime, principal: Principal, data: ProviderCreate, meta: RequestMeta
) -> ProviderRead:
    org_id = _org_id(principal)
    try:
        async with rt.database.transaction(org_id) as uow:
            if await repository.name_taken(uow, org_id, data.name):
                raise ProviderNameTaken
            row = Provider(
                id=uuid.uuid4(),
                org_id=org_id,
                name=data.name,
                kind=data.kind,
                base_url=data.base_url,
                default_model=data.default_model,
                capabilities=list(data.capabilities),
                timeout_s=data.timeout_s,
                fallback_ids=list(data.fallback_ids),
                created_by=principal.actor_id,
            )
            await _check_chain(uow, org_id, row.id, row.fallback_ids)
            if data.is_primary is None:
                row.is_primary = await repository.primary(uow, org_id) is None
            else:
                row.is_primary = data.is_primary
            if row.is_primary:
                await _demote_primary(uow, org_id, row.id)
            _set_key(rt, row, data.api_key.get_secret_value() if data.api_key else None)
            uow.session.add(row)
            await uow.session.flush()
            await uow.session.refresh(row)
            await audit.record(
                uow,
                "provider.created",
                meta=meta,
                org_id=org_id,
                by=principal,
                target_type="provider",
                target_id=row.id,
                details=_audit_fields(row),
            )
    except IntegrityError as exc:
        # Two creations racing for one name (the unique constraint decides).
        raise ProviderNameTaken from exc
    return (await _reads(rt, org_id, [row]))[0]


async def list_providers(rt: ProvidersRuntime, principal: Principal) -> list[ProviderRead]:
    org_id = _org_id(principal)
    async with rt.database.transaction(org_id) as uow:
        rows = await repository.all_of(uow, org_id)
    return await _reads(rt, org_id, rows)


async def get(rt: ProvidersRuntime, principal: Principal, provider_id: uuid.UUID) -> ProviderRead:
    org_id = _org_id(principal)
    async with rt.database.transaction(org_id) as uow:
        row = await repository.get(uow, org_id, provider_id)
    return (await _reads(rt, org_id, [row]))[0]


async def update_provider(
    rt: ProvidersRuntime,
    principal: Principal,
    provider_id: uuid.UUID,
    data: ProviderUpdate,
    meta: RequestMeta,
) -> ProviderRead:
    org_id = _org_id(principal)
    changed = sorted(data.model_fields_set)
    try:
        async with rt.database.transaction(org_id) as uow:
            row = await repository.get(uow, org_id, provider_id, for_update=True)
            before = _audit_fields(row)
            if data.name is not None and data.name != row.name:
                if await repository.name_taken(uow, org_id, data.name, other_than=row.id):
                    raise ProviderNameTaken
                row.name = data.name
            if "base_url" in data.model_fields_set:
                row.base_url = data.base_url
            if data.default_model is not None:
                row.default_model = data.default_model
            if data.capabilities is not None:
                row.capabilities = list(data.capabilities)
            if data.timeout_s is not None:
                row.timeout_s = data.timeout_s
            if data.fallback_ids is not None:
                await _check_chain(uow, org_id, row.id, data.fallback_ids)
                row.fallback_ids = list(data.fallback_ids)
            if data.is_primary is not None:
                if data.is_primary:
                    await _demote_primary(uow, org_id, row.id)
                row.is_primary = data.is_primary
            if "api_key" in data.model_fields_set:
                _set_key(rt, row, data.api_key.get_secret_value() if data.api_key else None)
            await uow.session.flush()
            await uow.session.refresh(row)
            details: dict[str, object] = {
                "fields": changed,
                "changes": audit.changes(before, _audit_fields(row)),
            }
            if "api_key" in data.model_fields_set:
                details["api_key"] = "set" if data.api_key else "removed"
            await audit.record(
                uow,
                "provider.updated",
                meta=meta,
                org_id=org_id,
                by=principal,
                target_type="provider",
                target_id=row.id,
                details=details,
            )
    except IntegrityError as exc:
        raise ProviderNameTaken from exc
    return (await _reads(rt, org_id, [row]))[0]


async def delete_provider(
    rt: ProvidersRuntime, principal: Principal, provider_id: uuid.UUID, meta: RequestMeta
) -> None:
    org_id = _org_id(principal)
    async with rt.database.transaction(org_id) as uow:
        row = await repository.get(uow, org_id, provider_id, for_update=True)
        # Other providers stop falling back to it; its usage history stays.
        await uow.session.execute(
            update(Provider)
            .where(Provider.org_id == org_id, Provider.fallback_ids.contains([provider_id]))
            .values(fallback_ids=func.array_remove(Provider.fallback_ids, provider_id))
        )
        fields = _audit_fields(row)
        await uow.session.delete(row)
        await uow.session.flush()
        await audit.record(
            uow,
            "provider.deleted",
            meta=meta,
            org_id=org_id,
            by=principal,
            target_type="provider",
            target_id=provider_id,
            details=fields,
        )
        uow.after_commit(lambda: rt.health.forget(org_id, provider_id))


# --- calls ------------------------------------------------------------------------------


async def try_provider(
    rt: ProvidersRuntime, principal: Principal, provider_id: uuid.UUID, data: ProviderTestRequest
) -> ProviderTestResult:
    """One real call to this provider alone (no retry, no failover): latency and reply."""
    org_id = _org_id(principal)
    async with rt.database.transaction(org_id) as uow:
        row = await repository.get(uow, org_id, provider_id)
    model = data.model or row.default_model
    request = ChatRequest(
        messages=(ChatMessage("user", data.prompt),), model=model, max_tokens=data.max_tokens
    )
    try:
        config = rt.config(row)
    except ProviderCallError as exc:
        return ProviderTestResult(
            ok=False, provider_id=row.id, model=model, latency_ms=0.0, error=_call_error(exc)
        )
    adapter = await adapter_for(config)
    started = time.perf_counter()
    parts: list[str] = []
    first_token_ms: float | None = None
    end: StreamEnd | None = None
    try:
        async for chunk in adapter.stream(request):
            if isinstance(chunk, TextDelta):
                first_token_ms = first_token_ms or _since(started)
                parts.append(chunk.text)
            else:
                end = chunk
    except ProviderCallError as exc:
        latency = _since(started)
        await rt.health.record(config, latency_ms=latency, error=exc)
        await usage.record_call(
            rt.database,
            rt.settings,
            org_id,
            provider_id=row.id,
            agent_id=None,
            model=model,
            usage=None,
        )
        return ProviderTestResult(
            ok=False,
            provider_id=row.id,
            model=model,
            latency_ms=latency,
            error=_call_error(exc),
        )
    latency = _since(started)
    if end is None:  # pragma: no cover - adapters end every stream with StreamEnd
        raise ProviderUnavailable("the provider's stream ended early")
    await rt.health.record(config, latency_ms=first_token_ms or latency)
    await usage.record_call(
        rt.database,
        rt.settings,
        org_id,
        provider_id=row.id,
        agent_id=None,
        model=end.model,
        usage=end.usage,
    )
    return ProviderTestResult(
        ok=True,
        provider_id=row.id,
        model=end.model,
        latency_ms=latency,
        first_token_ms=first_token_ms,
        reply="".join(parts),
        usage=TokenUsage(
            input_tokens=end.usage.input_tokens, output_tokens=end.usage.output_tokens
        ),
    )


def _call_error(exc: ProviderCallError) -> CallError:
    return CallError(code=exc.code, message=exc.message, provider_status=exc.provider_status)


def _since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


async def complete(
    rt: ProvidersRuntime, principal: Principal, data: CompletionRequest
) -> CompletionResult:
    """A chat completion through the routing layer (retries, failover, metering)."""
    org_id = _org_id(principal)
    target: routing.Target
    if data.provider_id is not None:
        target = routing.ProviderTarget(data.provider_id, data.model)
    else:
        assert data.policy is not None  # noqa: S101 - the schema requires one of the two
        target = data.policy
    request = ChatRequest(
        messages=tuple(ChatMessage(m.role, m.content) for m in data.messages),
        model=data.model,
        max_tokens=data.max_tokens,
        temperature=data.temperature,
    )
    result = await routing.complete(rt, org_id, target, request)
    done: Completed = result.completed
    return CompletionResult(
        reply=result.text,
        provider_id=done.provider_id,
        provider_name=done.provider_name,
        model=done.model,
        usage=TokenUsage(
            input_tokens=done.usage.input_tokens, output_tokens=done.usage.output_tokens
        ),
        cost_usd=float(done.cost_usd),
        latency_ms=done.latency_ms,
        first_token_ms=done.first_token_ms,
        finish_reason=done.finish_reason,
        hops=[Hop.model_validate(h.model_dump()) for h in result.hops],
    )


# --- usage and prices -------------------------------------------------------------------


async def usage_report(
    rt: ProvidersRuntime,
    principal: Principal,
    *,
    since: date | None,
    until: date | None,
    group_by: list[UsageDimension],
    provider_id: uuid.UUID | None = None,
    agent_id: uuid.UUID | None = None,
    model: str | None = None,
) -> UsageReport:
    org_id = _org_id(principal)
    start, end = usage.date_range(since, until)
    async with rt.database.transaction(org_id) as uow:
        if provider_id is not None:
            await repository.get(uow, org_id, provider_id)
        return await usage.report(
            uow,
            org_id,
            since=start,
            until=end,
            group_by=group_by,
            provider_id=provider_id,
            agent_id=agent_id,
            model=model,
        )


async def list_prices(rt: ProvidersRuntime, principal: Principal) -> list[PriceRead]:
    org_id = _org_id(principal)
    async with rt.database.transaction(org_id) as uow:
        return await usage.prices(uow, org_id, rt.settings)


async def set_price(
    rt: ProvidersRuntime, principal: Principal, model: str, data: PriceSet, meta: RequestMeta
) -> PriceRead:
    org_id = _org_id(principal)
    async with rt.database.transaction(org_id) as uow:
        row = await uow.session.scalar(
            select(ModelPrice)
            .where(ModelPrice.org_id == org_id, ModelPrice.model == model)
            .with_for_update()
        )
        if row is None:
            row = ModelPrice(org_id=org_id, model=model)
            uow.session.add(row)
        row.input_per_mtok = Decimal(str(data.input_per_mtok))
        row.output_per_mtok = Decimal(str(data.output_per_mtok))
        await uow.session.flush()
        await audit.record(
            uow,
            "model_price.set",
            meta=meta,
            org_id=org_id,
            by=principal,
            target_type="model_price",
            target_id=model,
            details=data.model_dump(),
        )
    return PriceRead(
        model=model,
        input_per_mtok=data.input_per_mtok,
        output_per_mtok=data.output_per_mtok,
        source="organization",
    )


async def delete_price(
    rt: ProvidersRuntime, principal: Principal, model: str, meta: RequestMeta
) -> None:
    org_id = _org_id(principal)
    async with rt.database.transaction(org_id) as uow:
        deleted = await uow.session.execute(
            delete(ModelPrice)
            .where(ModelPrice.org_id == org_id, ModelPrice.model == model)
            .returning(ModelPrice.id)
        )
        if deleted.first() is None:
            raise PriceNotFound
        await audit.record(
            uow,
            "model_price.deleted",
            meta=meta,
            org_id=org_id,
            by=principal,
            target_type="model_price",
            target_id=model,
        )
