"""Time helpers: aware UTC datetimes and epoch milliseconds."""

from __future__ import annotations

import time
from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC)


def epoch_ms() -> int:
    return time.time_ns() // 1_000_000
