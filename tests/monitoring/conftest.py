"""Monitoring tests: fast loops, every delivery sampled, a metrics token."""

from __future__ import annotations

import pytest

from apix.config import MonitoringSettings, RealtimeSettings, Settings
from tests.conftest import Servers, make_settings

METRICS_TOKEN = "metrics-token-for-tests"


def monitoring_settings(**overrides: object) -> MonitoringSettings:
    values: dict[str, object] = {
        "push_interval_s": 0.2,
        "probe_interval_s": 0.2,
        "alert_interval_s": 0.2,
        "delivery_sample_every": 1,
        "alert_min_samples": 1,
        "metrics_token": METRICS_TOKEN,
    }
    values.update(overrides)
    return MonitoringSettings(**values)  # type: ignore[arg-type]


@pytest.fixture
def settings(servers: Servers) -> Settings:
    return make_settings(
        servers,
        monitoring=monitoring_settings(),
        realtime=RealtimeSettings(ping_interval_ms=300),
    )
