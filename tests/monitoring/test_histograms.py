"""Percentiles from known inputs, merging (across slots and nodes), and the probe's parsing."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from apix.monitoring import histograms, store
from apix.monitoring.histograms import Window
from apix.monitoring.metrics import Latencies
from apix.monitoring.probe import DeliveryProbe, Label, frame_channel, frame_ts
from apix.realtime.broker import event_frame, event_payload
from tests.conftest import Servers

LATENCIES = st.lists(st.integers(min_value=0, max_value=histograms.HIGHEST_US), max_size=3000)


def _of(values: list[int]) -> histograms.HdrHistogram:
    histogram = histograms.new()
    for value in values:
        histograms.record(histogram, value)
    return histogram


def test_percentiles_of_known_inputs_are_within_one_percent() -> None:
    # 1 ms, 2 ms, ... 1000 ms: p50 = 500 ms, p90 = 900 ms, p99 = 990 ms, p99.9 = 999 ms.
    summary = histograms.summary(_of([ms * 1000 for ms in range(1, 1001)]))
    assert summary.count == 1000
    for measured, expected in [
        (summary.p50, 500),
        (summary.p90, 900),
        (summary.p99, 990),
        (summary.p999, 999),
        (summary.max, 1000),
        (summary.mean, 500.5),
    ]:
        assert measured == pytest.approx(expected, rel=0.01)


BULK_VALUES = st.lists(
    st.one_of(
        st.integers(min_value=0, max_value=histograms.HIGHEST_US * 2),
        st.integers(min_value=0, max_value=5000),  # the exact range and its first buckets
        # Around Prometheus's bucket bounds, where a value in seconds is compared.
        st.sampled_from(histograms.PROMETHEUS_BOUNDS_S).flatmap(
            lambda b: st.integers(round(b * 1e6) - 2, round(b * 1e6) + 2)
        ),
    ),
    max_size=2000,
)


@settings(max_examples=200, deadline=None)
@given(values=BULK_VALUES, below_zero=st.lists(st.integers(max_value=-1), max_size=3))
def test_a_tally_gives_the_histogram_of_recording_one_by_one(
    values: list[int], below_zero: list[int]
) -> None:
    values = [*below_zero, *values]  # counted as 0, as `record` does
    one_by_one, bulk = _of(values), histograms.new()
    histograms.Tally.of(values).record_into(bulk)
    assert list(bulk.counts) == list(one_by_one.counts)
    assert histograms.encode(bulk) == histograms.encode(one_by_one)
    assert histograms.summary(bulk) == histograms.summary(one_by_one)
    assert bulk.get_min_value() == one_by_one.get_min_value()


@settings(max_examples=200, deadline=None)
@given(values=BULK_VALUES)
def test_a_tally_gives_the_prometheus_histogram_of_observing_one_by_one(
    values: list[int],
) -> None:
    registry = CollectorRegistry()
    observed = Histogram(
        "one_by_one", "", buckets=histograms.PROMETHEUS_BOUNDS_S, registry=registry
    )
    for micros in values:
        observed.observe(micros / 1_000_000)
    latencies = Latencies("tallied", "", [])
    latencies.add((), histograms.Tally.of(values[: len(values) // 2]))
    latencies.add((), histograms.Tally.of(values[len(values) // 2 :]))  # two pushes

    def buckets(samples: list[Any], name: str) -> dict[str, float]:
        return {s.labels["le"]: s.value for s in samples if s.name == f"{name}_bucket"}

    (expected,) = observed.collect()
    mine = latencies.family()
    assert buckets(mine.samples, "tallied") == buckets(expected.samples, "one_by_one")
    counts = {s.name: s.value for s in mine.samples if not s.name.endswith("_bucket")}
    assert counts["tallied_count"] == len(values)
    expected_sum = next(s.value for s in expected.samples if s.name == "one_by_one_sum")
    assert counts["tallied_sum"] == pytest.approx(expected_sum, rel=1e-9, abs=1e-9)


def test_an_empty_histogram_has_no_percentiles() -> None:
    summary = histograms.summary(histograms.new())
    assert summary.as_dict() == {
        "count": 0,
        "p50": None,
        "p90": None,
        "p99": None,
        "p999": None,
        "max": None,
        "mean": None,
    }


def test_values_past_the_range_count_as_the_highest() -> None:
    summary = histograms.summary(_of([histograms.HIGHEST_US * 10, -5]))
    assert summary.count == 2
    assert summary.max == pytest.approx(histograms.HIGHEST_US / 1000, rel=0.01)


@settings(max_examples=40, deadline=None)
@given(parts=st.lists(LATENCIES, min_size=1, max_size=6))
def test_merging_encoded_histograms_equals_the_histogram_of_the_union(
    parts: list[list[int]],
) -> None:
    # What nodes do: encode their own, readers decode and add.
    merged = histograms.merged(histograms.decode(histograms.encode(_of(p))) for p in parts)
    union = _of([v for p in parts for v in p])
    assert merged.get_total_count() == union.get_total_count()
    assert histograms.summary(merged) == histograms.summary(union)
    assert list(merged.counts) == list(union.counts)


def test_windows_are_made_of_slots() -> None:
    assert [(w.resolution_s, w.slots, w.seconds) for w in Window] == [
        (10, 6, 60),
        (10, 30, 300),
        (60, 60, 3600),
    ]
    assert store.window_slots(1000.0, 10, 3) == [98, 99, 100]


def test_the_probe_reads_ts_and_channel_from_the_frame_without_parsing_it() -> None:
    payload = event_payload("evt_1", "a.b", 1_764_201_600_123, {"ts": 5, "x": ',"ts":9'}, {})
    frame = event_frame("room:lobby", "1764201600123-0", "ep", payload)
    assert frame_ts(frame) == 1_764_201_600_123
    assert frame_channel(frame) == "room:lobby"


def test_the_probe_samples_the_first_delivery_per_client_type_then_every_nth() -> None:
    probe = DeliveryProbe(sample_every=4)
    ts = int(time.time() * 1000)
    frame = event_frame("room:a", f"{ts}-0", "ep", event_payload("evt_1", "t", ts, {}, {}))
    web, service = Label("org-1", "WEB_APP"), Label("org-1", "INTERNAL_SERVICE")
    for _ in range(10):
        probe.written(frame, web)
    probe.written(frame, service)
    tallies, counts = probe.take()
    # web: the first, then every 4th of the next 9 (2 more); service: its first.
    assert {key: tally.count for key, tally in tallies.items()} == {
        ("org-1", "delivery", "room", "WEB_APP"): 3,
        ("org-1", "delivery", "room", "INTERNAL_SERVICE"): 1,
    }
    assert all(0 <= t.sum_us < 5_000_000 * t.count for t in tallies.values())
    assert counts == {
        ("org-1", "delivered", "room"): 11,
        ("org-1", "channel_out", "room:a"): 11,
    }


@settings(
    max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(a=LATENCIES, b=LATENCIES)
async def test_two_nodes_pushing_to_redis_merge_into_the_histogram_of_the_union(
    servers: Servers, a: list[int], b: list[int]
) -> None:
    redis = Redis.from_url(servers.redis_url)
    try:
        await redis.flushdb()
        now = time.time()
        for node, values in (("node-a", a), ("node-b", b)):
            slots = store.NodeSlots(node)
            key = ("org-1", "delivery", "room", "WEB_APP")
            slots.add({key: histograms.Tally.of(values)} if values else {}, {}, now)
            await slots.push(redis, now, {})
        found = await store.read_hists(redis, ["org-1", "*"], 10, [store.slot_of(now, 10)])
        union = _of([*a, *b])
        for org in ("org-1", "*"):  # the platform's figures add every organisation's
            (entries,) = found[org]
            assert {f.node for f, _ in entries} == {
                n for n, v in (("node-a", a), ("node-b", b)) if v
            }
            merged = histograms.merged(histograms.decode(p) for _, p in entries)
            assert list(merged.counts) == list(union.counts)
        minute = await store.read_hists(redis, ["org-1"], 60, [store.slot_of(now, 60)])
        merged = histograms.merged(histograms.decode(p) for _, p in minute["org-1"][0])
        assert merged.get_total_count() == len(a) + len(b)
    finally:
        await redis.aclose()


@pytest.mark.parametrize("how", ["refused", "cancelled"])
async def test_a_slot_whose_push_did_not_finish_is_written_by_the_next_push(
    servers: Servers, how: str
) -> None:
    heard = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)  # takes the pipeline's commands and never answers
        heard.set()
        await reader.read()
        writer.close()

    silent_server = await asyncio.start_server(silent, "127.0.0.1", 0)
    if how == "refused":
        with socket.socket() as probe:  # a port nothing listens on
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
    else:
        port = silent_server.sockets[0].getsockname()[1]
    down = Redis(host="127.0.0.1", port=port, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    redis = Redis.from_url(servers.redis_url)
    try:
        await redis.flushdb()
        now = time.time() // 60 * 60 + 55  # ten seconds on is the next minute
        slots = store.NodeSlots("node-a")
        key = ("org-1", "delivery", "room", "WEB_APP")
        slots.add({key: histograms.Tally.of([1000, 2000, 3000])}, {}, now)
        if how == "refused":
            with pytest.raises(RedisConnectionError):
                await slots.push(down, now, {})
        else:
            pushing = asyncio.create_task(slots.push(down, now, {}))
            await asyncio.wait_for(heard.wait(), 5)
            pushing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await pushing
        # The next minute, nothing new: the next push still owes the slot and its minute.
        await slots.push(redis, now + 10, {})
        for resolution in (10, 60):
            found = await store.read_hists(
                redis, ["org-1"], resolution, [store.slot_of(now, resolution)]
            )
            (entries,) = found["org-1"]
            merged = histograms.merged(histograms.decode(p) for _, p in entries)
            assert merged.get_total_count() == 3
    finally:
        await down.aclose()
        await redis.aclose()
        silent_server.close()


async def test_a_push_does_not_write_again_what_redis_has_expired(servers: Servers) -> None:
    # Slots left over from a long outage: Redis keeps 10-second slots 7 minutes and
    # minutes 62, so a push writes only what Redis would still hold.
    redis = Redis.from_url(servers.redis_url)
    try:
        await redis.flushdb()
        now = time.time()
        slots = store.NodeSlots("node-a")
        key = ("org-1", "delivery", "room", "WEB_APP")
        for ago in (0, 600, 4000):
            slots.add({key: histograms.Tally.of([1000 + ago])}, {}, now - ago)
        await slots.push(redis, now, {})

        async def count(resolution: int, ago: int) -> int:
            slot = store.slot_of(now - ago, resolution)
            (entries,) = (await store.read_hists(redis, ["org-1"], resolution, [slot]))["org-1"]
            return sum(histograms.decode(p).get_total_count() for _, p in entries)

        assert [await count(10, ago) for ago in (0, 600, 4000)] == [1, 0, 0]
        assert [await count(60, ago) for ago in (0, 600, 4000)] == [1, 1, 0]
    finally:
        await redis.aclose()
