"""AI providers: credentials, adapters over the official SDKs, health, routing, usage metering.

Agents and runs call `apix.providers.routing` (see `docs/providers.md`).
"""
