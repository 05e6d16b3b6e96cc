"""Every domain's tables, imported in one place for Alembic and the schema checks."""

from __future__ import annotations

import importlib

# Domain packages whose `models` module defines tables, in dependency order.
DOMAINS_WITH_MODELS: tuple[str, ...] = (
    "identity",
    "audit",
    "realtime",
    "providers",
    "agents",
    "monitoring",
    "analytics",
)


def load_all_models() -> None:
    for domain in DOMAINS_WITH_MODELS:
        importlib.import_module(f"apix.{domain}.models")
