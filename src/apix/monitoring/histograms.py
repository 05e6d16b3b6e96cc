"""HDR histograms of latencies in microseconds, and the percentiles the API reports.

Two significant digits: any recorded value is reported within 1 % of what was recorded,
from 1 µs to 10 minutes (longer values count as 10 minutes), in about 20 KB a histogram.
"""

from __future__ import annotations

import enum
from collections import Counter
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


def record_many(histogram: HdrHistogram, values: Iterable[int]) -> None:
    """Record ``values`` (integers) as `record` would, one by one, at about half the cost.

    A histogram only counts which bucket a value falls in. Each value is taken down to the
    lowest value of its bucket (the bucket's `unit << k` boundaries, as `hdrh` computes
    them), equal ones are counted together, and each bucket is recorded once with its
    count: the counts, and every figure read from them, are the same.
    """
    mask = histogram.sub_bucket_mask
    # hdrh: bucket = bit_length(v | mask) - unit - (half + 1); lowest = v >> (bucket + unit)
    # << (bucket + unit). So the shift is bit_length(v | mask) - (half + 1).
    cut = histogram.sub_bucket_half_count_magnitude + 1
    buckets: Counter[int] = Counter()
    for value in values:
        value = min(max(value, 0), HIGHEST_US)
        shift = (value | mask).bit_length() - cut
        buckets[value >> shift << shift] += 1
    for lowest, count in buckets.items():
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
