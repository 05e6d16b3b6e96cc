"""Routing: which providers a call goes to, in what order, with retries and failover.

This is the interface agents and runs call::

    async for chunk in routing.stream(rt, org_id, target, request, agent_id=..., on_fallback=...):
        ...  # TextDelta (in order), Reset (start the answer over), then one Completed

A target names a provider (`ProviderTarget`) or a policy: `primary` (the organisation's
primary provider alone), `fallback` (the primary, then its fallback chain) or
`lowest_latency` (every chat provider, fastest first by measured median time to first
token). A named provider is followed by its own fallback chain. On each provider a
retryable error (timeout, 429, 5xx, connection) is retried with exponential backoff and
jitter (tenacity); when the attempts are spent, or the provider refused the credentials, the
call fails over to the next candidate, reporting the hop as `provider.fallback`. A provider
whose circuit is open is skipped. A bad request is the request's fault: it is raised as is.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Literal

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from apix.core.logging import get_logger
from apix.infra.database import UnitOfWork
from apix.providers import repository, usage
from apix.providers.adapters import Adapter, adapter_for
from apix.providers.errors import (
    NoPrimaryProvider,
    NoProviderAvailable,
    ProviderAuthError,
    ProviderCallError,
    ProviderUnavailable,
)
from apix.providers.events import ProviderFallback
from apix.providers.models import Provider
from apix.providers.runtime import ProvidersRuntime
from apix.providers.schemas import ProviderHealth
from apix.providers.types import (
    AdapterChunk,
    ChatRequest,
    Chunk,
    Completed,
    ProviderConfig,
    Reset,
    StreamEnd,
    TextDelta,
    Usage,
)

__all__ = [
    "Completion",
    "OnFallback",
    "Policy",
    "ProviderTarget",
    "Target",
    "complete",
    "route",
    "stream",
]

log = get_logger(__name__)

Policy = Literal["primary", "lowest_latency", "fallback"]
OnFallback = Callable[[ProviderFallback], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class ProviderTarget:
    """A provider named by an agent; ``model`` None means the provider's default model."""

    provider_id: uuid.UUID
    model: str | None = None


Target = ProviderTarget | Policy


@dataclass(frozen=True, slots=True)
class Candidate:
    config: ProviderConfig
    model: str
    # Why it cannot be called at all (its stored key cannot be decrypted), if so.
    unusable: ProviderCallError | None = None


def _candidate(rt: ProvidersRuntime, row: Provider, model: str | None) -> Candidate:
    try:
        config = rt.config(row)
    except ProviderCallError as exc:
        config = rt.config(row, with_key=False)
        return Candidate(config, model or config.default_model, unusable=exc)
    return Candidate(config, model or config.default_model)


async def route(
    rt: ProvidersRuntime,
    org_id: uuid.UUID,
    target: Target,
    *,
    model: str | None = None,
    capability: str = "chat",
) -> list[Candidate]:
    """The providers to try, in order, each with the model to ask it for.

    ``model`` (or `ProviderTarget.model`) applies to the first provider of a named target or
    of the `primary`/`fallback` policies; failover hops and `lowest_latency` use each
    provider's default model, since model names belong to one provider.
    """
    async with rt.database.transaction(org_id) as uow:
        if isinstance(target, ProviderTarget):
            first = await repository.get(uow, org_id, target.provider_id)
            model = target.model or model
            chain = await _chain(uow, org_id, first.fallback_ids)
            rows = [first, *chain]
        elif target == "lowest_latency":
            rows = await repository.all_of(uow, org_id)
            model = None
        else:
            primary = await repository.primary(uow, org_id)
            if primary is None:
                raise NoPrimaryProvider
            rows = [primary]
            if target == "fallback":
                rows += await _chain(uow, org_id, primary.fallback_ids)
        usable = [row for row in rows if capability in row.capabilities]
        candidates = [
            _candidate(rt, row, model if i == 0 else None) for i, row in enumerate(usable)
        ]
    if target == "lowest_latency":
        candidates = await _by_latency(rt, org_id, candidates)
    return candidates


async def _chain(uow: UnitOfWork, org_id: uuid.UUID, ids: list[uuid.UUID]) -> list[Provider]:
    found = await repository.by_ids(uow, org_id, ids)
    # In the chain's order; a provider deleted since is left out.
    return [found[i] for i in ids if i in found]


