"""What the providers domain needs at run time: database, Redis, broker, key box, health.

Cheap to build (no connection is opened): the HTTP layer builds one per request from the
resources the lifespan owns; a worker builds one from its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis

from apix.config import ProvidersSettings, Settings
from apix.core.security import InvalidToken, SecretBox
from apix.infra.database import Database
from apix.providers.errors import ProviderAuthError
from apix.providers.health import Health
from apix.providers.models import Provider
from apix.providers.types import DEFAULT_BASE_URLS, ProviderConfig, kind_of
from apix.realtime.broker import Broker

# SecretBox purpose of provider API keys (a key derived for this use alone).
KEY_PURPOSE = "providers"


@dataclass(frozen=True)
class ProvidersRuntime:
    settings: ProvidersSettings
    database: Database
    redis: Redis
    box: SecretBox
    health: Health

    @classmethod
    def create(
        cls, settings: Settings, database: Database, redis: Redis, broker: Broker | None
    ) -> ProvidersRuntime:
        return cls(
            settings=settings.providers,
            database=database,
            redis=redis,
            box=SecretBox(settings.secret_key.get_secret_value(), purpose=KEY_PURPOSE),
            health=Health(redis, settings.providers, broker),
        )

    def config(self, row: Provider, *, with_key: bool = True) -> ProviderConfig:
        """The provider ready to call, its key decrypted (kept out of `repr`).

        Raises `ProviderAuthError` when the stored key cannot be decrypted.
        """
        kind = kind_of(row.kind)
        return ProviderConfig(
            id=row.id,
            org_id=row.org_id,
            name=row.name,
            kind=kind,
            base_url=row.base_url or DEFAULT_BASE_URLS[kind],
            default_model=row.default_model,
            capabilities=tuple(row.capabilities),
            timeout_s=row.timeout_s,
            fallback_ids=tuple(row.fallback_ids),
            is_primary=row.is_primary,
            api_key=self._decrypt(row) if with_key else None,
        )

    def _decrypt(self, row: Provider) -> str | None:
        if row.api_key_encrypted is None:
            return None
        try:
            return self.box.decrypt(row.api_key_encrypted)
        except InvalidToken as exc:
            # Encrypted under another secret key (APIX_SECRET_KEY changed): set the key again.
            raise ProviderAuthError(
                "the stored API key cannot be decrypted with this node's secret key; set it again"
            ) from exc
