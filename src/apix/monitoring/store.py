"""Rolling windows shared through Redis: each node pushes its slots, every reader merges.

Time is cut in 10-second slots (kept 7 minutes) and 1-minute slots (kept 62 minutes). A node
keeps its own slots of the current minute in memory and, every `push_interval_s`, writes
each changed slot as one Redis hash per organisation: field `<node>|<metric>|<d1>|<d2>`,
value the encoded HDR histogram (or the count). Writing a slot again overwrites the node's
own fields, so a push is idempotent, and no two nodes ever write the same field. Readers take
every node's fields of the slots a window covers and add them up: any node answers for the
whole cluster. Platform-wide figures are kept under the organisation `*`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]
from redis.asyncio import Redis

from apix.monitoring import histograms
from apix.monitoring.probe import PLATFORM, Counts, HKey, Tallies

_TTL_S = {10: 7 * 60, 60: 62 * 60}
ORGS_KEY = "apix:mon:orgs"  # sorted set: organisation → last push (ms)
NODES_KEY = "apix:mon:nodes"  # sorted set: node process → last push (ms)

CKey = tuple[str, str, str]  # (organisation, counter, dimension)
# Gauges (connections, subscriptions) are a node's value at push time, not summed over time.
GAUGE = "g:"


def hist_key(org: str, resolution: int, slot: int) -> str:
    return f"apix:mon:h:{org}:{resolution}:{slot}"


def count_key(org: str, resolution: int, slot: int) -> str:
    return f"apix:mon:c:{org}:{resolution}:{slot}"


def node_key(node: str) -> str:
    return f"apix:mon:node:{node}"


def slot_of(now: float, resolution: int) -> int:
    return int(now // resolution)


@dataclass
class _Slot:
    hists: dict[HKey, HdrHistogram] = field(default_factory=dict)
    counts: dict[CKey, int] = field(default_factory=lambda: defaultdict(int))


class NodeSlots:
    """This node's 10-second slots of the current minute (and any not pushed yet).

    ``node`` names the writer: one process of a node (`<node id>:<pid>`).
    """

    def __init__(self, node: str) -> None:
        self.node = node
        self._slots: dict[int, _Slot] = {}
        self._dirty: set[int] = set()

    def add(self, tallies: Tallies, counts: Counts, now: float) -> None:
        slot_id = slot_of(now, 10)
        slot = self._slots.setdefault(slot_id, _Slot())
        for key, tally in tallies.items():
            histogram = slot.hists.get(key)
            if histogram is None:
                histogram = slot.hists[key] = histograms.new()
            tally.record_into(histogram)
        for ckey, n in counts.items():
            slot.counts[ckey] += n
        self._dirty.add(slot_id)

    async def push(self, redis: Redis, now: float, gauges: dict[CKey, int]) -> None:
        """Write every changed slot (10 s and its minute), with the gauges, to Redis."""
        current = slot_of(now, 10)
        # Slots that change while this one writes are marked for the next push; a write
        # that fails or is cancelled leaves its slots marked too (each write sets whole
        # values, so writing a slot again is harmless). What Redis would have expired by
        # now is not written again, and not kept: a long outage costs no more than an hour.
        expired = current - _TTL_S[60] // 10
        for slot_id in [i for i in self._slots if i <= expired]:
            del self._slots[slot_id]
        dirty = {i for i in self._dirty if i > expired} | {current}
        self._dirty = set()
        try:
            async with redis.pipeline(transaction=False) as pipe:
                self._queue(pipe, dirty, current, gauges, int(now * 1000))
                await pipe.execute()
        except BaseException:
            self._dirty |= dirty
            raise
        minute_now = current * 10 // 60
        for slot_id in [i for i in self._slots if i * 10 // 60 < minute_now]:
            del self._slots[slot_id]

    def _queue(
        self, pipe: Any, slot_ids: set[int], current: int, gauges: dict[CKey, int], now_ms: int
    ) -> None:
        """Each changed 10-second slot still kept in Redis, and each of their minutes, once."""
        orgs: set[str] = set()
        for slot_id in sorted(i for i in slot_ids if i > current - _TTL_S[10] // 10):
            slot = self._slots.get(slot_id, _Slot())
            orgs |= self._write(pipe, 10, slot_id, [slot], gauges if slot_id == current else {})
        minute_now = current * 10 // 60
        for minute in sorted({i * 10 // 60 for i in slot_ids}):
            in_minute = [s for i, s in self._slots.items() if i * 10 // 60 == minute] or [_Slot()]
            orgs |= self._write(pipe, 60, minute, in_minute, gauges if minute == minute_now else {})
        if orgs:
            pipe.zadd(ORGS_KEY, dict.fromkeys(orgs, now_ms))
        pipe.zadd(NODES_KEY, {self.node: now_ms})
        pipe.zremrangebyscore(NODES_KEY, "-inf", now_ms - _TTL_S[60] * 1000)
        pipe.zremrangebyscore(ORGS_KEY, "-inf", now_ms - _TTL_S[60] * 1000)

    def _write(
        self,
        pipe: Any,
        resolution: int,
        slot_id: int,
        slots: Sequence[_Slot],
        gauges: dict[CKey, int],
    ) -> set[str]:
        hists: dict[HKey, HdrHistogram] = {}
        counts: dict[CKey, int] = defaultdict(int)
        for slot in slots:
            for (org, metric, d1, d2), histogram in slot.hists.items():
                for target in _with_platform(org):
                    total = hists.get((target, metric, d1, d2))
                    if total is None:
                        total = hists[(target, metric, d1, d2)] = histograms.new()
                    total.add(histogram)
            for (org, name, dim), n in slot.counts.items():
                for target in _with_platform(org):
                    counts[(target, name, dim)] += n
        for (org, name, dim), n in gauges.items():
            for target in _with_platform(org):
                counts[(target, name, dim)] += n
        by_org_h: dict[str, dict[str, bytes]] = defaultdict(dict)
        for (org, metric, d1, d2), histogram in hists.items():
            by_org_h[org][f"{self.node}|{metric}|{d1}|{d2}"] = histograms.encode(histogram)
        by_org_c: dict[str, dict[str, int]] = defaultdict(dict)
        for (org, name, dim), n in counts.items():
            by_org_c[org][f"{self.node}|{name}|{dim}"] = n
        ttl = _TTL_S[resolution]
        for org, mapping in by_org_h.items():
            key = hist_key(org, resolution, slot_id)
            pipe.hset(key, mapping=mapping)
            pipe.expire(key, ttl)
        for org, cmapping in by_org_c.items():
            key = count_key(org, resolution, slot_id)
            pipe.hset(key, mapping=cmapping)
            pipe.expire(key, ttl)
        return set(by_org_h) | set(by_org_c)


def _with_platform(org: str) -> tuple[str, ...]:
    """The organisation, and the platform's (where every figure is summed too)."""
    return (org,) if org == PLATFORM else (org, PLATFORM)