async def _by_latency(
    rt: ProvidersRuntime, org_id: uuid.UUID, candidates: list[Candidate]
) -> list[Candidate]:
    healths = await rt.health.get(org_id, [c.config.id for c in candidates])

    def key(pair: tuple[Candidate, ProviderHealth]) -> tuple[int, float]:
        health = pair[1]
        if health.circuit != "closed":
            return 2, 0.0
        if health.latency_ms.p50 is not None:
            return 0, health.latency_ms.p50
        # Not measured yet: after the measured ones, by its last check if any.
        return 1, health.check_latency_ms or float("inf")

    return [c for c, _ in sorted(zip(candidates, healths, strict=True), key=key)]


@dataclass
class _Attempt:
    """One provider's turn: the attempts made, and whether it answered in part."""

    candidate: Candidate
    attempts: int = 0
    emitted: bool = False


async def stream(
    rt: ProvidersRuntime,
    org_id: uuid.UUID,
    target: Target,
    request: ChatRequest,
    *,
    agent_id: uuid.UUID | None = None,
    on_fallback: OnFallback | None = None,
    capability: str = "chat",
) -> AsyncIterator[Chunk]:
    """Stream a chat completion through the routed providers.

    Yields `TextDelta`s in order; a `Reset` when a provider failed after answering in part
    (what came before it is to be discarded: the next provider starts over); and one final
    `Completed` with usage and cost, already metered. Raises `NoProviderAvailable` (details:
    the hops) when every candidate failed or was skipped, `ProviderBadRequest` at once.
    """
    candidates = await route(rt, org_id, target, model=request.model, capability=capability)
    if not candidates:
        raise NoProviderAvailable(f"no provider of this organization offers {capability!r}")
    hops: list[ProviderFallback] = []
    last_error: ProviderCallError | None = None

    async def report(hop: ProviderFallback) -> None:
        hops.append(hop)
        log.warning(
            "provider skipped or failed; failing over",
            provider_id=str(hop.from_provider_id),
            org_id=str(org_id),
            reason=hop.reason,
            to=str(hop.to_provider_id) if hop.to_provider_id else None,
        )
        if on_fallback is not None:
            await on_fallback(hop)

    for index, candidate in enumerate(candidates):
        following = candidates[index + 1] if index + 1 < len(candidates) else None
        if candidate.unusable is not None:
            last_error = candidate.unusable
            await report(_hop(candidate, following, last_error.code, last_error.message, 0))
            continue
        admission = await rt.health.admit(candidate.config)
        if not admission.allowed:
            await report(
                _hop(candidate, following, "circuit_open", "the provider's circuit is open", 0)
            )
            continue
        turn = _Attempt(candidate)
        try:
            async for chunk in _on_provider(
                rt, turn, replace(request, model=candidate.model), agent_id, probe=admission.probe
            ):
                yield chunk
            return
        except ProviderCallError as exc:
            if not exc.retryable and not isinstance(exc, ProviderAuthError):
                raise
            last_error = exc
            if turn.emitted:
                yield Reset(candidate.config.id, exc.code)
            await report(
                _hop(candidate, following, exc.code, exc.message, turn.attempts, turn.emitted)
            )
    raise NoProviderAvailable(
        last_error.message if last_error else "every provider's circuit is open",
        details={"hops": [h.model_dump(mode="json") for h in hops]},
    ) from last_error


def _hop(
    candidate: Candidate,
    following: Candidate | None,
    reason: str,
    message: str,
    attempts: int,
    restarted: bool = False,
) -> ProviderFallback:
    return ProviderFallback(
        from_provider_id=candidate.config.id,
        from_provider_name=candidate.config.name,
        to_provider_id=following.config.id if following else None,
        to_provider_name=following.config.name if following else None,
        reason=reason,
        message=message,
        attempts=attempts,
        restarted=restarted,
    )


async def _on_provider(
    rt: ProvidersRuntime,
    turn: _Attempt,
    request: ChatRequest,
    agent_id: uuid.UUID | None,
    *,
    probe: bool,
) -> AsyncIterator[Chunk]:
    """One provider: open its stream with retries, then relay it to the end."""
    config = turn.candidate.config
    settings = rt.settings
    circuit_opened = False

    def worth_retrying(exc: BaseException) -> bool:
        return isinstance(exc, ProviderCallError) and exc.retryable and not circuit_opened

    def count(state: RetryCallState) -> None:
        turn.attempts = state.attempt_number

    retrying = AsyncRetrying(
        # A half-open probe is a single call: its outcome decides the circuit.
        stop=stop_after_attempt(1 if probe else settings.retry_attempts),
        # initial * 2^(n-1), capped, plus up to `initial` of jitter.
        wait=wait_exponential(multiplier=settings.retry_initial_s, max=settings.retry_max_s)
        + wait_random(0, settings.retry_initial_s),
        retry=retry_if_exception(worth_retrying),
        before=count,
        reraise=True,
    )
    opened: _Opened | None = None
    adapter = await adapter_for(config)
    async for attempt in retrying:
        with attempt:
            started = time.perf_counter()
            try:
                opened = await _open(adapter, request, started)
            except ProviderCallError as exc:
                health = await _failed(rt, config, request, agent_id, exc, started)
                circuit_opened = health.circuit != "closed"
                raise
    if opened is None:  # pragma: no cover - tenacity returns or raises
        raise NoProviderAvailable
    async for chunk in _relay(rt, turn, opened, request, agent_id):
        yield chunk


