"""HDR histograms of latencies in microseconds, and the percentiles the API reports.

Two significant digits: any recorded value is reported within 1 % of what was recorded,
from 1 µs to 10 minutes (longer values count as 10 minutes), in about 20 KB a histogram.
"""

from __future__ import annotations

import enum
from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]

LOWEST_US = 1
HIGHEST_US = 600_000_000
DIGITS = 2
PERCENTILES = (50.0, 90.0, 99.0, 99.9)


class Window(enum.StrEnum):
    """Rolling windows: made of 10-second slots (1m, 5m) or 1-minute slots (1h)."""

    ONE_MINUTE = "1m"
    FIVE_MINUTES = "5m"
    ONE_HOUR = "1h"

    @property
    def resolution_s(self) -> int:
        return 60 if self is Window.ONE_HOUR else 10

    @property
    def slots(self) -> int:
        return {"1m": 6, "5m": 30, "1h": 60}[self.value]

    @property
    def seconds(self) -> int:
        return self.resolution_s * self.slots


def new() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, DIGITS)


def record(histogram: HdrHistogram, micros: int) -> None:
    histogram.record_value(min(max(micros, 0), HIGHEST_US))


# Prometheus's buckets for every latency histogram of `/metrics`, in seconds.
PROMETHEUS_BOUNDS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


def _largest_micros_within(bound_s: float) -> int:
    """The largest integer ``m`` with ``m / 1_000_000 <= bound_s``: Prometheus compares the
    value in seconds, so a sample of ``m`` µs falls in that bucket exactly when ``m`` is at
    most this."""
    m = round(bound_s * 1_000_000)
    while (m + 1) / 1_000_000 <= bound_s:
        m += 1
    while m / 1_000_000 > bound_s:
        m -= 1
    return m


_PROMETHEUS_MICROS = [_largest_micros_within(b) for b in PROMETHEUS_BOUNDS_S]
# hdrh: a value's bucket starts at v >> s << s, s = bit_length(v | mask) - (half + 1).
_LAYOUT = HdrHistogram(LOWEST_US, HIGHEST_US, DIGITS)
_MASK = _LAYOUT.sub_bucket_mask
_CUT = _LAYOUT.sub_bucket_half_count_magnitude + 1


class Tally:
    """Latencies of one series, counted by bucket as they are sampled.

    Each value is counted in the bucket its HDR histogram would record it in (under the
    lowest value of that bucket) and in the Prometheus bucket it falls in; the sum is kept
    too. Folding a tally into its histograms then costs one call per bucket used, however
    many values it counted: folding values one by one, every few seconds, held a busy
    node's loop for tens of milliseconds (docs/monitoring.md).
    """

    __slots__ = ("hdr", "prometheus", "sum_us")

    def __init__(self) -> None:
        self.hdr: dict[int, int] = {}  # a bucket's lowest value (µs) → count
        # Counts per Prometheus bucket, not cumulative; the last is +Inf's own.
        self.prometheus = [0] * (len(_PROMETHEUS_MICROS) + 1)
        self.sum_us = 0

    @classmethod
    def of(cls, values: Iterable[int]) -> Tally:
        tally = cls()
        for value in values:
            tally.add(value)
        return tally

    def add(self, micros: int) -> None:
        """Count a latency of ``micros`` (below 0 counts as 0; the HDR histogram caps it at
        `HIGHEST_US`, as `record` does)."""
        if micros < 0:
            micros = 0
        value = micros if micros < HIGHEST_US else HIGHEST_US
        shift = (value | _MASK).bit_length() - _CUT
        lowest = value >> shift << shift
        hdr = self.hdr
        hdr[lowest] = hdr.get(lowest, 0) + 1
        self.prometheus[bisect_left(_PROMETHEUS_MICROS, micros)] += 1
        self.sum_us += micros

    @property
    def count(self) -> int:
        return sum(self.prometheus)

    def record_into(self, histogram: HdrHistogram) -> None:
        """Add what was counted to ``histogram``: as if each value had been recorded."""
        for lowest, count in self.hdr.items():
            histogram.record_value(lowest, count)


def encode(histogram: HdrHistogram) -> bytes:
    encoded: bytes = histogram.encode()
    return encoded


def decode(payload: bytes) -> HdrHistogram:
    return HdrHistogram.decode(payload)


def merged(histograms: Iterable[HdrHistogram]) -> HdrHistogram:
    total = new()
    for histogram in histograms:
        total.add(histogram)
    return total


@dataclass(frozen=True, slots=True)
class Summary:
    """Percentiles of one histogram, in milliseconds."""

    count: int
    p50: float | None
    p90: float | None
    p99: float | None
    p999: float | None
    max: float | None
    mean: float | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "p50": self.p50,
            "p90": self.p90,
            "p99": self.p99,
            "p999": self.p999,
            "max": self.max,
            "mean": self.mean,
        }


def summary(histogram: HdrHistogram) -> Summary:
    count = int(histogram.get_total_count())
    if count == 0:
        return Summary(0, None, None, None, None, None, None)
    values = histogram.get_percentile_to_value_dict(list(PERCENTILES))
    p50, p90, p99, p999 = (_ms(values[p]) for p in PERCENTILES)
    return Summary(
        count=count,
        p50=p50,
        p90=p90,
        p99=p99,
        p999=p999,
        max=_ms(histogram.get_max_value()),
        mean=_ms(histogram.get_mean_value()),
    )


def _ms(micros: float) -> float:
    return round(micros / 1000, 3)
