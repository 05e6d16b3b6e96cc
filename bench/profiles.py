"""What a run measures: the full profile (issue 5) and the quick one (a short smoke run)."""

from __future__ import annotations

from typing import Any

TARGETS = ["apix", "websockets", "fastapi", "socketio", "node-ws"]

FULL: dict[str, Any] = {
    "name": "full",
    "held": {"connections": [1_000, 10_000, 20_000, 50_000], "idle_s": 30},
    "fanout": [
        {
            "subscribers": 1_000,
            "rates": [10, 20, 40, 60, 80, 100, 120, 150, 200, 300],
            "duration_s": 20,
            "sweep": True,
            "rounds": 3,
        },
        {
            "subscribers": 10_000,
            "rates": [1, 2, 4, 6, 8, 10, 15, 20, 30],
            "duration_s": 20,
            "sweep": True,
            "rounds": 3,
        },
    ],
    "many": {"connections": 10_000, "channels": 1_000, "rates": [1_000], "duration_s": 20},
    "http": {"concurrency": 32, "duration_s": 20, "rounds": 3},
    "two_nodes": {"subscribers": 10_000, "rates": [2, 5, 10], "duration_s": 20},
    "profile": {"subscribers": 1_000, "rate": 100, "seconds": 15, "connect_connections": 5_000},
}

QUICK: dict[str, Any] = {
    "name": "quick",
    "held": {"connections": [1_000], "idle_s": 5},
    "fanout": [
        {"subscribers": 1_000, "rates": [20, 50], "duration_s": 10, "sweep": False},
    ],
    "many": {"connections": 1_000, "channels": 100, "rates": [200], "duration_s": 10},
    "http": {"concurrency": 32, "duration_s": 8},
    "two_nodes": {"subscribers": 1_000, "rates": [50], "duration_s": 10},
    "profile": {"subscribers": 1_000, "rate": 50, "seconds": 8, "connect_connections": 2_000},
}


def resolve(config: dict[str, Any]) -> dict[str, Any]:
    """A results file's config completed from its named profile (full, or quick with
    `"name": "quick"`): what it leaves out, and a scenario's settings one level deep, so
    `{"held": {"rounds": 3}}` keeps the profile's connection counts."""
    base = QUICK if config.get("name") == "quick" else FULL
    resolved = dict(base)
    for key, value in config.items():
        given = base.get(key)
        both_dicts = isinstance(value, dict) and isinstance(given, dict)
        resolved[key] = {**given, **value} if both_dicts else value
    return resolved


SCENARIOS = ["held", "fanout", "many", "http", "two_nodes", "profile"]