# --- reading (any node) ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HistField:
    node: str
    metric: str
    d1: str
    d2: str


def _split(raw: bytes | str) -> list[str]:
    text = raw.decode() if isinstance(raw, bytes) else raw
    return text.split("|", 3)


async def read_hists(
    redis: Redis, orgs: Sequence[str], resolution: int, slots: Sequence[int]
) -> dict[str, list[list[tuple[HistField, bytes]]]]:
    """Per organisation, per slot (in the order given): every node's histogram fields."""
    async with redis.pipeline(transaction=False) as pipe:
        for org in orgs:
            for slot_id in slots:
                pipe.hgetall(hist_key(org, resolution, slot_id))
        replies = await pipe.execute()
    out: dict[str, list[list[tuple[HistField, bytes]]]] = {}
    i = 0
    for org in orgs:
        per_slot = []
        for _ in slots:
            entries = []
            for raw_field, value in replies[i].items():
                parts = _split(raw_field)
                if len(parts) == 4:
                    entries.append((HistField(*parts), value))
            per_slot.append(entries)
            i += 1
        out[org] = per_slot
    return out


async def read_counts(
    redis: Redis, orgs: Sequence[str], resolution: int, slots: Sequence[int]
) -> dict[str, list[dict[tuple[str, str, str], int]]]:
    """Per organisation, per slot: (node, counter, dimension) → count."""
    async with redis.pipeline(transaction=False) as pipe:
        for org in orgs:
            for slot_id in slots:
                pipe.hgetall(count_key(org, resolution, slot_id))
        replies = await pipe.execute()
    out: dict[str, list[dict[tuple[str, str, str], int]]] = {}
    i = 0
    for org in orgs:
        per_slot = []
        for _ in slots:
            counts: dict[tuple[str, str, str], int] = {}
            for raw_field, value in replies[i].items():
                parts = _split(raw_field)
                if len(parts) == 3:
                    counts[(parts[0], parts[1], parts[2])] = int(value)
            per_slot.append(counts)
            i += 1
        out[org] = per_slot
    return out


def window_slots(now: float, resolution: int, count: int) -> list[int]:
    """The ``count`` slots ending with the current one, oldest first."""
    current = slot_of(now, resolution)
    return list(range(current - count + 1, current + 1))
