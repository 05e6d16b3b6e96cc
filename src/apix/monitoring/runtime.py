"""The node's monitoring runtime, created in the lifespan next to the gateway.

Loops: every `push_interval_s` the probe's batch goes into this node's slots and to Redis;
every `probe_interval_s` Redis and PostgreSQL round trips are measured; every
`alert_interval_s` the node tries to hold the monitoring lease, and the holder takes the
count of events published cluster-wide (kept in Redis by the publish script) and evaluates
alerts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
import uuid
from collections import defaultdict
from typing import Any

from prometheus_client import Counter, Histogram
from redis.asyncio import Redis
from sqlalchemy import text

from apix import __version__
from apix.config import Settings
from apix.core.logging import get_logger
from apix.core.tasks import Periodic
from apix.infra.database import Database
from apix.monitoring import histograms, store
from apix.monitoring.alerts import PLATFORM_ORG, Evaluator
from apix.monitoring.metrics import Metrics
from apix.monitoring.probe import PLATFORM, DeliveryProbe
from apix.realtime import archive
from apix.realtime.channels import NAMESPACES, ChannelRef
from apix.realtime.channels import PLATFORM as PLATFORM_TENANT
from apix.realtime.gateway import Gateway

log = get_logger(__name__)

LEASE_KEY = "apix:mon:lease"
# KEYS: lease. ARGV: owner, ttl_ms. Take the lease if free, extend it if ours.
_HOLD = """
local owner = redis.call('GET', KEYS[1])
if owner == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if owner == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


_HTTP_LABEL_SETS = 4096  # Prometheus children kept at hand by (method, route, status)


