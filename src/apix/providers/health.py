"""Provider health in Redis: recent outcomes, percentiles, and a circuit breaker per provider.

Every real call (and every active check) lands here; nothing is written to PostgreSQL per
call. Each provider has a list of its last `health_window` outcomes and a hash with the
circuit (`closed` → `open` after `breaker_failures` consecutive retryable failures →
`half_open` after `breaker_open_s`, when one probe call is let through: success closes it,
failure opens it again). Status changes are published as `provider.health.updated` on the
organisation's `providers` channel.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from redis.asyncio import Redis

from apix.config import ProvidersSettings
from apix.core.logging import get_logger
from apix.providers.errors import ProviderCallError
from apix.providers.events import ProviderHealthUpdated
from apix.providers.schemas import Circuit, HealthStatus, LatencyPercentiles, ProviderHealth
from apix.providers.types import ProviderConfig
from apix.realtime.broker import Broker
from apix.realtime.channels import NAMESPACES, ChannelRef

log = get_logger(__name__)

# Health of an idle provider is kept this long after its last call.
_TTL_MS = 7 * 24 * 3600 * 1000
# A probe that never reports back (its caller crashed) frees the half-open slot after this
# (on top of the provider's timeout).
_PROBE_MARGIN_MS = 5_000

# KEYS: samples, state, probe. ARGV: entry ('' for an active check, kept out of the samples),
# window, ok (1/0), counts (1/0), threshold, now_ms, ttl_ms. Returns the circuit after it.
_RECORD = """
local samples, state, probe = KEYS[1], KEYS[2], KEYS[3]
if ARGV[1] ~= '' then
  redis.call('LPUSH', samples, ARGV[1])
  redis.call('LTRIM', samples, 0, tonumber(ARGV[2]) - 1)
end
local circuit = redis.call('HGET', state, 'circuit') or 'closed'
if ARGV[3] == '1' then
  redis.call('HSET', state, 'circuit', 'closed', 'failures', 0)
  circuit = 'closed'
elseif ARGV[4] == '1' then
  local failures = redis.call('HINCRBY', state, 'failures', 1)
  if circuit ~= 'closed' or failures >= tonumber(ARGV[5]) then
    redis.call('HSET', state, 'circuit', 'open', 'opened_at', ARGV[6])
    circuit = 'open'
  end
end
redis.call('DEL', probe)
redis.call('PEXPIRE', samples, ARGV[7])
redis.call('PEXPIRE', state, ARGV[7])
return circuit
"""

# KEYS: state, probe. ARGV: now_ms, open_ms, probe_ttl_ms. Returns {circuit, allowed (1/0)}.
_ADMIT = """
local state, probe = KEYS[1], KEYS[2]
local circuit = redis.call('HGET', state, 'circuit') or 'closed'
if circuit == 'closed' then return {circuit, 1} end
if circuit == 'open' then
  local opened = tonumber(redis.call('HGET', state, 'opened_at') or '0')
  if tonumber(ARGV[1]) - opened < tonumber(ARGV[2]) then return {circuit, 0} end
  redis.call('HSET', state, 'circuit', 'half_open')
  circuit = 'half_open'
end
if redis.call('SET', probe, '1', 'NX', 'PX', ARGV[3]) then return {circuit, 1} end
return {circuit, 0}
"""

# KEYS: state. ARGV: status. Returns the previous status ('' if none) and stores the new one.
_SWAP_STATUS = """
local old = redis.call('HGET', KEYS[1], 'status') or ''
if old ~= ARGV[1] then redis.call('HSET', KEYS[1], 'status', ARGV[1]) end
return old
"""


def _keys(org_id: uuid.UUID, provider_id: uuid.UUID) -> tuple[str, str, str]:
    # One hash tag per provider: its keys share a Redis Cluster slot.
    base = f"apix:prov:{{{org_id}:{provider_id}}}"
    return f"{base}:s", f"{base}:h", f"{base}:probe"


def providers_channel(org_id: uuid.UUID) -> ChannelRef:
    """The organisation's `providers` channel, bound to it as the gateway binds channels."""
    return ChannelRef("providers", NAMESPACES["providers"], None, str(org_id))


@dataclass(frozen=True, slots=True)
class Admission:
    allowed: bool
    circuit: Circuit

    @property
    def probe(self) -> bool:
        return self.circuit == "half_open"


def _percentile(ordered: list[float], p: float) -> float | None:
    # Nearest rank: an observed value, no interpolation.
    if not ordered:
        return None
    return round(ordered[max(0, math.ceil(p * len(ordered)) - 1)], 3)


