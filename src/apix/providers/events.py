"""Real-time events of the providers domain (typed; listed in docs/providers.md).

`provider.health.updated` is published on the organisation's `providers` channel;
`provider.fallback` is handed to the routing caller (a run publishes it on its channel).
"""

from __future__ import annotations

import uuid
from typing import ClassVar

from apix.providers.schemas import Hop, ProviderHealth


class ProviderHealthUpdated(ProviderHealth):
    type: ClassVar[str] = "provider.health.updated"

    provider_id: uuid.UUID
    provider_name: str
    previous_status: str | None


class ProviderFallback(Hop):
    """A hop from one provider to the next (``to_provider_id`` None: none was left)."""

    type: ClassVar[str] = "provider.fallback"


__all__ = ["ProviderFallback", "ProviderHealthUpdated"]
