"""Monitoring: latency tracker, alerts, quality-of-service counters, the monitoring API and
Prometheus metrics."""