@dataclass
class _Opened:
    chunks: AsyncGenerator[AdapterChunk, None]
    first: AdapterChunk
    started: float


async def _open(adapter: Adapter, request: ChatRequest, started: float) -> _Opened:
    """Start the provider's stream and wait for its first chunk (where most failures show)."""
    chunks = adapter.stream(request)
    try:
        first = await anext(chunks)
    except StopAsyncIteration:
        raise ProviderUnavailable("the provider's stream ended before it began") from None
    except BaseException:
        await chunks.aclose()
        raise
    return _Opened(chunks, first, started)


async def _relay(
    rt: ProvidersRuntime,
    turn: _Attempt,
    opened: _Opened,
    request: ChatRequest,
    agent_id: uuid.UUID | None,
) -> AsyncIterator[Chunk]:
    config = turn.candidate.config
    first_token_ms: float | None = None
    chunk = opened.first
    try:
        while not isinstance(chunk, StreamEnd):
            if first_token_ms is None:
                first_token_ms = _since(opened.started)
            turn.emitted = True
            yield chunk
            try:
                chunk = await anext(opened.chunks)
            except StopAsyncIteration:
                raise ProviderUnavailable("the provider's stream ended early") from None
    except ProviderCallError as exc:
        await _failed(rt, config, request, agent_id, exc, opened.started)
        raise
    finally:
        await opened.chunks.aclose()
    latency_ms = _since(opened.started)
    await rt.health.record(config, latency_ms=first_token_ms or latency_ms)
    cost = await _meter(rt, config, chunk.model, agent_id, chunk.usage)
    yield Completed(
        provider_id=config.id,
        provider_name=config.name,
        model=chunk.model,
        usage=chunk.usage,
        cost_usd=cost,
        latency_ms=latency_ms,
        first_token_ms=first_token_ms,
        finish_reason=chunk.finish_reason,
    )


async def _failed(
    rt: ProvidersRuntime,
    config: ProviderConfig,
    request: ChatRequest,
    agent_id: uuid.UUID | None,
    error: ProviderCallError,
    started: float,
) -> ProviderHealth:
    health = await rt.health.record(config, latency_ms=_since(started), error=error)
    await _meter(rt, config, request.model or config.default_model, agent_id, None)
    return health


async def _meter(
    rt: ProvidersRuntime,
    config: ProviderConfig,
    model: str,
    agent_id: uuid.UUID | None,
    used: Usage | None,
) -> Decimal:
    try:
        return await usage.record_call(
            rt.database,
            rt.settings,
            config.org_id,
            provider_id=config.id,
            agent_id=agent_id,
            model=model,
            usage=used,
        )
    except Exception:
        # The answer was given; a metering failure must not take it back. Logged for follow-up.
        log.exception("could not meter a provider call", provider_id=str(config.id))
        return Decimal(0)


def _since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


@dataclass(frozen=True)
class Completion:
    """A whole routed answer (`complete`): text, who answered, and the hops on the way."""

    text: str
    completed: Completed
    hops: list[ProviderFallback]


async def complete(
    rt: ProvidersRuntime,
    org_id: uuid.UUID,
    target: Target,
    request: ChatRequest,
    *,
    agent_id: uuid.UUID | None = None,
    capability: str = "chat",
) -> Completion:
    """`stream`, gathered: the final text (after any reset), usage, and every hop."""
    hops: list[ProviderFallback] = []

    async def collect(hop: ProviderFallback) -> None:
        hops.append(hop)

    parts: list[str] = []
    completed: Completed | None = None
    async for chunk in stream(
        rt, org_id, target, request, agent_id=agent_id, on_fallback=collect, capability=capability
    ):
        if isinstance(chunk, TextDelta):
            parts.append(chunk.text)
        elif isinstance(chunk, Reset):
            parts.clear()
        else:
            completed = chunk
    if completed is None:  # pragma: no cover - stream ends with Completed or raises
        raise NoProviderAvailable
    return Completion("".join(parts), completed, hops)