def summarise(
    samples: list[bytes], state: dict[bytes, bytes], settings: ProvidersSettings
) -> ProviderHealth:
    latencies: list[float] = []
    failures = 0
    last_error: str | None = None
    for raw in samples:
        ok, latency, code = raw.decode().split("|", 2)
        if ok == "1":
            latencies.append(float(latency))
        else:
            failures += 1
            last_error = last_error or code
    total = len(samples)
    circuit: Circuit = _circuit(state.get(b"circuit"))
    error_rate = failures / total if total else None
    status: HealthStatus
    if circuit != "closed":
        status = "unhealthy"
    elif error_rate is None:
        status = "unknown" if b"checked_at" not in state else "healthy"
    elif error_rate >= settings.degraded_error_rate:
        status = "degraded"
    else:
        status = "healthy"
    latencies.sort()
    checked = state.get(b"checked_at")
    check_ms = state.get(b"check_ms")
    return ProviderHealth(
        status=status,
        circuit=circuit,
        availability=None if error_rate is None else round(1 - error_rate, 4),
        error_rate=None if error_rate is None else round(error_rate, 4),
        latency_ms=LatencyPercentiles(
            p50=_percentile(latencies, 0.5),
            p95=_percentile(latencies, 0.95),
            p99=_percentile(latencies, 0.99),
        ),
        samples=total,
        consecutive_failures=int(state.get(b"failures", b"0")),
        last_error=last_error or state.get(b"check_error", b"").decode() or None,
        checked_at=datetime.fromtimestamp(int(checked) / 1000, UTC) if checked else None,
        check_latency_ms=float(check_ms) if check_ms else None,
    )


def _circuit(raw: bytes | None) -> Circuit:
    value = raw.decode() if raw else "closed"
    if value == "open":
        return "open"
    if value == "half_open":
        return "half_open"
    return "closed"


class Health:
    def __init__(self, redis: Redis, settings: ProvidersSettings, broker: Broker | None) -> None:
        self.redis = redis
        self.settings = settings
        self.broker = broker
        self._record = redis.register_script(_RECORD)
        self._admit = redis.register_script(_ADMIT)
        self._swap = redis.register_script(_SWAP_STATUS)

    async def admit(self, config: ProviderConfig) -> Admission:
        """May a call go to this provider now? In half-open state, one probe at a time."""
        _, state, probe = _keys(config.org_id, config.id)
        circuit, allowed = await self._admit(
            keys=[state, probe],
            args=[
                _now_ms(),
                int(self.settings.breaker_open_s * 1000),
                int(config.timeout_s * 1000) + _PROBE_MARGIN_MS,
            ],
        )
        return Admission(bool(allowed), _circuit(circuit))

    async def record(
        self,
        config: ProviderConfig,
        *,
        latency_ms: float,
        error: ProviderCallError | None = None,
    ) -> ProviderHealth:
        """Add one real call's outcome; publish the status if it changed."""
        entry = f"{0 if error else 1}|{latency_ms:.3f}|{'' if error is None else error.code}"
        await self._outcome(config, entry, error)
        return await self._refresh(config)

    async def record_check(
        self, config: ProviderConfig, *, latency_ms: float, error: ProviderCallError | None
    ) -> ProviderHealth:
        """An active check: moves the circuit like a call, kept apart from call latencies."""
        _, state, _ = _keys(config.org_id, config.id)
        await self.redis.hset(
            state,
            mapping={
                "checked_at": _now_ms(),
                "check_ms": f"{latency_ms:.3f}",
                "check_error": "" if error is None else error.code,
            },
        )
        await self._outcome(config, "", error)
        return await self._refresh(config)

    async def _outcome(
        self, config: ProviderConfig, entry: str, error: ProviderCallError | None
    ) -> None:
        await self._record(
            keys=list(_keys(config.org_id, config.id)),
            args=[
                entry,
                self.settings.health_window,
                0 if error else 1,
                1 if error is not None and error.counts_against_health else 0,
                self.settings.breaker_failures,
                _now_ms(),
                _TTL_MS,
            ],
        )

    async def get(self, org_id: uuid.UUID, provider_ids: list[uuid.UUID]) -> list[ProviderHealth]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for provider_id in provider_ids:
                samples, state, _ = _keys(org_id, provider_id)
                pipe.lrange(samples, 0, -1)
                pipe.hgetall(state)
            raw = await pipe.execute()
        return [summarise(raw[i], raw[i + 1], self.settings) for i in range(0, len(raw), 2)]

    async def forget(self, org_id: uuid.UUID, provider_id: uuid.UUID) -> None:
        await self.redis.delete(*_keys(org_id, provider_id))

    async def _refresh(self, config: ProviderConfig) -> ProviderHealth:
        (health,) = await self.get(config.org_id, [config.id])
        _, state, _ = _keys(config.org_id, config.id)
        previous = (await self._swap(keys=[state], args=[health.status])).decode()
        if previous != health.status and (previous or health.status != "healthy"):
            await self._publish(config, health, previous or None)
        return health

    async def _publish(
        self, config: ProviderConfig, health: ProviderHealth, previous: str | None
    ) -> None:
        log.info(
            "provider health changed",
            provider_id=str(config.id),
            org_id=str(config.org_id),
            status=health.status,
            previous=previous,
        )
        if self.broker is None:
            return
        event = ProviderHealthUpdated(
            provider_id=config.id,
            provider_name=config.name,
            previous_status=previous,
            **health.model_dump(),
        )
        try:
            await self.broker.publish(
                providers_channel(config.org_id), event.type, event.model_dump(mode="json")
            )
        except Exception:
            # Health is recorded; a lost announcement must not fail the call it came from.
            log.exception("could not publish provider health", provider_id=str(config.id))


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