class MonitoringRuntime:
    def __init__(
        self, settings: Settings, database: Database, redis: Redis, gateway: Gateway
    ) -> None:
        self.config = settings.monitoring
        self.node = settings.node_id
        # `apix serve --workers N` runs N processes under one node id: each writes its own.
        self.process = f"{self.node}:{os.getpid()}"
        # Who holds the lease: this runtime, not just this process (a process that starts a
        # second app, as tests do, must not have two leaders with their own caches).
        self.owner = f"{self.process}:{secrets.token_hex(4)}"
        self.database = database
        self.redis = redis
        self.gateway = gateway
        self.probe = DeliveryProbe(sample_every=self.config.delivery_sample_every)
        self.slots = store.NodeSlots(self.process)
        self.metrics = Metrics(self)
        self._http_metrics: dict[tuple[str, str, int], tuple[Histogram, Counter]] = {}
        self.evaluator = Evaluator(redis, database, self.config, self._publish_alert)
        self.archive_backlog: dict[str, Any] | None = None
        self.leader = False
        self.started_at = int(time.time() * 1000)
        self._push_lock = asyncio.Lock()
        self._hold = redis.register_script(_HOLD)
        self._release = redis.register_script(_RELEASE)
        self._loops = [
            Periodic("apix-monitoring-push", self.config.push_interval_s, self.push),
            Periodic("apix-monitoring-probe", self.config.probe_interval_s, self.measure_backends),
            Periodic("apix-monitoring-alerts", self.config.alert_interval_s, self.lead),
        ]

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    async def start(self) -> None:
        if not self.enabled:
            return
        self.gateway.probe = self.probe
        with contextlib.suppress(Exception):
            await self.lead()  # take the lease at once if it is free: count from the start
        for loop in self._loops:
            loop.start()

    async def stop(self) -> None:
        if not self.enabled:
            return
        for loop in self._loops:
            await loop.stop()
        with contextlib.suppress(Exception):
            await self.push()
        if self.leader:
            with contextlib.suppress(Exception):
                await self._release(keys=[LEASE_KEY], args=[self.owner])
        self.gateway.probe = None

    # --- recording ---------------------------------------------------------------------

    def http_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.probe.http(route, method, seconds)
        key = (method, route, status)
        metrics = self._http_metrics.get(key)
        if metrics is None:  # `labels()` checks and locks on every call: look up once
            metrics = (
                self.metrics.http.labels(method, route),
                self.metrics.http_requests.labels(method, route, str(status)),
            )
            if len(self._http_metrics) < _HTTP_LABEL_SETS:  # clients choose the method
                self._http_metrics[key] = metrics
        duration, requests = metrics
        duration.observe(seconds)
        requests.inc()

    async def push(self) -> None:
        """Fold the probe's batch into this node's slots and write them to Redis."""
        async with self._push_lock:
            now = time.time()
            # Tallies, counted by bucket as the samples came: folding them costs a call per
            # bucket, not per sample. At 60,000 deliveries a second a push used to fold
            # 19,000 samples one at a time (in slices, the loop free in between): about
            # 60 ms of the loop's CPU every 5 s, which the events due meanwhile waited out.
            tallies, counts = self.probe.take()
            self.slots.add(tallies, counts, now)
            self.metrics.observe(tallies, counts)
            gauges, connections, subscriptions = self._gauges()
            await self.slots.push(self.redis, now, gauges)
            async with self.redis.pipeline(transaction=False) as pipe:
                key = store.node_key(self.process)
                pipe.hset(
                    key,
                    mapping={
                        "node": self.node,
                        "process": self.process,
                        "last_seen": int(now * 1000),
                        "started_at": self.started_at,
                        "version": __version__,
                        "connections": connections,
                        "subscriptions": subscriptions,
                        "leader": int(self.leader),
                    },
                )
                pipe.expire(key, 3600)
                await pipe.execute()

    async def fresh(self) -> None:
        """Push this node's latest figures before answering a read (others lag a push)."""
        if self.enabled:
            await self._take_counts()
            await self.push()

    def _gauges(self) -> tuple[dict[store.CKey, int], int, int]:
        # The gateway keeps these counts as connections come and go: counting 10k
        # connections at every push was a few per cent of a node's CPU at low event rates.
        census, subscribed = self.gateway.census, self.gateway.subscribed
        gauges: dict[store.CKey, int] = {}
        for (org_id, client_type), n in census.items():
            gauges[(str(org_id), f"{store.GAUGE}connections", client_type)] = n
        for org_id, n in subscribed.items():
            gauges[(str(org_id), f"{store.GAUGE}subscriptions", "")] = n
        return gauges, census.total(), subscribed.total()

    async def measure_backends(self) -> None:
        started = time.perf_counter()
        try:
            await asyncio.wait_for(self.redis.ping(), 3.0)
            self.probe.round_trip("redis", time.perf_counter() - started)
        except Exception as exc:
            log.warning("monitoring: redis probe failed", error=repr(exc))
        started = time.perf_counter()
        try:
            async with asyncio.timeout(3.0), self.database.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            self.probe.round_trip("postgres", time.perf_counter() - started)
        except Exception as exc:
            log.warning("monitoring: postgres probe failed", error=repr(exc))

    async def refresh_backlog(self) -> None:
        try:
            async with asyncio.timeout(3.0):
                self.archive_backlog = await archive.backlog(self.redis)
        except Exception:
            self.archive_backlog = None

    # --- the lease holder ----------------------------------------------------------------

    async def lead(self) -> None:
        ttl_ms = int(max(3 * self.config.alert_interval_s, 5.0) * 1000)
        self.leader = bool(await self._hold(keys=[LEASE_KEY], args=[self.owner, ttl_ms]))
        if not self.leader:
            return
        await self._take_counts()
        await self.push()
        await self.refresh_backlog()
        await self.evaluator.evaluate(await self.alert_values())

    async def alert_values(self) -> dict[str, dict[str, float | None]]:
        """What each rule measures now: per active organisation, and for the platform."""
        now = time.time()
        active = await self.redis.zrangebyscore(store.ORGS_KEY, int((now - 120) * 1000), "+inf")
        orgs = [o.decode() if isinstance(o, bytes) else str(o) for o in active]
        orgs = [o for o in orgs if o != PLATFORM]
        slots = store.window_slots(now, 10, histograms.Window.ONE_MINUTE.slots)
        hists = await store.read_hists(self.redis, orgs, 10, slots) if orgs else {}
        counts = await store.read_counts(self.redis, orgs, 10, slots) if orgs else {}
        minimum = self.config.alert_min_samples
        values: dict[str, dict[str, float | None]] = {}
        for org in orgs:
            merged = {"delivery": histograms.new(), "rtt": histograms.new()}
            for entries in hists[org]:
                for field, payload in entries:
                    if field.metric in merged:
                        merged[field.metric].add(histograms.decode(payload))
            totals: dict[str, int] = defaultdict(int)
            for slot in counts[org]:
                for (_, name, _), n in slot.items():
                    totals[name] += n
            values[org] = {
                "delivery_p99_ms": _p99(merged["delivery"], minimum),
                "rtt_p99_ms": _p99(merged["rtt"], minimum),
                "redeliveries_per_min": float(totals["redelivered"]),
                "dead_letters_per_min": float(totals["dead_lettered"]),
            }
        backlog = self.archive_backlog
        lag = None if backlog is None else float(backlog.get("oldest_pending_age_s") or 0.0)
        values[PLATFORM_ORG] = {"archive_lag_s": lag}
        return values

    async def _publish_alert(self, org_id: uuid.UUID, event: str, data: dict[str, Any]) -> None:
        monitor = ChannelRef("monitor", NAMESPACES["monitor"], None, str(org_id))
        await self.gateway.broker.publish(monitor, event, data)

    async def _take_counts(self) -> None:
        """Fold the events published cluster-wide since the last take into this node's
        figures (only the lease holder takes them, so each is counted once)."""
        if not (self.leader and self.config.count_events):
            return
        for (tenant, channel), n in (await self.gateway.broker.take_counts()).items():
            self.probe.published(PLATFORM if tenant == PLATFORM_TENANT else tenant, channel, n)


def _p99(histogram: Any, minimum: int) -> float | None:
    summary = histograms.summary(histogram)
    return summary.p99 if summary.count >= minimum else None
