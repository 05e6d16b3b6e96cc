"""Alert rules, their thresholds, and the evaluator that turns conditions into episodes.

One node at a time evaluates (it holds the monitoring lease). A condition that holds for the
rule's `for_s` fires: one `apix_alert` row in state `firing`, and `alert.fired` on the
organisation's `monitor` channel. When it no longer holds, the same row becomes `resolved`
and `alert.resolved` is published. The evaluator's state (pending since, firing episode) is
kept in Redis, so a node that takes the lease over carries on without firing twice; a unique
index on firing episodes backs that up in PostgreSQL.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis
from sqlalchemy import select, text, update
from sqlalchemy.dialects.postgresql import insert

from apix.config import MonitoringSettings
from apix.core.json import dumps, loads
from apix.core.logging import get_logger
from apix.infra.database import Database
from apix.monitoring.models import ApixAlert, ApixAlertThreshold

log = get_logger(__name__)

STATE_KEY = "apix:mon:alerts"  # hash: "<org>|<rule>" → {"state", "since", "id"}
PLATFORM_ORG = "platform"  # the state key of platform alerts (org_id NULL)
_THRESHOLDS_TTL_S = 30.0


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    description: str
    platform: bool = False
    latency: bool = False

    def default(self, settings: MonitoringSettings) -> float:
        return float(getattr(settings, f"alert_{self.name}"))


RULES: dict[str, Rule] = {
    rule.name: rule
    for rule in (
        Rule("delivery_p99_ms", "publish-to-delivery p99 over the last minute (ms)", latency=True),
        Rule("rtt_p99_ms", "heartbeat round-trip p99 over the last minute (ms)", latency=True),
        Rule("redeliveries_per_min", "events sent again in the last minute"),
        Rule("dead_letters_per_min", "events dead-lettered in the last minute"),
        Rule("archive_lag_s", "age of the oldest event not archived yet (s)", platform=True),
    )
}
ORG_RULES = [r for r in RULES.values() if not r.platform]


@dataclass(frozen=True, slots=True)
class Threshold:
    rule: str
    threshold: float
    for_s: float
    enabled: bool
    default_threshold: float
    default_for_s: float
    overridden: bool


async def thresholds(
    database: Database, settings: MonitoringSettings, org_id: uuid.UUID | None
) -> dict[str, Threshold]:
    """Effective thresholds: the organisation's overrides over the platform defaults."""
    overrides: dict[str, ApixAlertThreshold] = {}
    if org_id is not None:
        async with database.transaction(org_id) as uow:
            rows = await uow.session.scalars(
                select(ApixAlertThreshold).where(ApixAlertThreshold.org_id == org_id)
            )
            overrides = {row.rule: row for row in rows}
    out = {}
    for rule in RULES.values():
        if rule.platform != (org_id is None):
            continue
        row = overrides.get(rule.name)
        default = rule.default(settings)
        out[rule.name] = Threshold(
            rule=rule.name,
            threshold=row.threshold if row is not None and row.threshold is not None else default,
            for_s=row.for_s if row is not None and row.for_s is not None else settings.alert_for_s,
            enabled=row.enabled if row is not None else True,
            default_threshold=default,
            default_for_s=settings.alert_for_s,
            overridden=row is not None,
        )
    return out


Publish = Callable[[uuid.UUID, str, dict[str, Any]], Awaitable[None]]


class Evaluator:
    """Conditions → alert episodes (run by the lease holder every `alert_interval_s`)."""

    def __init__(
        self,
        redis: Redis,
        database: Database,
        settings: MonitoringSettings,
        publish: Publish,
    ) -> None:
        self.redis = redis
        self.database = database
        self.settings = settings
        self.publish = publish
        self._cache: dict[str, tuple[float, dict[str, Threshold]]] = {}
        self._changes: dict[str, int] = {}  # per organisation: thresholds changed this often

    def forget_thresholds(self, org: str) -> None:
        self._cache.pop(org, None)
        self._changes[org] = self._changes.get(org, 0) + 1

    async def _thresholds(self, org: str) -> dict[str, Threshold]:
        cached = self._cache.get(org)
        now = time.monotonic()
        if cached is not None and now - cached[0] < _THRESHOLDS_TTL_S:
            return cached[1]
        org_id = None if org == PLATFORM_ORG else uuid.UUID(org)
        changes = self._changes.get(org, 0)
        found = await thresholds(self.database, self.settings, org_id)
        if self._changes.get(org, 0) == changes:
            # Not when they changed while being read: that read may predate the change,
            # and caching it would bring the old thresholds back for a while.
            self._cache[org] = (now, found)
        return found

    async def evaluate(self, values: dict[str, dict[str, float | None]]) -> None:
        """``values``: organisation (or `platform`) → rule → measured value (None: no data).

        Organisations with a pending or firing alert but no values are evaluated as "no
        data", which resolves them.
        """
        raw = await self.redis.hgetall(STATE_KEY)
        states = {(k.decode() if isinstance(k, bytes) else k): loads(v) for k, v in raw.items()}
        for key in states:
            org, _, rule = key.partition("|")
            values.setdefault(org, {}).setdefault(rule, None)
        now_ms = int(time.time() * 1000)
        for org, measured in values.items():
            try:
                limits = await self._thresholds(org)
            except Exception:
                log.warning("monitoring: thresholds unavailable", org=org, exc_info=True)
                continue
            for rule_name, value in measured.items():
                limit = limits.get(rule_name)
                if limit is None:
                    continue
                key = f"{org}|{rule_name}"
                state = states.get(key)
                breached = limit.enabled and value is not None and value > limit.threshold
                try:
                    await self._step(org, rule_name, key, state, breached, value, limit, now_ms)
                except Exception:
                    log.exception("monitoring: alert transition failed", org=org, rule=rule_name)

    async def _step(
        self,
        org: str,
        rule: str,
        key: str,
        state: dict[str, Any] | None,
        breached: bool,
        value: float | None,
        limit: Threshold,
        now_ms: int,
    ) -> None:
        if breached:
            assert value is not None  # noqa: S101 - breached implies a value
            if state is None:
                state = {"state": "pending", "since": now_ms}
                await self.redis.hset(STATE_KEY, key, dumps(state))
            if state["state"] == "pending" and now_ms - state["since"] >= limit.for_s * 1000:
                alert_id = await self._fire(org, rule, value, limit)
                state = {"state": "firing", "since": state["since"], "id": str(alert_id)}
                await self.redis.hset(STATE_KEY, key, dumps(state))
            return
        if state is None:
            return
        if state["state"] == "firing":
            await self._resolve(org, rule, uuid.UUID(state["id"]), value, limit)
        await self.redis.hdel(STATE_KEY, key)

    async def _fire(self, org: str, rule: str, value: float, limit: Threshold) -> uuid.UUID:
        org_id = None if org == PLATFORM_ORG else uuid.UUID(org)
        fired_at = datetime.now(UTC)
        details = {"window": "1m", "for_s": limit.for_s}
        async with self.database.transaction(org_id) as uow:
            stmt = (
                insert(ApixAlert)
                .values(
                    id=uuid.uuid4(),
                    org_id=org_id,
                    rule=rule,
                    state="firing",
                    value=value,
                    threshold=limit.threshold,
                    details=details,
                    fired_at=fired_at,
                )
                .on_conflict_do_nothing(
                    index_elements=["org_id", "rule"], index_where=text("state = 'firing'")
                )
                .returning(ApixAlert.id)
            )
            alert_id = (await uow.session.execute(stmt)).scalar_one_or_none()
            if alert_id is not None:
                uow.after_commit(
                    lambda: self._announce(
                        org_id,
                        "alert.fired",
                        {
                            "alert_id": str(alert_id),
                            "rule": rule,
                            "state": "firing",
                            "value": value,
                            "threshold": limit.threshold,
                            "fired_at": int(fired_at.timestamp() * 1000),
                            **details,
                        },
                    )
                )
                return alert_id
            # Already firing (the state in Redis was lost): adopt that episode.
            existing = await uow.session.scalar(
                select(ApixAlert.id).where(
                    ApixAlert.org_id.is_not_distinct_from(org_id),
                    ApixAlert.rule == rule,
                    ApixAlert.state == "firing",
                )
            )
            assert existing is not None  # noqa: S101 - the conflict says it exists
            return existing

    async def _resolve(
        self,
        org: str,
        rule: str,
        alert_id: uuid.UUID,
        value: float | None,
        limit: Threshold,
    ) -> None:
        org_id = None if org == PLATFORM_ORG else uuid.UUID(org)
        resolved_at = datetime.now(UTC)
        async with self.database.transaction(org_id) as uow:
            updated = await uow.session.execute(
                update(ApixAlert)
                .where(ApixAlert.id == alert_id, ApixAlert.state == "firing")
                .values(state="resolved", resolved_at=resolved_at, resolved_value=value)
                .returning(ApixAlert.fired_at)
            )
            fired_at = updated.scalar_one_or_none()
            if fired_at is not None:
                uow.after_commit(
                    lambda: self._announce(
                        org_id,
                        "alert.resolved",
                        {
                            "alert_id": str(alert_id),
                            "rule": rule,
                            "state": "resolved",
                            "value": value,
                            "threshold": limit.threshold,
                            "fired_at": int(fired_at.timestamp() * 1000),
                            "resolved_at": int(resolved_at.timestamp() * 1000),
                        },
                    )
                )

    async def _announce(self, org_id: uuid.UUID | None, event: str, data: dict[str, Any]) -> None:
        if org_id is None:
            log.warning("platform alert", event_type=event, **data)
            return
        await self.publish(org_id, event, data)
